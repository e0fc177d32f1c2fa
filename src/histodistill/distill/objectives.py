"""Distillation objectives as plug-ins: each one owns its heads/adapters, its teacher targets, its loss
terms and its state (centres), and the trainer only calls the interface of `Objective`.

One training step, as the trainer drives it (see `Objective`):

    targets = objective.teacher_targets(teacher_tokens, step)        # no grad (unless heads are learned)
    losses = objective.losses(student_tokens, targets, step)         # {"<term>": scalar, ..., "total": scalar}
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
linear adapter (cosine + smooth-L1, as in `losses.feature_loss`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import nn

from histodistill.distill.centering import SoftmaxCenter, sinkhorn_knopp
from histodistill.distill.heads import ProjectionHead
from histodistill.distill.losses import FeatureAdapter, dino_loss, feature_loss, ibot_loss
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
    """Per-step values an objective may read: the iteration and the scheduled teacher temperature."""

    iteration: int
    teacher_temp: float


@dataclass(frozen=True)
class NoOptions:
    """Options of an objective that takes none (any `objective_params` key is then an error)."""


class Objective(nn.Module):
    """Base class of a distillation objective (an nn.Module, so its state_dict is its checkpoint state).

    Submodules by role:
    - `student_heads` (nn.ModuleDict): heads/adapters applied to the student's tokens, trained with the
      student; the trainer puts them into the module it wraps in DistributedDataParallel, so their
      gradients are all-reduced.
    - `teacher_heads` (nn.ModuleDict): heads applied to the teacher's tokens, frozen or learned
      (parameters with requires_grad are optimised; they are not wrapped in DDP).
    - buffers (e.g. centres): state updated by `update_state`, saved with the state_dict.

    Subclasses set `name`, `Options` (a frozen dataclass of the `objective_params` they accept), and
    implement `teacher_targets`, `losses` and, if they keep state, `update_state`.
    """

    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions

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
        """The targets of this step from the teacher's tokens; detached, except where a learned teacher
        head is meant to receive the loss's gradient (documented by the subclass)."""
        raise NotImplementedError

    def losses(self, student: StudentTokens, targets: Any, step: StepState) -> dict[str, torch.Tensor]:
        """Named scalar loss terms and their weighted sum under "total" (the one the trainer backpropagates)."""
        raise NotImplementedError

    @torch.no_grad()
    def update_state(self, targets: Any) -> None:
        """After the optimiser step: update the objective's state (nothing by default)."""

    @torch.no_grad()
    def holdout_metrics(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
        """Objective-specific agreement on held-out tokens (student [N, D], teacher [N, Dt]); none by default."""
        return {}


def build_teacher_heads(cfg: DistillConfig, teacher_dim: int) -> nn.ModuleDict:
    """The DINO and iBOT heads on the teacher's tokens: seeded (`frozen`, `learned`) or loaded from a
    safetensors file (`teacher_heads` = its path; then frozen). The weight-norm's g stays fixed at 1.

    The seed is `cfg.seed + 7919` under a forked RNG, so the heads depend only on the seed and building
    them does not move the global RNG. HistodistillError if the file does not exist.
    """
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + 7919)  # recorded: the heads depend only on the seed
        heads = nn.ModuleDict(
            {
                "dino": ProjectionHead(teacher_dim, cfg.n_prototypes, cfg.head_hidden, cfg.dino_bottleneck),
                "ibot": ProjectionHead(teacher_dim, cfg.n_prototypes, cfg.head_hidden, cfg.ibot_bottleneck),
            }
        )
    if cfg.teacher_heads not in ("frozen", "learned"):
        from safetensors.torch import load_file

        path = Path(cfg.teacher_heads)
        if not path.is_file():
            raise HistodistillError(f"teacher heads checkpoint not found: {path}")
        heads.load_state_dict(load_file(path))
    heads.requires_grad_(cfg.teacher_heads == "learned")
    for head in heads.values():  # the weight-norm's g stays fixed in every mode
        head.prototypes.parametrizations.weight.original0.requires_grad = False
    return heads


@dataclass
class DinoIbotTargets:
    """dino_probs: [2, B, K] teacher distributions of the two global views (carry the gradient to learned
    teacher heads under softmax centering, as in the paper's setup; detached otherwise).
    dino_logits: [2B, K] detached teacher DINO logits (for the centre). ibot_logits: [2B·P, K] detached
    teacher iBOT logits, or None when iBOT is off or there are no patch tokens. ibot_center: [1, K] the
    iBOT centre at this step (softmax centering inside the chunked loss)."""

    dino_probs: torch.Tensor
    dino_logits: torch.Tensor
    ibot_logits: torch.Tensor | None
    ibot_center: torch.Tensor


