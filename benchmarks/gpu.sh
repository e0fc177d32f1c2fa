#!/usr/bin/env bash
# The GPU measurements the issues ask for, in one run (issues 12, 17, 19): ViT-g/14 → ViT-B/14 distillation
# steps in bf16 at the paper's shapes (student-only, cached, online, teacher heads), the distillation input
# pipeline at several worker counts, and ScoreNet vs its local encoder over every region. Random weights
# (timing only): H-Optimus-0's architecture is written once to a safetensors file, since no hub is reached.
#
#   bash benchmarks/gpu.sh OUT_DIR            # on a GPU machine, from the repository root
#   SMOKE=1 bash benchmarks/gpu.sh OUT_DIR    # the same script with the tiny twins, on a CPU (wiring check)
# Each benchmark's output goes to OUT_DIR/<name>.log; a benchmark that fails or times out does not stop the rest.
set -u
out=${1:?usage: gpu.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
if [ "${SMOKE:-0}" = 1 ]; then
    teacher=h_optimus_0_tiny student=h0_mini_tiny batch=8 protos=1024 heads_batch=64 workers=2 steps=2 repeats=1
    input_args=(--workers 0 2 --tiles 256 --batches 1 --repeats 1 --batch 16) scorenet_args=(--sides 448 896)
else
    teacher=h_optimus_0 student=h0_mini batch=64 protos=131072 heads_batch=1024 workers=12 steps=4 repeats=3
    input_args=(--workers 4 12 --tiles 1024 --repeats 2 --batches 4) scorenet_args=(--model h0_mini --sides 1024 2048 4096 --top-k 20)
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.log"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$out/gpu.log"

weights="${TMPDIR:-/tmp}/${teacher}_random.safetensors"
python - "$teacher" "$weights" <<'PY' 2>&1 | tee -a "$out/gpu.log"
import sys, time
import timm, torch
from safetensors.torch import save_file
from histodistill.models.registry import get_spec
name, path = sys.argv[1:]
spec, start = get_spec(name), time.perf_counter()
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialised where it is fast
    model = timm.create_model(spec.arch, pretrained=False, **spec.kwargs)
save_file({k: v.detach().to(torch.bfloat16).cpu().contiguous() for k, v in model.state_dict().items()}, path)
print(f"random {name} ({spec.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params) -> {path} "
      f"in {time.perf_counter() - start:.1f} s")
PY

run() {  # run NAME SECONDS CMD...: one benchmark, its log, its exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    timeout $((limit * ${SMOKE:-0} * 3 + limit)) "$@" > "$out/$name.log" 2>&1
    echo "== $name: exit $? in $((SECONDS - start)) s" | tee -a "$out/gpu.log"
    tail -n 15 "$out/$name.log"
}
run distill_step 330 python benchmarks/distill_step.py --teacher "$teacher" --student "$student" \
    --teacher-weights "$weights" --batch-size "$batch" --prototypes "$protos" --heads-batch-size "$heads_batch" \
    --steps "$steps" --repeats "$repeats" --workers "$workers" --modes student_only cached online cached_all \
    --profile --head-precision bf16 --ibot-patches 4 --distill-ibot-patches 8
    # configs/h0mini.yaml's heads and runs (bf16 heads, 4 iBOT tokens per view in the heads stage, 8 in
    # distillation; cached_all: (b) on every token, the step before `ibot_patches`); the 2026-11-30 run: fp32
    # heads, 16 heads-stage tokens, every token in distillation
run scorenet 75 python benchmarks/scorenet.py "${scorenet_args[@]}"
run distill_input 120 python benchmarks/distill_input.py "${input_args[@]}"
