"""The distillation loop: get_teacher_output → get_student_output → compute_losses → step.

What is learned and how (heads, teacher targets, loss terms, centres) is the objective's business
(`distill.objectives`, chosen by `objective`); the trainer runs the student, the optimiser, the EMA,
checkpoints and processes, and knows no objective by name.

Single process or DDP (torchrun sets RANK/LOCAL_RANK/WORLD_SIZE, read first; then SLURM's variables; else
one process). Checkpoints are written atomically every `checkpoint_every` iterations and on SIGUSR1/SIGTERM
(then the process exits with EXIT_REQUEUE so the scheduler or Snakemake's retries restart it); a restart
resumes from the last checkpoint and replays exactly the batches an uninterrupted run would have seen.

A checkpoint is bound to its inputs (`input_digests`): the tile store's and the teacher cache's provenance
hashes, the teacher heads' and teacher weights' sha256, and the settings. A resume with any difference
starts over and logs which input changed; a checkpoint is never loaded in part. `checkpoint.pt` lives in
`checkpoint_dir` (default: the output directory). In the workflow that is the run's resume directory,
`students/<run>/resume`, the output of its own rule (`distill_resume`, rules/distill.smk): Snakemake knows
it (`--delete-all-output` removes it, and a change of any input or setting recreates it empty), while a
failed or preempted `distill` job keeps it for its retry, since Snakemake deletes only the failed job's own
outputs. A run that finishes removes its checkpoint once its declared outputs are written.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader

from histodistill.atomic import atomic_path
from histodistill.augment import normalize
from histodistill.config import DISTILL_HEAD_DEFAULTS
from histodistill.devices import autocast_dtype
from histodistill.distill.data import DistillDataset, EpochSampler, finish_views, split_rows
from histodistill.distill.engine import (
    init_process,
    param_groups,
    read_checkpoint,
    save_checkpoint,
    stale_inputs,
    wrap_ddp,
)
from histodistill.distill.launch import REQUEUE_EXIT_CODE
from histodistill.distill.monitors import CollapseError, CollapseGuard, plot_train_log
from histodistill.distill.objectives import (
    COTRAINED_MODES,
    StepState,
    StudentTokens,
    TeacherTokens,
    build_objective,
)
from histodistill.distill.pairs import PairingConfig, PairSource
from histodistill.distill.schedules import Schedules, ema_update
from histodistill.errors import HistodistillError
from histodistill.logs import LOG_FORMAT
from histodistill.models import get_spec, load_model, save_student
from histodistill.models.registry import build_model, file_digest
from histodistill.provenance import config_hash, provenance
from histodistill.teacher_cache import TeacherCache, pool_patches
from histodistill.tilestore import TileStore

log = logging.getLogger(__name__)
EXIT_REQUEUE = REQUEUE_EXIT_CODE  # checkpointed on a signal, run me again (see distill/launch.py)
# 2: the objective's heads and centres under "objective", the backbone under "backbone" (1: "model",
# "teacher_heads", "centers"; not loadable)
# (a format-2 checkpoint without "inputs", the digests of what it consumed, is stale: never resumed)
CHECKPOINT_FORMAT = 2


@dataclass(frozen=True)
class DistillConfig:
    student: str = "h0_mini_tiny"  # a registry architecture, trained from random init
    teacher: str = "h_optimus_0_tiny"
    teacher_weights: str | None = None
    objective: str = "dino_ibot"  # a name in distill.objectives.OBJECTIVES: dino_ibot | feature
    objective_params: dict[str, Any] = field(default_factory=dict)  # options of objectives that take any
    # cached | online (a frozen teacher) | cotrained_shared | cotrained_separate (a teacher branch of the
    # student's architecture trained with it: the student's weights or its own; vicreg and simclr only)
    teacher_mode: str = "cached"
    # a heads file from `histodistill train-heads` (the workflow turns `trained` into the
    # train_teacher_heads output) or `frozen` (seeded random heads: tests only)
    teacher_heads: str = "frozen"
    n_prototypes: int = DISTILL_HEAD_DEFAULTS["n_prototypes"]
    dino_bottleneck: int = DISTILL_HEAD_DEFAULTS["dino_bottleneck"]
    ibot_bottleneck: int = DISTILL_HEAD_DEFAULTS["ibot_bottleneck"]
    head_hidden: int = DISTILL_HEAD_DEFAULTS["head_hidden"]
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    dino_normalization: str = (
        "paper"  # paper (mean over crop pairs) | dinov2 (its code: 2/3 of it, no locals)
    )
    n_local: int = 0
    centering: str = "softmax"  # or "sinkhorn"
    center_momentum: float = 0.9
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 16
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    ema_momentum: float = 0.996
    clip_grad: float = 3.0
    batch_size: int = 16  # total over processes and accumulation steps
    iterations: int = 100
    iters_per_epoch: int | None = None  # default: training tiles / batch size
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16 (with a grad scaler)
    num_workers: int = 2
    checkpoint_every: int = 50
    holdout_fraction: float = 0.2
    seed: int = 0
    ibot_chunk: int = 4096
    # iBOT on this many random patch positions per view and step (None: every token; configs/h0mini.yaml: 8):
    # distill.objectives.DinoIbot, ibot_positions
    ibot_patches: int | None = None
    # the DINO/iBOT heads' matmuls: fp32 (outside autocast) | bf16 (under bf16 autocast; softmax, centering
    # and losses in float32): distill.objectives.head_autocast_dtype
    head_precision: str = "fp32"
    # paired views: the keys of distill.pairs.PairingConfig (empty: unpaired)
    pairing: dict[str, Any] = field(default_factory=dict)
    # stop when an effective prototype count (exp H(mean target)) stays below the floor this many iterations
    collapse_floor: float = 4.0
    collapse_patience: int = 200
    collapse_entropy_ceiling: float = 0.95  # flat collapse: mean target entropy > this × log K


def _store_digest(tiles: str | Path) -> str:
    """The tile store's content identity: its pack settings' provenance hash, each slide's tile-table
    provenance hash (the tiling settings: `min_tissue`, `mpp`, …), the slide ids and the tile count."""
    from histodistill.tilestore import TileStore

    attrs = TileStore(tiles).attrs
    return config_hash(
        {
            "store": attrs["provenance"]["config_hash"],
            "slides": [[s["slide_id"], s.get("table_config_hash")] for s in attrs["slides"]],
            "n_tiles": attrs.get("n_tiles"),
        }
    )


def _cache_digest(cache: TeacherCache) -> str:
    """The teacher cache's content identity: each shard's provenance hash (teacher and its weights digest,
    views, augmentation, seed, precision, the tile store's hash, the shard) and the rows it covers."""
    shards = [dict(s.attrs)["provenance"]["config_hash"] for s in cache.shards]
    return config_hash({"shards": shards, "rows": cache.attrs["rows"], "n_tiles": cache.attrs["n_tiles"]})


def input_digests(cfg: DistillConfig, tiles: str | Path, cache: TeacherCache) -> dict[str, str]:
    """The digests of everything a run consumes, which a checkpoint records and a resume compares.

    `tiles`/`teacher_cache`: provenance hashes of the Zarr stores (their attrs: cheap, and they change
    whenever an upstream setting does); `teacher_heads`, `teacher_weights`: the sha256 of the files (read
    in full once per start: a weights file of a few GB takes seconds), "frozen"/"none" when there is none;
    `settings`: the hash of the distillation settings. Raises KeyError for a store or cache without
    provenance attrs (not written by this pipeline) and OSError for a heads or weights file that cannot be
    read."""
    heads = cfg.teacher_heads
    return {
        "tiles": _store_digest(tiles),
        "teacher_cache": _cache_digest(cache),
        "teacher_heads": heads if heads == "frozen" else file_digest(heads),
        "teacher_weights": file_digest(cfg.teacher_weights) if cfg.teacher_weights else "none",
        "settings": config_hash(asdict(cfg)),
    }


class StudentWithHeads(nn.Module):
    """The module wrapped in DDP: the student backbone + the objective's student heads (the same
    ModuleDict the objective holds), so DDP all-reduces the heads' gradients too, + under
    `cotrained_separate` the teacher branch's own encoder (`partner`). `forward` runs only an encoder
    (images [N, 3, S, S] → tokens [N, T, D]): the student's, or the partner with `teacher_branch=True`
    (the student's own under `cotrained_shared`); the objective applies its heads itself."""

    def __init__(self, backbone: nn.Module, heads: nn.ModuleDict, partner: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.heads = heads
        self.partner = partner

    def forward(self, images: torch.Tensor, teacher_branch: bool = False) -> torch.Tensor:
        encoder = self.partner if teacher_branch and self.partner is not None else self.backbone
        return encoder.forward_features(images)


def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear centred kernel alignment between two feature sets of the same samples (1 = same geometry)."""
    x, y = x - x.mean(0), y - y.mean(0)
    num = np.linalg.norm(x.T @ y) ** 2
    return float(num / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y) + 1e-12))


class Trainer:
    def __init__(
        self,
        cfg: DistillConfig,
        tiles: str | Path,
        cache: str | Path,
        out_dir: str | Path,
        device: str = "auto",
        checkpoint_dir: str | Path | None = None,
    ):
        """`out_dir` gets the declared outputs (student, EMA, train log, plot); `checkpoint_dir` (default
        `out_dir`) holds `checkpoint.pt`."""
        self.cfg, self.tiles, self.cache_path, self.out = cfg, Path(tiles), Path(cache), Path(out_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else self.out
        self.rank, self.local_rank, self.world, self.device = init_process(device)
        self.amp = autocast_dtype(self.device, cfg.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == torch.float16)

        cache = TeacherCache(self.cache_path)
        self.teacher_spec = get_spec(cache.attrs["teacher"]) if cfg.teacher_mode == "online" else None
        self.teacher_dim = int(cache.attrs["embed_dim"])
        self.cache_patch = cache.attrs["patch_tokens"]
        self.cotrained = cfg.teacher_mode in COTRAINED_MODES
        self.pairing = PairingConfig.parse(cfg.pairing)
        if self.pairing.symmetric and cfg.teacher_mode == "cached":
            raise HistodistillError(
                "pairing.symmetric gives the teacher branch the student-side image, which the teacher cache "
                "does not hold: use teacher_mode online or cotrained_shared|cotrained_separate"
            )
        # the rows that may train (a registered pairing: the reference slide's), split into train/held out
        eligible = PairSource(self.pairing, TileStore(self.tiles), cfg.seed).rows()
        train, holdout = split_rows(len(eligible), cfg.holdout_fraction, cfg.seed)
        self.train_rows, self.holdout_rows = eligible[train], eligible[holdout]
        if cfg.batch_size % self.world:
            raise HistodistillError(f"batch_size {cfg.batch_size} is not divisible by {self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        iters_per_epoch = cfg.iters_per_epoch or max(1, len(self.train_rows) // cfg.batch_size)
        self.schedules = Schedules.build(
            cfg.iterations,
            iters_per_epoch,
            cfg.lr * cfg.batch_size / 1024,
            cfg.min_lr,
            cfg.warmup_epochs,
            cfg.weight_decay,
            cfg.weight_decay_end,
            cfg.teacher_temp,
            cfg.warmup_teacher_temp,
            cfg.warmup_teacher_temp_epochs,
            cfg.ema_momentum,
        )

        base = get_spec(cfg.student)
        # Local crops (98 px) need position-embedding interpolation: the student is built with dynamic size.
        self.student_spec = replace(base, kwargs={**base.kwargs, "dynamic_img_size": True}, random_init=False)
        # The student's own init seed: a tiny demo teacher is seeded with `seed`, and equal seeds would give
        # the two the same patch embedding (agreement before training would then be trivially perfect).
        torch.manual_seed(cfg.seed + 1)
        backbone = build_model(self.student_spec)
        teacher_patches = self.cache_patch != "none" or cfg.teacher_mode != "cached"
        branch_dim = backbone.embed_dim if self.cotrained else self.teacher_dim  # the teacher branch's width
        self.objective = build_objective(cfg, backbone.embed_dim, branch_dim, teacher_patches)
        self.objective.to(self.device)
        partner = None
        if cfg.teacher_mode == "cotrained_separate":  # the teacher branch's own weights, from scratch
            torch.manual_seed(cfg.seed + 2)
            partner = build_model(self.student_spec)
        self.model = StudentWithHeads(backbone, self.objective.student_heads, partner).to(self.device)
        self.ema = copy.deepcopy(self.model.backbone).requires_grad_(False)
        self.teacher = None
        if cfg.teacher_mode == "online":
            self.teacher = load_model(cache.attrs["teacher"], cfg.teacher_weights, seed=cfg.seed).model.to(
                self.device
            )
            self.teacher.requires_grad_(False)
        self.ddp = wrap_ddp(self.model, self.device, self.world)
        if cfg.teacher_heads not in ("frozen",):
            _check_heads_teacher(cfg.teacher_heads, cache.attrs["teacher"])
        self.inputs = input_digests(cfg, self.tiles, cache)  # what a checkpoint is bound to
        # the student with its heads only: the objective's teacher-side heads are frozen
        self.optimizer = torch.optim.AdamW(param_groups([self.model]), lr=0.0, betas=(0.9, 0.999))
        self.guard = CollapseGuard(
            f"distill run '{self.out.name}'",
            cfg.collapse_floor,
            cfg.collapse_patience,
            n_prototypes=getattr(self.objective, "n_prototypes", None),
            ceiling=cfg.collapse_entropy_ceiling,
        )
        self.iteration = 0
        self.log_rows: list[dict] = []
        self.agreement_before: dict[str, float] = {}
        self._stop = False

    # ---- state -------------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint_dir / "checkpoint.pt"

    def state_dict(self) -> dict:
        """Everything an exact resume needs. The objective's heads (student and teacher side) and buffers
        (centres) are under "objective"; the backbone alone under "backbone"."""
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "backbone": self.model.backbone.state_dict(),
            "partner": None if self.model.partner is None else self.model.partner.state_dict(),
            "objective": self.objective.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "log": self.log_rows,
            "agreement_before": self.agreement_before,
            "collapse_guard": self.guard.state_dict(),
            "config": json.dumps(asdict(self.cfg), sort_keys=True),
            "inputs": self.inputs,
        }

    def save_checkpoint(self) -> None:
        save_checkpoint(
            self.checkpoint_path, self.state_dict() if self.rank == 0 else {}, self.rank, self.world
        )

    def stale_inputs(self, state: dict) -> list[str]:
        """The inputs (keys of `self.inputs`) a checkpoint's state was not trained on; all of them for a
        checkpoint that records none (written before checkpoints were bound to their inputs)."""
        return stale_inputs(state.get("inputs"), self.inputs)

    def maybe_resume(self) -> bool:
        """Load `checkpoint.pt` if there is one bound to the same inputs (True), else start over (False,
        with a warning naming the inputs that changed: tiles, teacher cache, heads, weights, settings).

        HistodistillError for a checkpoint of another format (e.g. one written before objectives were
        plug-ins): it cannot be resumed exactly, so it is never loaded in part."""
        state = read_checkpoint(
            self.checkpoint_path, CHECKPOINT_FORMAT, self.inputs, "objective state under its own key"
        )
        if state is None:
            return False
        self.model.backbone.load_state_dict(state["backbone"])
        if self.model.partner is not None:
            self.model.partner.load_state_dict(state["partner"])
        self.objective.load_state_dict(state["objective"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["torch_rng"])
        self.iteration, self.log_rows = int(state["iteration"]), list(state["log"])
        self.agreement_before = dict(state["agreement_before"])
        self.guard.load_state_dict(state.get("collapse_guard", {}))
        log.info("resumed %s at iteration %d", self.checkpoint_path, self.iteration)
        return True

    def _on_signal(self, signum, frame) -> None:
        log.warning("signal %d: checkpointing at the end of this iteration", signum)
        self._stop = True

    # ---- one step ----------------------------------------------------------------------------------
    def get_teacher_output(self, batch: dict) -> TeacherTokens:
        """Teacher CLS [2, B, Dt] and patch tokens [2, B, P, Dt] (None without patches): from the cache, the
        frozen teacher run on the teacher side's views (online), or the co-trained teacher branch (with
        gradient; Dt = the student's width)."""
        if self.cfg.teacher_mode == "cached":
            cls = batch["teacher_cls"].to(self.device).float().transpose(0, 1)  # fp16 in the batch
            patch = batch.get("teacher_patch")
            return TeacherTokens(
                cls, None if patch is None else patch.to(self.device).float().transpose(0, 1)
            )
        b = batch["teacher_globals"].shape[0]
        teacher_globals = finish_views(batch, "teacher_globals", self.device).transpose(0, 1).flatten(0, 1)
        if self.cotrained:
            spec = self.student_spec
            views = normalize(teacher_globals, spec.transform.mean, spec.transform.std)
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                tokens = self.ddp(views, teacher_branch=True).float()
            patch = tokens[:, spec.num_prefix_tokens :]
            return TeacherTokens(tokens[:, 0].reshape(2, b, -1), patch.reshape(2, b, patch.shape[1], -1))
        spec = self.teacher_spec
        views = normalize(teacher_globals, spec.transform.mean, spec.transform.std)
        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            tokens = self.teacher.forward_features(views).float()
        tokens = tokens.half().float()  # the cache's fp16 precision, so both modes see the same targets
        cls = tokens[:, 0].reshape(2, b, -1)
        patch = tokens[:, spec.num_prefix_tokens :]
        if self.cache_patch == "pool2":
            patch = pool_patches(patch)
        return TeacherTokens(cls, patch.reshape(2, b, patch.shape[1], -1))

    def get_student_output(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Student tokens of the 2 global views [2B, T, D] and CLS of the local views [L·B, D]."""
        mean, std = self.student_spec.transform.mean, self.student_spec.transform.std
        globals_ = finish_views(batch, "globals", self.device).transpose(0, 1).flatten(0, 1)
        globals_ = normalize(globals_, mean, std)
        locals_ = None
        if batch["locals"].shape[1]:
            locals_ = finish_views(batch, "locals", self.device).transpose(0, 1).flatten(0, 1)
            locals_ = normalize(locals_, mean, std)
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            tokens = self.ddp(globals_)
            local_cls = None if locals_ is None else self.ddp(locals_)[:, 0]
        return tokens, local_cls

    def compute_losses(
        self,
        teacher: TeacherTokens,
        student: tuple[torch.Tensor, torch.Tensor | None],
        step: StepState,
    ) -> tuple[dict[str, torch.Tensor], Any]:
        """The objective's loss terms (with "total") and its targets (for `update_state` after the step).

        `student`: get_student_output's (tokens [2B, T, D], local CLS [L·B, D] | None); its patch tokens
        are 2×2-pooled when the teacher's are (a pooled cache).
        """
        tokens, local_cls = student
        prefix = self.student_spec.num_prefix_tokens
        s_cls, s_patch = tokens[:, 0].float(), tokens[:, prefix:].float()
        if teacher.patch is not None and teacher.patch.shape[2] != s_patch.shape[1]:
            s_patch = pool_patches(s_patch)  # a 2×2-pooled cache: pool the student's grid alike
        with record_function("distill.teacher_targets"):
            targets = self.objective.teacher_targets(teacher, step)
        with record_function("distill.losses"):
            losses = self.objective.losses(StudentTokens(s_cls, s_patch, local_cls), targets, step)
        return losses, targets

    def step(self, batch: dict) -> dict[str, float]:
        """One iteration. Its phases are labelled for torch.profiler (`distill.<phase>`: teacher_output,
        student_forward, teacher_targets, losses, backward, optimizer, ema, monitors; no cost without a
        profiler), so a profile of a step (benchmarks/distill_step.py --profile) splits its time by phase."""
        it = self.iteration
        self.schedules.apply(self.optimizer, it)
        rows = batch.get("row")  # the samples' ids: per-sample draws of the objective are keyed by them
        state = StepState(iteration=it, teacher_temp=float(self.schedules.teacher_temp[it]), rows=rows)
        with record_function("distill.teacher_output"):
            teacher = self.get_teacher_output(batch)
        with record_function("distill.student_forward"):
            student = self.get_student_output(batch)
        losses, targets = self.compute_losses(teacher, student, state)
        self.optimizer.zero_grad(set_to_none=True)
        with record_function("distill.backward"):
            self.scaler.scale(losses["total"]).backward()
        with record_function("distill.optimizer"):
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            grad_norm = float(nn.utils.clip_grad_norm_(params, self.cfg.clip_grad))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with record_function("distill.ema"):
            ema_update(self.ema, self.model.backbone, float(self.schedules.ema_momentum[it]))
        with record_function("distill.monitors"):
            monitors = self.objective.monitors(targets, losses, state)
            self.objective.update_state(targets)
        names = [f"loss_{k}" for k in losses] + list(monitors)
        values = torch.stack(
            [v.detach().float().to(self.device) for v in [*losses.values(), *monitors.values()]]
        )
        if self.world > 1:  # log the global batch's figures (the mean of equal-sized local means)
            dist.all_reduce(values)
            values /= self.world
        return {k: float(v) for k, v in zip(names, values.cpu(), strict=True)} | {
            "lr": float(self.schedules.lr[it]),
            "weight_decay": float(self.schedules.weight_decay[it]),
            "teacher_temp": state.teacher_temp,
            "grad_norm": grad_norm,
        }

    # ---- agreement (proof it learns) ------------------------------------------------------------------
    @torch.no_grad()
    def agreement(self, backbone: nn.Module) -> dict[str, float]:
        """Teacher–student agreement on held-out tiles (cached view 0), tokens = CLS + patches.

        `cka`: linear CKA of the tokens (a few held-out tiles still give hundreds of samples per feature
        dimension); then the objective's own `holdout_metrics` (e.g. `feature_cos` of the `feature`
        objective: the objective itself measured on tiles it never trained on).
        """
        if not len(self.holdout_rows) or self.cache_patch == "none":
            return {"cka": float("nan")}
        # the student on its own (paired) input against the teacher's cached tokens of the teacher side
        views = DistillDataset(
            self.tiles, self.cache_path, 0, self.cfg.seed, cached=True, pairing=self.pairing
        )
        mean, std = self.student_spec.transform.mean, self.student_spec.transform.std
        prefix = self.student_spec.num_prefix_tokens
        feats_s, feats_t = [], []
        for row in self.holdout_rows:
            item = views[(int(row), 0)]  # epoch 0: the cached view pair (0, 1) and its teacher tokens
            tokens = backbone.forward_features(
                normalize(item["globals"][:1], mean, std).to(self.device)
            ).float()
            teacher_patch = item["teacher_patch"][0]
            patches = tokens[:, prefix:]
            if teacher_patch.shape[0] != patches.shape[1]:
                patches = pool_patches(patches)
            feats_s.append(torch.cat([tokens[:, :1], patches], 1)[0].cpu().numpy())
            feats_t.append(torch.cat([item["teacher_cls"][:1], teacher_patch], 0).float().numpy())
        student, teacher = np.concatenate(feats_s), np.concatenate(feats_t)
        out = {"cka": linear_cka(student, teacher)}
        return out | self.objective.holdout_metrics(
            torch.from_numpy(student).to(self.device), torch.from_numpy(teacher)
        )

    # ---- the loop ------------------------------------------------------------------------------------
    def fit(self, stop_after: int | None = None) -> dict:
        """Train to `cfg.iterations` (or stop, checkpointed, after `stop_after` iterations: tests) and
        export; a finished run removes its checkpoint. Raises what `maybe_resume` and `export` raise, and
        CollapseError when the collapse guard stops the run."""
        previous = {
            signal.SIGUSR1: signal.getsignal(signal.SIGUSR1),
            signal.SIGTERM: signal.getsignal(signal.SIGTERM),
        }
        for sig in previous:  # before anything else: a signal from here on ends in a checkpoint
            signal.signal(sig, self._on_signal)
        try:  # the handlers go back whatever happens (e.g. a checkpoint that cannot be resumed)
            stopped = self._train(stop_after)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if stopped is not None:
            return stopped
        self.save_checkpoint()  # an export that fails is retried from here
        summary = self.export()
        if self.rank == 0:  # done: the declared outputs are written, nothing is left to resume
            self.checkpoint_path.unlink(missing_ok=True)
        return summary

    def _train(self, stop_after: int | None) -> dict | None:
        """fit's loop, under its signal handlers: {"stopped_at": k} when it stopped early, else None."""
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if not self.maybe_resume():
            self.agreement_before = self.agreement(self.model.backbone)
        dataset = DistillDataset(
            self.tiles,
            self.cache_path,
            cfg.n_local,
            cfg.seed,
            cached=cfg.teacher_mode == "cached",
            pairing=self.pairing,
            photometric=False,  # finished batched on self.device (get_student_output, get_teacher_output)
        )
        sampler = EpochSampler(
            self.train_rows, cfg.seed, self.rank, self.world, start=self.iteration * self.local_batch
        )
        loader = DataLoader(
            dataset,
            batch_size=self.local_batch,
            sampler=sampler,
            num_workers=cfg.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        self.model.train()
        self.objective.train()
        log.info(
            "distilling %s from %s (%s teacher): rank=%d world_size=%d device=%s batch=%d (%d per process)",
            cfg.student,
            cfg.teacher,
            cfg.teacher_mode,
            self.rank,
            self.world,
            self.device,
            cfg.batch_size,
            self.local_batch,
        )
        t0, seen = time.perf_counter(), 0
        progress = _progress(self.rank == 0 and sys.stderr.isatty(), cfg.iterations, self.iteration)
        try:
            for batch in loader:
                if self.iteration >= cfg.iterations:
                    break
                row = self.step(batch) | {"iteration": self.iteration}
                seen += self.local_batch * self.world
                row["samples_per_s"] = seen / (time.perf_counter() - t0)
                row["gpu_mem_gb"] = (
                    torch.cuda.max_memory_allocated(self.device) / 2**30
                    if self.device.type == "cuda"
                    else 0.0
                )
                self.log_rows.append(row)
                self.iteration += 1
                try:
                    self.guard.update(self.iteration - 1, row)
                except CollapseError:
                    if self.rank == 0:  # the evidence first: the log and its plot up to the collapse
                        self._write_log()
                    raise
                progress.update(self.iteration, row["loss_total"])
                if self.rank == 0 and (self.iteration % 10 == 0 or self.iteration == cfg.iterations):
                    log.info(
                        "it %d/%d loss %.4f lr %.2e T %.3f %.1f samples/s",
                        self.iteration,
                        cfg.iterations,
                        row["loss_total"],
                        row["lr"],
                        row["teacher_temp"],
                        row["samples_per_s"],
                    )
                stop_now = self._stop or (stop_after is not None and self.iteration >= stop_after)
                if self.iteration % cfg.checkpoint_every == 0 or stop_now:
                    self.save_checkpoint()
                if stop_now:
                    return {"stopped_at": self.iteration}
        finally:
            progress.close()
        return None

    def _write_log(self) -> None:
        """train_log.parquet (one row per iteration: losses, schedules, monitors) and loss.png, atomically."""
        frame = pd.DataFrame(self.log_rows)
        with atomic_path(self.out / "train_log.parquet") as tmp:
            frame.to_parquet(tmp, index=False)
        plot_train_log(
            frame,
            self.out / "loss.png",
            f"distill {self.out.name}",
            floor=self.cfg.collapse_floor,
            n_prototypes=getattr(self.objective, "n_prototypes", None),
            ceiling=self.cfg.collapse_entropy_ceiling,
        )

    def export(self) -> dict:
        """student.safetensors, student_ema.safetensors, train_log.parquet, loss.png, agreement.json."""
        self.model.eval()
        self.objective.eval()
        before, after, after_ema = (
            self.agreement_before,
            self.agreement(self.model.backbone),
            self.agreement(self.ema),
        )
        summary = {"iterations": self.iteration}
        for key in after:
            summary[f"agreement_{key}_before"] = before.get(key, float("nan"))
            summary[f"agreement_{key}_after"] = after[key]
            summary[f"agreement_{key}_after_ema"] = after_ema[key]
        if self.rank == 0:
            meta = provenance(
                asdict(self.cfg), teacher_cache=str(self.cache_path), tiles=str(self.tiles), **summary
            )
            extra = {"provenance": meta}
            save_student(self.model.backbone, self.student_spec, self.out / "student.safetensors", extra)
            save_student(self.ema, self.student_spec, self.out / "student_ema.safetensors", extra)
            self._write_log()
            with atomic_path(self.out / "agreement.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
            for key in after:
                log.info(
                    "teacher–student agreement (%s, held-out tiles): %.4f → %.4f (EMA %.4f)",
                    key,
                    before.get(key, float("nan")),
                    after[key],
                    after_ema[key],
                )
        return summary


class _progress:
    """A rich progress bar with ETA on a terminal; nothing otherwise (log files get plain lines)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("distill"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} it"),
                TextColumn("loss {task.fields[loss]:.4f}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("distill", total=total, completed=done, loss=float("nan"))
            self.bar.start()

    def update(self, done: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=done, loss=loss)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _check_heads_teacher(heads_path: str, teacher: str) -> None:
    """HistodistillError when a heads file records another teacher than the cache's (files without the
    record, e.g. heads converted from a release, are accepted)."""
    from histodistill.distill.teacher_heads import read_heads

    recorded = read_heads(heads_path)[1].get("teacher")
    if recorded is not None and recorded != teacher:
        raise HistodistillError(
            f"teacher heads {heads_path} were trained on {recorded}'s tokens, the cache holds {teacher}'s"
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point for torchrun:
    python -m histodistill.distill.trainer CONFIG.json TILES CACHE OUT_DIR [CHECKPOINT_DIR]."""
    args = argv or sys.argv[1:]
    config_path, tiles, cache, out = args[:4]
    checkpoint_dir = args[4] if len(args) > 4 else None
    cfg = DistillConfig(**json.loads(Path(config_path).read_text()))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    trainer = Trainer(cfg, tiles, cache, out, checkpoint_dir=checkpoint_dir)
    result = trainer.fit()
    if dist.is_initialized():
        dist.destroy_process_group()
    return EXIT_REQUEUE if "stopped_at" in result else 0


if __name__ == "__main__":
    sys.exit(main())
