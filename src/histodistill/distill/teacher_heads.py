"""The teacher-heads stage: learn DINO and iBOT heads on a teacher's frozen, cached tokens.

Most public pathology teachers (H-Optimus-0 among them) ship their backbone without the DINO/iBOT heads that
distillation needs to turn teacher tokens into targets. This stage learns them before distillation, from the
teacher cache alone (the backbone never runs), by self-distillation of the heads: a student pair of heads
(`DinoIbot.student_heads`, trained by AdamW) and a teacher pair that is their EMA (`ema_teacher=True`;
`schedules.ema_update`), DINOv2's scheme at head level (`SSLMetaArch`: teacher = EMA of the student,
targets centred and sharpened, never with gradient):

- DINO head on the CLS tokens across the two cached views of a tile: the teacher head on view i targets the
  student head on view j ≠ i (`losses.dino_loss`);
- iBOT head on patch tokens: the teacher head on a token targets the student head on the same token
  (`losses.ibot_loss`), `ibot_patches` tokens sampled per view and step;
- softmax centering (EMA centre) or Sinkhorn-Knopp, teacher temperature warm-up, LR warm-up + cosine,
  weight decay cosine, EMA momentum cosine → 1 (`schedules.Schedules`);
- the collapse monitors of `distill.monitors` every iteration, the `CollapseGuard` stop, `train_log.parquet`
  and `loss.png`.

Batches: each step reads `read_windows` random windows of contiguous cache rows (`TeacherCache.read`), so
every stored chunk touched is decompressed once per step rather than once per tile, and a batch still mixes
tiles from `read_windows` places of the cohort. The view pair cycles with the step, as in distillation.

Output (`save_heads`): a safetensors file of the EMA (teacher) heads, keys `dino.*` and `ibot.*` as
`objectives.build_teacher_heads` builds them, with metadata `histodistill` (JSON: format, architecture,
teacher, provenance, summary) — what `distill` loads for `teacher_heads: <path>` (or `trained`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader

from histodistill.atomic import atomic_path
from histodistill.devices import pick_device
from histodistill.distill.engine import param_groups
from histodistill.distill.monitors import CollapseError, CollapseGuard, TargetStats, plot_train_log
from histodistill.distill.objectives import DinoIbot, StepState, StudentTokens, TeacherTokens
from histodistill.distill.schedules import Schedules, ema_update
from histodistill.distill.trainer import DistillConfig
from histodistill.errors import HistodistillError
from histodistill.provenance import provenance
from histodistill.teacher_cache import TeacherCache

log = logging.getLogger(__name__)
HEADS_FORMAT = "histodistill-teacher-heads/1"


@dataclass(frozen=True)
class HeadsConfig:
    """Settings of the teacher-heads stage (config `distill.teacher_heads`, CLI `histodistill train-heads`).

    The head dimensions must be those of the distillation runs that load the heads (`build_teacher_heads`
    checks). `lr` is AdamW's peak learning rate as is (no batch scaling); warm-ups are in iterations.
    """

    n_prototypes: int = 1024
    dino_bottleneck: int = 384
    ibot_bottleneck: int = 256
    head_hidden: int = 2048
    iterations: int = 2000
    batch_size: int = 256  # tiles per step, 2 cached views each
    # patch tokens per view per step for the iBOT head, a random subset (an unbiased estimate of the loss
    # over all of them): 8 of a pool2 cache's 64 (12.5 %), about DINOv2's iBOT share (its loss covers the
    # masked tokens: 10–50 % of the patches of half the global crops, 15 % on average)
    ibot_patches: int = 8
    head_precision: str = "fp32"  # fp32 | bf16: the heads' matmuls (objectives.head_autocast_dtype)
    read_windows: int = 8  # contiguous row windows read per step
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_iters: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_iters: int = 500
    centering: str = "softmax"  # or sinkhorn
    center_momentum: float = 0.9
    ema_momentum: float = 0.996  # cosine → 1
    clip_grad: float = 3.0
    eval_batches: int = 8  # batches after training on which the final heads' usage is measured
    collapse_floor: float = 4.0
    collapse_patience: int = 200
    collapse_entropy_ceiling: float = 0.95
    seed: int = 0
    num_workers: int = 2

    def objective_config(self) -> DistillConfig:
        """The DistillConfig whose DinoIbot objective is this stage's pair of heads (DINO and iBOT weight 1,
        the `paper` normalisation, no local crops)."""
        shared = (
            "n_prototypes",
            "dino_bottleneck",
            "ibot_bottleneck",
            "head_hidden",
            "student_temp",
            "teacher_temp",
            "warmup_teacher_temp",
            "centering",
            "center_momentum",
            "seed",
            "collapse_floor",
            "collapse_patience",
            "collapse_entropy_ceiling",
            "head_precision",
        )
        return replace(
            DistillConfig(), objective="dino_ibot", n_local=0, **{k: getattr(self, k) for k in shared}
        )


class HeadBatches:
    """Step k → the cached tokens of one batch: cls [2, B, Dt] and patch [2, B, n, Dt] (float32).

    The batch is `read_windows` windows of B / read_windows contiguous rows at offsets drawn from
    (seed, k), the view pair 2·(k mod V/2), and `ibot_patches` patch tokens per view drawn from (seed, k):
    a deterministic function of k (workers and resumes see the same batches).
    """

    def __init__(self, cache: str | Path, batch_size: int, n_patches: int, windows: int, seed: int):
        self.cache_path = Path(cache)
        cache_ = TeacherCache(self.cache_path)
        self.n_rows, self.n_views = len(cache_), int(cache_.attrs["views"])
        if cache_.attrs["patch_tokens"] == "none":
            raise HistodistillError(
                f"{self.cache_path} holds no patch tokens: the iBOT head needs them (teacher.patch_tokens)"
            )
        self.windows = max(1, min(windows, batch_size, self.n_rows))
        self.window = max(1, min(batch_size // self.windows, self.n_rows))
        self.n_patches, self.seed = n_patches, seed
        self._cache: TeacherCache | None = None

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        if self._cache is None:  # opened in the worker that uses it
            self._cache = TeacherCache(self.cache_path)
        rng = np.random.default_rng([self.seed, step])
        pair = 2 * (step % max(self.n_views // 2, 1))
        cls, patch = [], []
        for lo in rng.integers(0, self.n_rows - self.window + 1, size=self.windows):
            rows = self._cache.read(int(lo), int(lo) + self.window)
            cls.append(rows["cls"][:, pair : pair + 2])
            patch.append(rows["patch"][:, pair : pair + 2])
        cls_, patch_ = np.concatenate(cls), np.concatenate(patch)  # [B, 2, Dt], [B, 2, P, Dt]
        b, _, p, d = patch_.shape
        n = min(self.n_patches, p)
        pick = np.argsort(rng.random((b, 2, p)), axis=-1)[..., :n]
        patch_ = np.take_along_axis(patch_, pick[..., None], axis=2)
        return {
            "cls": torch.from_numpy(cls_.astype(np.float32)).transpose(0, 1).contiguous(),
            "patch": torch.from_numpy(patch_.astype(np.float32)).transpose(0, 1).contiguous(),
        }


class HeadsTrainer:
    """The stage's loop on one device: `fit()` trains, evaluates, and returns the summary; `step(batch)`
    is one iteration (the benchmark times it). The objective is `DinoIbot` on the teacher's width with EMA
    teacher heads; its `student_heads` are the only parameters with gradients."""

    def __init__(
        self, cfg: HeadsConfig, cache: str | Path, device: str = "auto", name: str = "teacher heads"
    ):
        self.cfg, self.cache_path, self.name = cfg, Path(cache), name
        self.device = pick_device(device)
        attrs = TeacherCache(self.cache_path).attrs
        self.teacher, self.teacher_dim = attrs["teacher"], int(attrs["embed_dim"])
        torch.manual_seed(cfg.seed)
        self.objective = DinoIbot(
            cfg.objective_config(), self.teacher_dim, self.teacher_dim, teacher_patches=True, ema_teacher=True
        ).to(self.device)
        self.optimizer = torch.optim.AdamW(
            param_groups([self.objective.student_heads]), lr=0.0, betas=(0.9, 0.999)
        )
        self.schedules = Schedules.build(
            cfg.iterations,
            1,  # warm-ups in iterations
            cfg.lr,
            cfg.min_lr,
            cfg.warmup_iters,
            cfg.weight_decay,
            cfg.weight_decay_end,
            cfg.teacher_temp,
            cfg.warmup_teacher_temp,
            cfg.warmup_teacher_temp_iters,
            cfg.ema_momentum,
        )
        self.guard = CollapseGuard(
            name,
            cfg.collapse_floor,
            cfg.collapse_patience,
            n_prototypes=cfg.n_prototypes,
            ceiling=cfg.collapse_entropy_ceiling,
        )
        self.batches = HeadBatches(cache, cfg.batch_size, cfg.ibot_patches, cfg.read_windows, cfg.seed)
        self.iteration, self.log_rows = 0, []

    def _tokens(self, batch: dict) -> tuple[TeacherTokens, StudentTokens]:
        cls, patch = batch["cls"].to(self.device), batch["patch"].to(self.device)
        student = StudentTokens(cls.flatten(0, 1), patch.flatten(0, 1), None)
        return TeacherTokens(cls, patch), student

    def step(self, batch: dict) -> dict[str, float]:
        """One iteration: EMA-teacher targets (no grad) → student-head losses → AdamW → EMA → centres (phases
        labelled `heads.<phase>` for torch.profiler, as `Trainer.step`'s)."""
        it = min(self.iteration, self.cfg.iterations - 1)
        self.schedules.apply(self.optimizer, it)
        state = StepState(iteration=it, teacher_temp=float(self.schedules.teacher_temp[it]))
        teacher, student = self._tokens(batch)
        with record_function("heads.teacher_targets"):
            targets = self.objective.teacher_targets(teacher, state)
        with record_function("heads.losses"):
            losses = self.objective.losses(student, targets, state)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("heads.backward"):
            losses["total"].backward()
        with record_function("heads.optimizer"):
            grad_norm = float(
                nn.utils.clip_grad_norm_(self.objective.student_heads.parameters(), self.cfg.clip_grad)
            )
            self.optimizer.step()
        with record_function("heads.ema"):
            ema_update(
                self.objective.teacher_heads,
                self.objective.student_heads,
                float(self.schedules.ema_momentum[it]),
            )
        with record_function("heads.monitors"):
            monitors = self.objective.monitors(targets, losses, state)
            self.objective.update_state(targets)
        figures = {f"loss_{k}": float(v.detach()) for k, v in losses.items()}
        return (
            figures
            | {k: float(v) for k, v in monitors.items()}
            | {
                "lr": float(self.schedules.lr[it]),
                "weight_decay": float(self.schedules.weight_decay[it]),
                "teacher_temp": state.teacher_temp,
                "ema_momentum": float(self.schedules.ema_momentum[it]),
                "grad_norm": grad_norm,
            }
        )

    def _loader(self, steps: range) -> DataLoader:
        return DataLoader(
            self.batches,
            batch_size=None,
            sampler=steps,
            num_workers=self.cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def fit(self, log_dir: str | Path | None = None) -> dict:
        """Train `iterations` steps, then measure the EMA heads' targets on `eval_batches` further batches.

        Writes `train_log.parquet` and `loss.png` to `log_dir` when given (also when a collapse stops the
        run: the evidence first, then the CollapseError). Returns the summary: iterations, seconds,
        samples_per_s and `eval_<head>_entropy` / `eval_<head>_eff_prototypes` (mean over the evaluation
        batches, teacher temperature at its final value, the final centres).
        """
        t0 = time.perf_counter()
        self.objective.train()
        try:
            for batch in self._loader(range(self.iteration, self.cfg.iterations)):
                row = self.step(batch) | {"iteration": self.iteration}
                row["samples_per_s"] = (self.iteration + 1) * self.cfg.batch_size / (time.perf_counter() - t0)
                self.log_rows.append(row)
                self.guard.update(self.iteration, row)
                self.iteration += 1
                if self.iteration % 50 == 0 or self.iteration == self.cfg.iterations:
                    log.info(
                        "%s: it %d/%d loss %.4f DINO eff. prototypes %.1f iBOT %.1f T %.3f",
                        self.name,
                        self.iteration,
                        self.cfg.iterations,
                        row["loss_total"],
                        row["dino_eff_prototypes"],
                        row["ibot_eff_prototypes"],
                        row["teacher_temp"],
                    )
        except CollapseError:
            if log_dir is not None:
                self.write_log(log_dir)
            raise
        seconds = time.perf_counter() - t0
        summary = {
            "iterations": self.iteration,
            "seconds": seconds,
            "samples_per_s": self.iteration * self.cfg.batch_size / max(seconds, 1e-9),
        } | self.evaluate()
        if log_dir is not None:
            self.write_log(log_dir)
        return summary

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """`eval_dino_*`, `eval_ibot_*` entropy and effective prototypes of the EMA heads' targets on
        `eval_batches` batches drawn after the training steps (softmax centering: the final centres;
        Sinkhorn: per batch), at the final teacher temperature."""
        state = StepState(self.cfg.iterations, float(self.schedules.teacher_temp[-1]))
        self.objective.eval()
        rows = []
        steps = range(self.cfg.iterations, self.cfg.iterations + self.cfg.eval_batches)
        for batch in self._loader(steps):
            teacher, _ = self._tokens(batch)
            targets = self.objective.teacher_targets(teacher, state)
            zero = torch.zeros((), device=self.device)
            figures = TargetStats.of_probs(targets.dino_probs).figures("dino", zero)
            figures |= targets.ibot_stats.figures("ibot", zero)
            rows.append({f"eval_{k}": float(v) for k, v in figures.items() if not k.endswith("_kl")})
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}

    def write_log(self, log_dir: str | Path) -> None:
        """train_log.parquet and loss.png in `log_dir`, atomically."""
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(self.log_rows)
        with atomic_path(log_dir / "train_log.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
        plot_train_log(
            frame,
            log_dir / "loss.png",
            self.name,
            self.cfg.collapse_floor,
            self.cfg.n_prototypes,
            self.cfg.collapse_entropy_ceiling,
        )


def save_heads(heads: nn.ModuleDict, path: str | Path, metadata: dict) -> None:
    """Write `heads` (keys `dino.*`, `ibot.*`) to a safetensors file with `metadata` as JSON under the
    metadata key `histodistill` (and `format`), atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in heads.state_dict().items()}
    with atomic_path(Path(path)) as tmp:
        save_file(tensors, str(tmp), metadata={"format": HEADS_FORMAT, "histodistill": json.dumps(metadata)})


def read_heads(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of a heads file; metadata is {} for a file without ours (e.g. converted
    released heads). HistodistillError if the file does not exist."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise HistodistillError(f"teacher heads checkpoint not found: {path}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return load_file(path), json.loads(meta.get("histodistill", "{}"))


def train_teacher_heads(
    cache: str | Path,
    out: str | Path,
    cfg: HeadsConfig = HeadsConfig(),
    teacher: str | None = None,
    log_dir: str | Path | None = None,
    device: str = "auto",
) -> dict:
    """Learn the DINO and iBOT heads of the teacher whose tokens `cache` holds; write them to `out`
    (safetensors, see `save_heads`) and `train_log.parquet`, `loss.png`, `summary.json` to `log_dir`
    (default: `out` without its suffix, e.g. demo.heads.safetensors → demo.heads/).

    `teacher`: the registry name the caller expects; HistodistillError if the cache holds another teacher's
    tokens or no patch tokens; CollapseError (a HistodistillError) if the heads collapse. Returns the summary.
    """
    out = Path(out)
    log_dir = Path(log_dir) if log_dir is not None else out.with_suffix("")
    attrs = TeacherCache(cache).attrs
    if teacher is not None and attrs["teacher"] != teacher:
        raise HistodistillError(f"{cache} holds {attrs['teacher']}'s tokens, not {teacher}'s")
    trainer = HeadsTrainer(cfg, cache, device, name=f"teacher heads of {attrs['teacher']} ({out.name})")
    log.info(
        "training the DINO/iBOT heads of %s on %s: %d iterations of %d tiles, K=%d, device %s",
        attrs["teacher"],
        cache,
        cfg.iterations,
        cfg.batch_size,
        cfg.n_prototypes,
        trainer.device,
    )
    summary = trainer.fit(log_dir)
    arch = {
        "teacher_dim": trainer.teacher_dim,
        "n_prototypes": cfg.n_prototypes,
        "head_hidden": cfg.head_hidden,
        "dino_bottleneck": cfg.dino_bottleneck,
        "ibot_bottleneck": cfg.ibot_bottleneck,
    }
    meta = {
        "format": HEADS_FORMAT,
        "architecture": arch,
        "teacher": attrs["teacher"],
        "summary": summary,
        "provenance": provenance(
            asdict(cfg),
            teacher_cache=str(cache),
            teacher=attrs["teacher"],
            teacher_weights_digest=attrs["provenance"].get("weights_digest"),
        ),
    }
    save_heads(trainer.objective.teacher_heads, out, meta)
    with atomic_path(log_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str))
    log.info(
        "teacher heads → %s: effective prototypes DINO %.1f, iBOT %.1f of %d (%.1f s)",
        out,
        summary.get("eval_dino_eff_prototypes", float("nan")),
        summary.get("eval_ibot_eff_prototypes", float("nan")),
        cfg.n_prototypes,
        summary["seconds"],
    )
    return summary