class DinoIbot(Objective):
    """DINO on the CLS token (global crops, plus local crops) + iBOT on all patch tokens, without masking.

    L = dino_weight · L_dino + ibot_weight · L_ibot (losses.dino_loss, losses.ibot_loss), teacher targets by
    softmax centering with EMA centres (momentum `center_momentum`) or Sinkhorn-Knopp (`centering`), at the
    scheduled teacher temperature. Student heads: `dino`, `ibot` (ProjectionHead, K = n_prototypes);
    teacher heads: `build_teacher_heads`. Buffers: `centers.dino.center`, `centers.ibot.center` ([1, K]).

    HistodistillError if iBOT is on (ibot_weight > 0) but the teacher gives no patch tokens.
    """

    name = "dino_ibot"

    def __init__(self, cfg: DistillConfig, student_dim: int, teacher_dim: int, teacher_patches: bool):
        super().__init__()
        self.options(cfg.objective_params)
        if cfg.ibot_weight > 0 and not teacher_patches:
            raise HistodistillError(
                "the iBOT loss needs patch tokens: cache them (teacher.patch_tokens: full|pool2)"
            )
        self.n_prototypes, self.student_temp = cfg.n_prototypes, cfg.student_temp
        self.dino_weight, self.ibot_weight, self.ibot_chunk = cfg.dino_weight, cfg.ibot_weight, cfg.ibot_chunk
        self.centering, self.learned_teacher = cfg.centering, cfg.teacher_heads == "learned"
        # student heads first (global RNG, in this order), then the teacher's (their own seed)
        self.student_heads["dino"] = ProjectionHead(
            student_dim, cfg.n_prototypes, cfg.head_hidden, cfg.dino_bottleneck
        )
        self.student_heads["ibot"] = ProjectionHead(
            student_dim, cfg.n_prototypes, cfg.head_hidden, cfg.ibot_bottleneck
        )
        self.teacher_heads = build_teacher_heads(cfg, teacher_dim)
        self.centers = nn.ModuleDict(
            {k: SoftmaxCenter(cfg.n_prototypes, cfg.center_momentum) for k in ("dino", "ibot")}
        )

    def teacher_targets(self, teacher: TeacherTokens, step: StepState) -> DinoIbotTargets:
        b = teacher.cls.shape[1]
        use_ibot = teacher.patch is not None and self.ibot_weight > 0
        with torch.set_grad_enabled(self.learned_teacher):
            t_dino = self.teacher_heads["dino"](teacher.cls.flatten(0, 1))  # [2B, K]
            t_ibot = self.teacher_heads["ibot"](teacher.patch.flatten(0, 2)) if use_ibot else None
        if self.centering == "sinkhorn":
            probs = sinkhorn_knopp(t_dino, step.teacher_temp)
        else:
            probs = self.centers["dino"].probs(t_dino, step.teacher_temp)
        return DinoIbotTargets(
            dino_probs=probs.reshape(2, b, -1),
            dino_logits=t_dino.detach(),
            ibot_logits=None if t_ibot is None else t_ibot.detach(),
            ibot_center=self.centers["ibot"].center.clone(),
        )

    def losses(self, student: StudentTokens, targets: DinoIbotTargets, step: StepState) -> dict:
        b = targets.dino_probs.shape[1]
        t_probs = targets.dino_probs
        s_dino = self.student_heads["dino"](student.cls).reshape(2, b, -1)
        students = [s_dino[0], s_dino[1]]
        if student.local_cls is not None:
            local = self.student_heads["dino"](student.local_cls.float())
            students += list(local.reshape(-1, b, self.n_prototypes))
        losses = {"dino": dino_loss([t_probs[0], t_probs[1]], students, self.student_temp)}
        total = self.dino_weight * losses["dino"]
        if targets.ibot_logits is not None:
            s_ibot = self.student_heads["ibot"](student.patch.reshape(-1, student.patch.shape[-1]))
            losses["ibot"] = ibot_loss(
                s_ibot,
                targets.ibot_logits,
                targets.ibot_center,
                self.student_temp,
                step.teacher_temp,
                self.ibot_chunk,
            )
            total = total + self.ibot_weight * losses["ibot"]
        losses["total"] = total
        return losses

    @torch.no_grad()
    def update_state(self, targets: DinoIbotTargets) -> None:
        """Softmax centering: the centres' EMA over the global batch (all-reduced under DDP)."""
        if self.centering != "softmax":
            return
        self.centers["dino"].update(targets.dino_logits)
        if targets.ibot_logits is not None:
            self.centers["ibot"].update(targets.ibot_logits)


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


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (DinoIbot, Feature)}


def build_objective(
    cfg: DistillConfig, student_dim: int, teacher_dim: int, teacher_patches: bool
) -> Objective:
    """The objective named by `cfg.objective`, for a student of width D and a teacher of width Dt.

    `teacher_patches`: whether the teacher's outputs include patch tokens. HistodistillError for an
    unknown name or unknown `objective_params`.
    """
    if cfg.objective not in OBJECTIVES:
        raise HistodistillError(f"unknown objective {cfg.objective!r} (known: {sorted(OBJECTIVES)})")
    return OBJECTIVES[cfg.objective](cfg, student_dim, teacher_dim, teacher_patches)
