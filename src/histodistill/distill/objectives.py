"""Distillation objectives as plug-ins: each one owns its heads/adapters, its teacher targets, its loss
terms and its state (centres), and the trainer only calls the interface of `Objective`.

One training step, as the trainer drives it (see `Objective`):

    targets = objective.teacher_targets(teacher_tokens, step)        # no grad, ever
    losses = objective.losses(student_tokens, targets, step)         # {"<term>": scalar, ..., "total": scalar}
    monitors = objective.monitors(targets, losses, step)             # collapse monitors (distill/monitors.py)
    losses["total"].backward(); optimizer.step()
    objective.update_state(targets)                                  # e.g. the centre EMA, all-reduced

Per-step schedule values (the teacher temperature) come in `StepState`, passed to every call; nothing is
stashed on the objective between calls. `objective.state_dict()` holds everything it needs to resume (its
student-side heads, its teacher-side heads, its centre buffers); the trainer writes it under its own key.

To add an objective: subclass `Objective` here, add it to `OBJECTIVES`, and add its name to the
`objective` enum in src/histodistill/schema.yaml (its options, if any, arrive as `objective_params`, parsed by
the class's `Options` dataclass). docs/architecture.md lists the steps.

Sources: DINO/iBOT heads, centering and loss terms follow DINOv2's `SSLMetaArch`
(facebookresearch/dinov2, dinov2/train/ssl_meta_arch.py: `get_teacher_output`, `forward_backward`) and
dinov3's `SSLMetaArch` without masking; the `feature` objective is plain token regression through a
linear adapter (cosine + smooth-L1, as in `losses.feature_loss`); `vicreg` and `simclr` are the seed paper's
joint-embedding losses with its expander (Farndale et al., "More From Less"; `losses.vicreg_terms`,
`losses.nt_xent`), against a frozen teacher or a co-trained teacher branch (`JointEmbedding`).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import torch
from torch import nn

from histodistill.distill.centering import SoftmaxCenter, sinkhorn_center, sinkhorn_knopp
from histodistill.distill.heads import ProjectionHead
from histodistill.distill.losses import (
    Expander,
    FeatureAdapter,
    VicregTerms,
    dino_loss,
    dino_pair_weight,
    feature_loss,
    ibot_loss_from_probs,
    koleo_loss,
    nt_xent,
    softmax_targets_,
    vicreg_terms,
)
from histodistill.distill.monitors import TargetStats
from histodistill.errors import HistodistillError

if TYPE_CHECKING:  # the trainer imports this module; the config is only read here, duck-typed
    from histodistill.distill.trainer import DistillConfig


class TeacherTokens(NamedTuple):
    """The teacher's tokens of the two global views (after its final norm; fp16 precision, as float32).

    cls: [2, B, Dt]; patch: [2, B, P, Dt] (P = the cache's grid: full, or 2×2-pooled), or None when the
    cache holds no patch tokens.
    """

    cls: torch.Tensor
    patch: torch.Tensor | None


class StudentTokens(NamedTuple):
    """The student's tokens, views flattened view-major (row v·B + b is view v of sample b).

    cls: [2B, D] float32 (global views); patch: [2B, P, D] float32, already pooled to the teacher's grid;
    local_cls: [L·B, D] CLS of the local views in the autocast dtype, or None without local crops.
    """

    cls: torch.Tensor
    patch: torch.Tensor
    local_cls: torch.Tensor | None


@dataclass(frozen=True)
class StepState:
    """Per-step values an objective may read: the iteration, the scheduled teacher temperature and the
    batch's sample ids `rows` (int [B], the tile store rows of this process's samples, in batch order; None:
    the positions 0..B−1 stand in for them), which key per-sample random draws (`ibot_positions`) so that
    they depend on the sample, not on the process or the batch split."""

    iteration: int
    teacher_temp: float
    rows: torch.Tensor | None = None


@dataclass(frozen=True)
class NoOptions:
    """Options of an objective that takes none (any `objective_params` key is then an error)."""


class Objective(nn.Module):
    """Base class of a distillation objective (an nn.Module, so its state_dict is its checkpoint state).

    Submodules by role:
    - `student_heads` (nn.ModuleDict): heads/adapters applied to the student's tokens, trained with the
      student; the trainer puts them into the module it wraps in DistributedDataParallel, so their
      gradients are all-reduced.
    - `teacher_heads` (nn.ModuleDict): heads applied to the teacher's tokens, always frozen in
      distillation (no gradient reaches them: DINOv2 never lets gradient into teacher targets); the
      teacher-heads stage (`distill.teacher_heads`) keeps them as an EMA of `student_heads`.
    - buffers (e.g. centres): state updated by `update_state`, saved with the state_dict.

    Subclasses set `name`, `Options` (a frozen dataclass of the `objective_params` they accept), and
    implement `teacher_targets`, `losses` and, if they keep state, `update_state`; `monitors` if they have
    target distributions to watch for collapse.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    # the `teacher_mode`s it runs under: a frozen teacher (cached, online) unless it co-trains the teacher
    # branch (distill.trainer builds that branch's encoder, shared or separate; its tokens carry gradient)
    teacher_modes: ClassVar[tuple[str, ...]] = ("cached", "online")

    def __init__(self) -> None:
        super().__init__()
        self.student_heads = nn.ModuleDict()
        self.teacher_heads = nn.ModuleDict()

    @classmethod
    def options(cls, params: dict[str, Any] | None) -> Any:
        """`objective_params` → the class's `Options`; HistodistillError naming unknown keys."""
        params = dict(params or {})
        known = {f.name for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise HistodistillError(
                f"objective {cls.name!r} has no option(s) {unknown} in objective_params "
                f"(it takes: {sorted(known) or 'none'})"
            )
        return cls.Options(**params)

    def teacher_targets(self, teacher: TeacherTokens, step: StepState) -> Any:
        """The targets of this step from the teacher's tokens: without gradient (detached) for a frozen
        teacher; a co-trained teacher branch (`teacher_modes` with `cotrained_*`) keeps its gradient."""
        raise NotImplementedError

    def losses(self, student: StudentTokens, targets: Any, step: StepState) -> dict[str, torch.Tensor]:
        """Named scalar loss terms and their weighted sum under "total" (the one the trainer backpropagates)."""
        raise NotImplementedError

    @torch.no_grad()
    def monitors(
        self, targets: Any, losses: dict[str, torch.Tensor], step: StepState
    ) -> dict[str, torch.Tensor]:
        """Scalar figures logged every iteration (none by default): for objectives with target
        distributions, the collapse monitors of `distill.monitors` (`<head>_entropy`,
        `<head>_eff_prototypes`, `<head>_kl`) and the effective loss weights (`weight_<term>_eff`). Called
        on every process in the same order (it may all-reduce); the trainer averages the values over
        processes like the losses."""
        return {}

    @torch.no_grad()
    def update_state(self, targets: Any) -> None:
        """After the optimiser step: update the objective's state (nothing by default)."""

    @torch.no_grad()
    def holdout_metrics(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
        """Objective-specific agreement on held-out tokens (student [N, D], teacher [N, Dt]); none by default."""
        return {}


def build_teacher_heads(cfg: DistillConfig, teacher_dim: int) -> nn.ModuleDict:
    """The DINO and iBOT heads on the teacher's tokens, frozen (no parameter requires grad).

    `cfg.teacher_heads`: `frozen` — seeded random heads (seed `cfg.seed + 7919` under a forked RNG, so they
    depend only on the seed and building them does not move the global RNG; tests only: random heads give
    arbitrary targets); or the path of a heads file written by the teacher-heads stage
    (`distill.teacher_heads.save_heads`, `histodistill train-heads`), whose recorded architecture must be
    the run's (`n_prototypes`, `head_hidden`, `dino_bottleneck`, `ibot_bottleneck`, the teacher's width).
    The workflow replaces `trained` by the `train_teacher_heads` output before the run starts.

    HistodistillError: `learned` (removed: learning the teacher heads jointly let gradient into the targets),
    `trained` outside the workflow, a missing file, or a file of other dimensions.
    """
    if cfg.teacher_heads in ("learned", "trained"):
        raise HistodistillError(
            f"teacher_heads: {cfg.teacher_heads} is not a heads file: "
            + (
                "the joint `learned` mode was removed (gradient reached the teacher head through its own "
                "targets); learn the heads first with `histodistill train-heads` (rule train_teacher_heads) "
                "and use `teacher_heads: trained`"
                if cfg.teacher_heads == "learned"
                else "`trained` is resolved by the workflow to the train_teacher_heads output; outside "
                "Snakemake give the path of a heads file from `histodistill train-heads`"
            )
        )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 7919)  # recorded: the heads depend only on the seed
        heads = nn.ModuleDict(
            {
                "dino": ProjectionHead(teacher_dim, cfg.n_prototypes, cfg.head_hidden, cfg.dino_bottleneck),
                "ibot": ProjectionHead(teacher_dim, cfg.n_prototypes, cfg.head_hidden, cfg.ibot_bottleneck),
            }
        )
    if cfg.teacher_heads != "frozen":
        from histodistill.distill.teacher_heads import read_heads

        state, meta = read_heads(cfg.teacher_heads)
        wanted = {
            "teacher_dim": teacher_dim,
            "n_prototypes": cfg.n_prototypes,
            "head_hidden": cfg.head_hidden,
            "dino_bottleneck": cfg.dino_bottleneck,
            "ibot_bottleneck": cfg.ibot_bottleneck,
        }
        arch = meta.get("architecture", {})
        differ = {k: (arch[k], v) for k, v in wanted.items() if k in arch and arch[k] != v}
        if differ:
            raise HistodistillError(
                f"teacher heads {cfg.teacher_heads} do not fit this run: "
                + ", ".join(f"{k} {a} in the file, {b} in the run" for k, (a, b) in differ.items())
                + " (distill.teacher_heads settings and the run's must agree)"
            )
        try:
            heads.load_state_dict(state)
        except RuntimeError as exc:
            raise HistodistillError(f"teacher heads {cfg.teacher_heads} do not fit this run: {exc}") from exc
    heads.requires_grad_(False)
    return heads


# the stream of `ibot_positions` (seed, tag, iteration, row): apart from every other draw keyed by the seed
IBOT_POSITIONS_TAG = 0x1B07


def ibot_positions(
    seed: int, step: StepState, batch: int, n_patches: int, n: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The patch positions that carry the iBOT loss this step: int64 [2, B, n'] with n' = min(n, P), for
    each of the two global views of each sample `n'` distinct positions of its P = `n_patches`, drawn
    uniformly without replacement and sorted (n ≥ P: all of them, 0..P−1, in order).

    Drawn from `numpy.random.default_rng([seed, IBOT_POSITIONS_TAG, step.iteration, row])` per sample
    (`row` from `step.rows`, else the sample's place in the batch): a function of the run's seed, the
    iteration and the sample alone, so an exact resume (the iteration is restored) and a run split over
    processes (each draws for its own rows) draw the same positions as one uninterrupted process. A tile
    that occurs twice in one batch (an epoch boundary inside it) gets the same positions twice. Cost: one
    generator per sample on the host, 2.1 ms for 64 tiles × 64 positions (1 CPU thread, measured), queued
    after the student's forward is launched, so on a GPU it can overlap it (not measured on one).
    HistodistillError for n < 1 or a `rows` of another length than `batch`.
    """
    if n < 1:
        raise HistodistillError(f"ibot_patches must be at least 1 (or null: every token), not {n}")
    rows = range(batch) if step.rows is None else [int(r) for r in step.rows]
    if len(rows) != batch:
        raise HistodistillError(f"StepState.rows has {len(rows)} sample ids for a batch of {batch}")
    k = min(n, n_patches)
    keys = np.stack(
        [
            np.random.default_rng([seed, IBOT_POSITIONS_TAG, step.iteration, r]).random((2, n_patches))
            for r in rows
        ]
    )  # [B, 2, P]
    pick = np.sort(np.argsort(keys, axis=-1, kind="stable")[..., :k], axis=-1)
    return torch.from_numpy(pick.transpose(1, 0, 2).copy()).to(device)


def take_positions(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`tokens` [V, B, P, C] or [V·B, P, C] at `index` [V, B, n] (positions along P): [V, B, n, C] or
    [V·B, n, C] (gather: the gradient flows back to the chosen tokens only)."""
    flat = tokens.dim() == 3
    idx = index.flatten(0, 1) if flat else index
    return tokens.gather(-2, idx[..., None].expand(*idx.shape, tokens.shape[-1]))


HEAD_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def head_autocast_dtype(head_precision: str) -> torch.dtype | None:
    """`head_precision` → the autocast dtype of the DINO/iBOT heads' matmuls (None: float32).

    `fp32`: the heads run in float32 outside autocast (the default; the CPU demo's numbers).
    `bf16`: their linear layers (MLP and the K-prototype layer) run under bf16 autocast, forward and
    backward, their weights kept in float32 (AMP's master weights), and their logits come out in bf16;
    centering, softmax, Sinkhorn-Knopp, the losses and the monitors stay in float32 (the logits are taken
    to float32 first). This is DINOv2's practice (facebookresearch/dinov2, configs/ssl_default_config.yaml
    `compute_precision`: the student's and teacher's `dino_head` and `ibot_head` with FSDP
    `param_dtype: fp16`), in bf16 rather than fp16 (no loss scaling; bf16 autocast also runs on a CPU).
    HistodistillError for another value.
    """
    if head_precision not in HEAD_PRECISIONS:
        raise HistodistillError(
            f"head_precision must be one of {sorted(HEAD_PRECISIONS)}, not {head_precision!r}"
        )
    return HEAD_PRECISIONS[head_precision]


@dataclass
class DinoIbotTargets:
    """All detached. dino_probs: [2, B, K] teacher distributions of the two global views. dino_logits:
    [2B, K] teacher DINO logits (for the centre). ibot_probs: [2B·P, K] the teacher's iBOT targets
    softmax((u − c) / τ) (float32, made in place of the logits u by `losses.softmax_targets_`), or None
    when iBOT is off or there are no patch tokens. ibot_center: [1, K] their centre c: the EMA centre
    under softmax centering, the Sinkhorn-Knopp centre (`centering.sinkhorn_center`) under `centering:
    sinkhorn`. ibot_logit_sum: [1, K] the column sum of u (for the EMA centre's update; None under
    Sinkhorn). ibot_stats: the collapse monitors' sums of the targets, taken in the same pass.
    ibot_index: int64 [2, B, n] the patch positions the iBOT rows are taken at (`ibot_positions`; P = n of
    them per view, so the rows are [2·B·n, K]), or None: every position (P per view)."""

    dino_probs: torch.Tensor
    dino_logits: torch.Tensor
    ibot_probs: torch.Tensor | None
    ibot_center: torch.Tensor
    ibot_logit_sum: torch.Tensor | None = None
    ibot_stats: TargetStats | None = None
    ibot_index: torch.Tensor | None = None
    teacher_cls: torch.Tensor | None = None


@dataclass(frozen=True)
class DinoIbotOptions:
    """`objective_params` of dino_ibot: `koleo_weight`, the weight of DINOv2's KoLeo regularizer on the
    student's CLS tokens (losses.koleo_loss, summed over the two global crops as DINOv2's train loop does;
    DINOv2's default 0.1; 0 = off, the default here). `feature_weight`, the weight of a head-free term on
    the CLS token beside DINO+iBOT: losses.feature_loss ((1 − cosine) + smooth-L1) between the student's CLS
    through a linear adapter (student head `adapter`, D → Dt) and the teacher's CLS, over both global views
    (0 = off, the default; the demo's run uses 0.3, README "Distillation section")."""

    koleo_weight: float = 0.0
    feature_weight: float = 0.0


class DinoIbot(Objective):
    """DINO on the CLS token (global crops, plus local crops) + iBOT on the patch tokens (all of them, or a
    random subset per view: `ibot_patches`), without masking.

    L = w_dino · L_dino + ibot_weight · L_ibot with L_dino the mean cross-entropy over (teacher global view,
    other student view) pairs (losses.dino_loss; the logged `loss_dino`), L_ibot the mean over patch tokens
    (losses.ibot_loss), and w_dino = dino_weight · losses.dino_pair_weight(dino_normalization, 2, n_local)
    (`paper`: 1; `dinov2`: DINOv2's code, 2/3 without local crops). Teacher targets by softmax centering
    with EMA centres (momentum `center_momentum`) or Sinkhorn-Knopp for both DINO and iBOT (`centering`),
    at the scheduled teacher temperature, never with gradient. Student heads: `dino`, `ibot`
    (ProjectionHead, K = n_prototypes); teacher heads: `build_teacher_heads` (frozen), or with
    `ema_teacher` a frozen copy of the student heads that the caller updates as their EMA (the
    teacher-heads stage). Buffers: `centers.dino.center`, `centers.ibot.center` ([1, K]). The heads'
    matmuls run in `head_precision` (`head_autocast_dtype`: float32, or bf16 under autocast with the
    logits taken to float32 before centering, softmax and the losses).

    `ibot_patches` (`cfg.ibot_patches`, None: every token): the iBOT term on n random positions of each
    global view's P patch tokens (the pooled grid's, under `pool2`), drawn per step and sample by
    `ibot_positions` from the run's seed, the same positions for the teacher and the student. They are
    taken from the backbones' tokens *before* either iBOT head runs, so the heads' matmuls and the
    [N, K] logits, softmax and loss passes shrink by P / n (8 of 64: 8×). L_ibot is then the mean over the
    2·B·n drawn tokens: under softmax centering (each target depends on its own token and the centre only)
    an unbiased estimate of the all-token loss and of its gradient; under Sinkhorn-Knopp the targets are
    balanced over the drawn tokens (as DINOv2 balances them over its masked tokens). The iBOT centre's
    update (the column mean of the drawn tokens' logits) and the iBOT collapse monitors (`ibot_entropy`,
    `ibot_eff_prototypes`, `ibot_kl`) are taken over the drawn tokens too. Deliberate deviation from
    DINOv2 (facebookresearch/dinov2, data/collate.py and data/masking.py: a 0.1-0.5 share of the patches
    masked in half of the global crops, ~15 % of the tokens on average; ssl_meta_arch.py: the iBOT loss on
    the masked tokens only): the student's input is never masked (it sees the whole view, as the teacher),
    and the loss covers a uniform random subset instead of the masked tokens: the saving of DINOv2's
    masked-token loss without its masked-image-modelling task. The teacher-heads stage subsamples alike
    (`distill.teacher_heads.ibot_patches`).

    With `objective_params.koleo_weight` w > 0 the total adds w · Σ_crops KoLeo(student CLS of the crop)
    (`DinoIbotOptions`; logged as `loss_koleo`). With `objective_params.feature_weight` w > 0 it adds
    w · feature_loss(adapter(student CLS), teacher CLS) (logged as `loss_feature`): the `feature`
    objective's regression, on the CLS only, beside the heads' targets. Not in DINOv2 or the H0-mini recipe
    (a deviation, off by default): it anchors the student's CLS geometry to the teacher's where the heads'
    targets alone leave it free (on the demo's 23 distillation tiles, README "Distillation section").

    HistodistillError if iBOT is on (ibot_weight > 0) but the teacher gives no patch tokens, or for
    `ibot_patches` < 1.
    """

    name = "dino_ibot"
    Options = DinoIbotOptions

    def __init__(
        self,
        cfg: DistillConfig,
        student_dim: int,
        teacher_dim: int,
        teacher_patches: bool,
        ema_teacher: bool = False,
    ):
        super().__init__()
        options = self.options(cfg.objective_params)
        self.koleo_weight, self.feature_weight = options.koleo_weight, options.feature_weight
        if cfg.ibot_weight > 0 and not teacher_patches:
            raise HistodistillError(
                "the iBOT loss needs patch tokens: cache them (teacher.patch_tokens: full|pool2)"
            )
        self.n_prototypes, self.student_temp = cfg.n_prototypes, cfg.student_temp
        self.dino_weight, self.ibot_weight, self.ibot_chunk = cfg.dino_weight, cfg.ibot_weight, cfg.ibot_chunk
        self.centering = cfg.centering
        if cfg.ibot_patches is not None and cfg.ibot_patches < 1:
            raise HistodistillError(
                f"ibot_patches must be at least 1 (or null: every token), not {cfg.ibot_patches}"
            )
        self.ibot_patches, self.seed = cfg.ibot_patches, cfg.seed
        self.dino_pair_weight = dino_pair_weight(cfg.dino_normalization, 2, cfg.n_local)
        self.head_dtype = head_autocast_dtype(cfg.head_precision)
        # student heads first (global RNG, in this order), then the teacher's (their own seed)
        self.student_heads["dino"] = ProjectionHead(
            student_dim, cfg.n_prototypes, cfg.head_hidden, cfg.dino_bottleneck
        )
        self.student_heads["ibot"] = ProjectionHead(
            student_dim, cfg.n_prototypes, cfg.head_hidden, cfg.ibot_bottleneck
        )
        if self.feature_weight > 0:  # after the DINO/iBOT heads: their init is unchanged
            self.student_heads["adapter"] = FeatureAdapter(student_dim, teacher_dim)
        if ema_teacher:
            self.teacher_heads = copy.deepcopy(self.student_heads).requires_grad_(False)
        else:
            self.teacher_heads = build_teacher_heads(cfg, teacher_dim)
        self.centers = nn.ModuleDict(
            {k: SoftmaxCenter(cfg.n_prototypes, cfg.center_momentum) for k in ("dino", "ibot")}
        )

    def teacher_targets(self, teacher: TeacherTokens, step: StepState) -> DinoIbotTargets:
        """The DINO targets [2, B, K] and the iBOT targets [2B·P, K] of this step, without gradient
        (with `ibot_patches` n: [2B·n, K] at the positions `ibot_positions` draws, kept in the targets'
        `ibot_index` for `losses`; the tokens are taken before the teacher's iBOT head runs).

        The iBOT targets are made once here, in place of the teacher head's logits, with the monitors'
        sums and (softmax centering) the logits' column sum for the centre in the same pass; the loss,
        the monitors and `update_state` read them instead of recomputing the softmax from the logits (the
        previous code took it three times per step). Same numbers: the same operations on the same chunks
        (tests/unit/test_distill_step_cost.py checks losses, gradients, monitors and centres against it).
        """
        b = teacher.cls.shape[1]
        use_ibot = teacher.patch is not None and self.ibot_weight > 0
        t_ibot, logit_sum, stats, index = None, None, None, None
        with torch.no_grad():  # no gradient ever reaches a teacher head through its targets
            patch = teacher.patch
            if use_ibot and self.ibot_patches is not None:  # the drawn positions, before the head runs
                index = ibot_positions(self.seed, step, b, patch.shape[2], self.ibot_patches, patch.device)
                patch = take_positions(patch, index)  # [2, B, n, Dt]
            with self.head_autocast(teacher.cls):  # the heads' matmuls (bf16 with head_precision: bf16)
                t_dino = self.teacher_heads["dino"](teacher.cls.flatten(0, 1))  # [2B, K]
                if use_ibot:
                    t_ibot = self.teacher_heads["ibot"](patch.flatten(0, 2))  # [2B·P, K] (P: n drawn)
            t_dino = t_dino.float()  # centering, softmax, Sinkhorn and the monitors in float32
            if t_ibot is not None:
                t_ibot = t_ibot.float()
            if self.centering == "sinkhorn":
                probs = sinkhorn_knopp(t_dino, step.teacher_temp)
                ibot_center = (
                    sinkhorn_center(t_ibot, step.teacher_temp, chunk=self.ibot_chunk)
                    if t_ibot is not None
                    else self.centers["ibot"].center.clone()
                )
            else:
                probs = self.centers["dino"].probs(t_dino, step.teacher_temp)
                ibot_center = self.centers["ibot"].center.clone()
                if t_ibot is not None:
                    logit_sum = t_ibot.sum(dim=0, keepdim=True)
            if t_ibot is not None:
                n_rows = t_ibot.shape[0]
                t_ibot, ent, probs_sum = softmax_targets_(
                    t_ibot, ibot_center, step.teacher_temp, self.ibot_chunk
                )
                stats = TargetStats(torch.tensor(float(n_rows), device=t_ibot.device), ent, probs_sum)
        return DinoIbotTargets(
            teacher_cls=teacher.cls.flatten(0, 1).detach() if self.feature_weight > 0 else None,
            dino_probs=probs.reshape(2, b, -1),
            dino_logits=t_dino,
            ibot_probs=t_ibot,
            ibot_center=ibot_center,
            ibot_logit_sum=logit_sum,
            ibot_stats=stats,
            ibot_index=index,
        )

    def losses(self, student: StudentTokens, targets: DinoIbotTargets, step: StepState) -> dict:
        b = targets.dino_probs.shape[1]
        t_probs = targets.dino_probs
        with self.head_autocast(student.cls):  # the losses take the logits to float32 themselves
            s_dino = self.student_heads["dino"](student.cls).reshape(2, b, -1)
            local = None
            if student.local_cls is not None:
                local = self.student_heads["dino"](student.local_cls.float())
            s_ibot = None
            if targets.ibot_probs is not None:
                s_patch = student.patch  # [2B, P, D]; the teacher's drawn positions, before the head
                if targets.ibot_index is not None:
                    s_patch = take_positions(s_patch, targets.ibot_index)  # [2B, n, D]
                s_ibot = self.student_heads["ibot"](s_patch.reshape(-1, s_patch.shape[-1]))
        students = [s_dino[0], s_dino[1]]
        if local is not None:
            students += list(local.reshape(-1, b, self.n_prototypes))
        losses = {"dino": dino_loss([t_probs[0], t_probs[1]], students, self.student_temp)}
        total = self.dino_weight * self.dino_pair_weight * losses["dino"]
        if s_ibot is not None:
            losses["ibot"] = ibot_loss_from_probs(
                s_ibot, targets.ibot_probs, self.student_temp, self.ibot_chunk
            )
            total = total + self.ibot_weight * losses["ibot"]
        if self.koleo_weight > 0:
            losses["koleo"] = sum(koleo_loss(c) for c in student.cls.float().reshape(2, b, -1))
            total = total + self.koleo_weight * losses["koleo"]
        if self.feature_weight > 0:
            losses["feature"] = feature_loss(self.student_heads["adapter"](student.cls), targets.teacher_cls)
            total = total + self.feature_weight * losses["feature"]
        losses["total"] = total
        return losses

    def head_autocast(self, like: torch.Tensor) -> torch.autocast:
        """The precision context of the heads' forward passes on `like`'s device: bf16 autocast with
        `head_precision: bf16`; with `fp32`, autocast switched off (the heads in float32 even inside an
        autocast region)."""
        return torch.autocast(like.device.type, dtype=torch.bfloat16, enabled=self.head_dtype is not None)

    @torch.no_grad()
    def monitors(self, targets: DinoIbotTargets, losses: dict, step: StepState) -> dict[str, torch.Tensor]:
        """`dino_*` and (with iBOT) `ibot_*` entropy / eff_prototypes / kl (distill.monitors) of this step's
        targets, and `weight_dino_eff` (dino_weight × the pair normalisation), `weight_ibot_eff` (and
        `weight_koleo_eff`, `weight_feature_eff` when those terms are on).

        KL(teacher ‖ student) is CE − H(t): for DINO, the mean over the loss's pairs, where every teacher
        global view appears equally often, so the mean target entropy of the teacher rows is the pairs' mean.
        The iBOT figures are the sums `teacher_targets` took with the targets (no pass of their own).
        """
        out = TargetStats.of_probs(targets.dino_probs).figures("dino", losses["dino"])
        device = targets.dino_probs.device
        out["weight_dino_eff"] = torch.tensor(self.dino_weight * self.dino_pair_weight, device=device)
        if targets.ibot_stats is not None:
            out |= targets.ibot_stats.figures("ibot", losses["ibot"])
            out["weight_ibot_eff"] = torch.tensor(float(self.ibot_weight), device=device)
        for name, weight in (("koleo", self.koleo_weight), ("feature", self.feature_weight)):
            if weight > 0:  # the optional terms' weights beside DINO's and iBOT's (the weights panel)
                out[f"weight_{name}_eff"] = torch.tensor(float(weight), device=device)
        return out

    @torch.no_grad()
    def update_state(self, targets: DinoIbotTargets) -> None:
        """Softmax centering: the centres' EMA over the global batch (all-reduced under DDP)."""
        if self.centering != "softmax":
            return
        self.centers["dino"].update(targets.dino_logits)
        if targets.ibot_logit_sum is not None:
            self.centers["ibot"].update_from_sum(targets.ibot_logit_sum, targets.ibot_probs.shape[0])


class Feature(Objective):
    """Head-free token regression: (1 − cosine) + smooth-L1 between the teacher's tokens and the student's
    tokens through a linear adapter (student head `adapter`, D → Dt), over CLS + patch tokens of both global
    views (CLS only without patch tokens). No teacher heads, no state.
    """

    name = "feature"

    def __init__(self, cfg: DistillConfig, student_dim: int, teacher_dim: int, teacher_patches: bool):
        super().__init__()
        self.options(cfg.objective_params)
        self.student_heads["adapter"] = FeatureAdapter(student_dim, teacher_dim)

    def teacher_targets(self, teacher: TeacherTokens, step: StepState) -> torch.Tensor:
        """[2B, 1 + P, Dt] (or [2B, 1, Dt]): CLS then patch tokens per view, detached."""
        cls = teacher.cls.flatten(0, 1)[:, None]
        tokens = cls if teacher.patch is None else torch.cat([cls, teacher.patch.flatten(0, 1)], 1)
        return tokens.detach()

    def losses(self, student: StudentTokens, targets: torch.Tensor, step: StepState) -> dict:
        s_all = student.cls[:, None]
        if targets.shape[1] > 1:
            s_all = torch.cat([s_all, student.patch], 1)
        loss = feature_loss(self.student_heads["adapter"](s_all), targets)
        return {"total": loss, "feature": loss}

    @torch.no_grad()
    def holdout_metrics(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
        """`feature_cos`: mean cosine between the adapter-mapped student tokens and the teacher's."""
        mapped = self.student_heads["adapter"](student).float().cpu()
        cos = nn.functional.cosine_similarity(mapped, teacher.float().cpu(), dim=-1)
        return {"feature_cos": float(cos.mean())}


@dataclass(frozen=True)
class ExpanderOptions:
    """The expander of the joint-embedding objectives (losses.Expander): `expander_layers` dense layers of
    width `expander_dim` (the seed paper and VICReg: 3 × 8192), BatchNorm before each ReLU (VICReg's
    `Projector`) unless `expander_bn` is false."""

    expander_dim: int = 8192
    expander_layers: int = 3
    expander_bn: bool = True


@dataclass(frozen=True)
class VicregOptions(ExpanderOptions):
    """VICReg's coefficients: λ (invariance) = μ (variance) = 25, ν (covariance) = 1 (Bardes et al. 2022;
    the seed paper's values)."""

    sim_coeff: float = 25.0
    std_coeff: float = 25.0
    cov_coeff: float = 1.0


@dataclass(frozen=True)
class SimclrOptions(ExpanderOptions):
    """SimCLR's NT-Xent temperature (the seed paper's 0.5)."""

    temperature: float = 0.5


COTRAINED_MODES = ("cotrained_shared", "cotrained_separate")


class JointEmbedding(Objective):
    """Base of the seed's joint-embedding objectives (VICReg, SimCLR) between a teacher branch and the
    student branch (Farndale et al., "More From Less").

    The teacher branch is the frozen teacher (`teacher_mode` cached | online: asymmetric distillation, its
    tokens carry no gradient, only its expander learns) or a second encoder trained with the student from
    scratch (`cotrained_shared`: the student's own weights; `cotrained_separate`: an encoder of the same
    architecture with its own weights; the trainer builds it). Each branch's CLS token goes through an
    expander (losses.Expander): one expander shared by both branches under `cotrained_shared`, one per
    branch otherwise (student head `expander`, `teacher_expander`). Pairs are cross-view, as DINO's: the
    teacher branch's view 0 with the student's view 1 and view 1 with view 0 (with a paired dataset, the
    student's views are the paired image: see distill.pairs); the loss is the mean over the two pairs.
    No teacher heads, no state.
    """

    teacher_modes = ("cached", "online", *COTRAINED_MODES)
    Options: ClassVar[type] = ExpanderOptions

    def __init__(self, cfg: DistillConfig, student_dim: int, teacher_dim: int, teacher_patches: bool):
        super().__init__()
        self.opts = self.options(cfg.objective_params)
        o = self.opts
        self.student_heads["expander"] = Expander(
            student_dim, o.expander_dim, o.expander_layers, o.expander_bn
        )
        if cfg.teacher_mode != "cotrained_shared":
            self.student_heads["teacher_expander"] = Expander(
                teacher_dim, o.expander_dim, o.expander_layers, o.expander_bn
            )

    def teacher_targets(self, teacher: TeacherTokens, step: StepState) -> torch.Tensor:
        """The teacher branch's CLS tokens [2B, Dt], view-major; with their gradient when co-trained (a
        frozen teacher's tokens have none)."""
        return teacher.cls.flatten(0, 1)

    def branch_pairs(
        self, student: StudentTokens, targets: torch.Tensor
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """[(teacher branch view 0, student view 1), (teacher view 1, student view 0)], expanded [B, E]."""
        t_exp = self.student_heads["teacher_expander"] if "teacher_expander" in self.student_heads else None
        za = (t_exp or self.student_heads["expander"])(targets)
        zb = self.student_heads["expander"](student.cls)
        b = za.shape[0] // 2
        return [(za[:b], zb[b:]), (za[b:], zb[:b])]


class Vicreg(JointEmbedding):
    """VICReg between the teacher branch and the student branch: λ·invariance + μ·variance + ν·covariance
    (losses.vicreg_terms; coefficients in `objective_params`, default 25, 25, 1), each term the mean over the
    two cross-view pairs (logged `loss_invariance`, `loss_variance`, `loss_covariance`)."""

    name = "vicreg"
    Options = VicregOptions

    def losses(self, student: StudentTokens, targets: torch.Tensor, step: StepState) -> dict:
        terms = [vicreg_terms(a, b) for a, b in self.branch_pairs(student, targets)]
        out = {k: torch.stack([getattr(t, k) for t in terms]).mean() for k in VicregTerms._fields}
        o = self.opts
        out["total"] = (
            o.sim_coeff * out["invariance"] + o.std_coeff * out["variance"] + o.cov_coeff * out["covariance"]
        )
        return out


class Simclr(JointEmbedding):
    """SimCLR between the teacher branch and the student branch: NT-Xent (losses.nt_xent, temperature 0.5 by
    default) over the batch, the mean over the two cross-view pairs (logged `loss_nt_xent`)."""

    name = "simclr"
    Options = SimclrOptions

    def losses(self, student: StudentTokens, targets: torch.Tensor, step: StepState) -> dict:
        pairs = self.branch_pairs(student, targets)
        loss = torch.stack([nt_xent(a, b, self.opts.temperature) for a, b in pairs]).mean()
        return {"nt_xent": loss, "total": loss}


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (DinoIbot, Feature, Vicreg, Simclr)}


def build_objective(
    cfg: DistillConfig, student_dim: int, teacher_dim: int, teacher_patches: bool
) -> Objective:
    """The objective named by `cfg.objective`, for a student of width D and a teacher of width Dt.

    `teacher_patches`: whether the teacher's outputs include patch tokens. HistodistillError for an
    unknown name, unknown `objective_params`, or a `teacher_mode` the objective does not take
    (`Objective.teacher_modes`: DINO + iBOT and `feature` need a frozen teacher).
    """
    if cfg.objective not in OBJECTIVES:
        raise HistodistillError(f"unknown objective {cfg.objective!r} (known: {sorted(OBJECTIVES)})")
    cls = OBJECTIVES[cfg.objective]
    if cfg.teacher_mode not in cls.teacher_modes:
        raise HistodistillError(
            f"objective {cfg.objective!r} cannot run with teacher_mode {cfg.teacher_mode!r} (it takes "
            f"{list(cls.teacher_modes)}): its targets come from a frozen teacher; co-train with vicreg or simclr"
        )
    return cls(cfg, student_dim, teacher_dim, teacher_patches)
