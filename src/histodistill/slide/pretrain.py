"""SLPD pretraining of the region encoder: DINO with region-level multi-crop, plus L_intra and L_inter.

Source: Yu, Lin & Xu, "SLPD" (MICCAI 2023) and its reference code (github.com/Carboxy/SLPD,
`Hierarchical-Pretraining/main_SLPD.py`, itself HIPT's `main_dino4k.py` plus the prototype terms). Per epoch
from `warm_epochs` on (the reference's `--warm_epoch` 20: DINO alone before), the teacher embeds every
region (its centre `global_crop`² crop, the reference's `CenterCrop(14)`) to the head's L2-normalised
bottleneck code; each slide's codes are clustered (`prototypes.slide_prototypes`), slides are matched
(`prototypes.top_k_slides`) and every region gets its own prototype and its K neighbours' matched
prototypes as targets. A step's loss is L_self + α1·L_intra + α2·L_inter (`slide.losses.prototype_loss`).
`intra_weight = inter_weight = 0` is plain HIPT/DINO region pretraining (the ablation's "DINO only").

The defaults are the reference run for TCGA-NSCLC (`vit4k_xs`; 100 epochs; batch 128 per GPU; 2 global 14²
and 8 local 6² crops; head 65,536 prototypes, hidden 2,048, bottleneck 256; lr 5e-4 per 256 with 10 warm-up
epochs to 1e-6; weight decay 0.04 → 0.4; teacher temperature 0.04; EMA 0.996 → 1; gradient clip 3; last
layer frozen for the first epoch; M = 4 prototypes, K = 1 neighbour, 32 regions at least per slide).

It reuses the distillation engine: `ProjectionHead` (heads.py), `SoftmaxCenter` (centering.py), `Schedules`
and `ema_update` (schedules.py), `dino_loss` (losses.py) and `param_groups` (trainer.py). Deliberate
deviations, named: the loop is this module's own (the distillation `Trainer` is bound to the teacher cache),
with a checkpoint at the end of every epoch that an identical rerun resumes (atomic, bound to the settings
and the region store's provenance hash); it runs in one process (no DDP); `inter_weight` > 0 with too few
valid slides falls back to no L_inter for that epoch (logged).
"""

from __future__ import annotations

import copy
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histodistill.atomic import atomic_path
from histodistill.devices import pick_device, torch_threads
from histodistill.distill.centering import SoftmaxCenter
from histodistill.distill.heads import ProjectionHead
from histodistill.distill.losses import dino_loss
from histodistill.distill.schedules import Schedules, ema_update
from histodistill.distill.trainer import param_groups
from histodistill.errors import HistodistillError
from histodistill.slide.encoder import RegionViT, multi_crop
from histodistill.slide.losses import prototype_loss
from histodistill.slide.prototypes import Neighbors, prototype_targets, slide_prototypes, top_k_slides

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class RegionTrainConfig:
    """Settings of `pretrain_regions` (config section `slpd.train`); defaults: the reference's TCGA-NSCLC run."""

    embed_dim: int = 192
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    drop_path: float = 0.1
    global_crop: int = 14
    local_crop: int = 6
    n_local_crops: int = 8
    head_prototypes: int = 65536
    head_hidden: int = 2048
    head_bottleneck: int = 256
    epochs: int = 100
    batch_size: int = 128
    lr: float = 5e-4
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 0
    student_temp: float = 0.1
    ema_momentum: float = 0.996
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    intra_weight: float = 1.0
    inter_weight: float = 1.0
    n_prototypes: int = 4
    neighbors: int = 1
    candidates: int | None = None
    min_regions: int = 32
    warm_epochs: int = 20
    kmeans_n_init: int = 3
    kmeans_max_iter: int = 100
    seed: int = 0
    threads: int | None = None


def build_encoder(cfg: RegionTrainConfig, in_dim: int, grid: int) -> RegionViT:
    return RegionViT(in_dim, grid, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.drop_path)


class _Net(nn.Module):
    def __init__(self, backbone: RegionViT, head: ProjectionHead):
        super().__init__()
        self.backbone, self.head = backbone, head


def _center_crop(tokens: torch.Tensor, mask: torch.Tensor, size: int):
    g = tokens.shape[1]
    a = (g - min(size, g)) // 2
    return tokens[:, a : a + size, a : a + size], mask[:, a : a + size, a : a + size]


@torch.no_grad()
def embed_regions(
    backbone: RegionViT, tokens: np.ndarray, mask: np.ndarray, batch_size: int = 256, crop: int | None = None
) -> np.ndarray:
    """CLS embeddings [R, E] of regions tokens [R, G, G, D] / mask [R, G, G] (the whole grid, or its centre
    `crop`²), in eval mode, float32."""
    backbone.eval()
    dev = next(backbone.parameters()).device
    out = []
    for s in range(0, len(tokens), batch_size):
        t, m = torch.as_tensor(tokens[s : s + batch_size]), torch.as_tensor(mask[s : s + batch_size])
        if crop:
            t, m = _center_crop(t, m, crop)
        out.append(backbone(t.float().to(dev), m.bool().to(dev)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.embed_dim), np.float32)


def pretrain_regions(
    tokens: np.ndarray,
    mask: np.ndarray,
    slide_index: np.ndarray,
    out: str | Path,
    config: RegionTrainConfig | None = None,
    inputs: str = "",
    stop_after: int | None = None,
    device: str = "auto",
) -> dict:
    """Train the region encoder on regions tokens [R, G, G, D] float32, mask [R, G, G] bool, slide_index [R].

    Writes to the folder `out`: `checkpoint.pt` after every epoch (resumed by a rerun with the same settings and
    `inputs`, a digest of the training data) and, at the end, `region_encoder.pt` (the EMA teacher's backbone
    state, the one SLPD evaluates) and `log.json` (per-epoch losses). Returns the log. Raises
    HistodistillError for mismatched inputs or fewer regions than one batch. `stop_after` ends the run after
    that many epochs of this call (tests: an interrupted run), without the final files. `device`: "auto" (CUDA
    when available), "cpu" or "cuda".
    """
    cfg = config or RegionTrainConfig()
    with torch_threads(cfg.threads):
        dev = pick_device(device)
        return _pretrain(
            tokens, mask, np.asarray(slide_index, np.int64), Path(out), cfg, inputs, stop_after, dev
        )


def _pretrain(
    tokens, mask, slide_index, out: Path, cfg: RegionTrainConfig, inputs: str, stop_after, dev
) -> dict:
    n, g = tokens.shape[0], tokens.shape[1]
    if mask.shape != tokens.shape[:3] or len(slide_index) != n:
        raise HistodistillError(f"tokens {tokens.shape}, mask {mask.shape}, slide_index {slide_index.shape}")
    batch = min(cfg.batch_size, n)
    if batch < 2:
        raise HistodistillError(f"region pretraining needs at least 2 regions, got {n}")
    n_slides = int(slide_index.max()) + 1
    iters_per_epoch = n // batch
    total = iters_per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)
    student = _Net(
        build_encoder(cfg, tokens.shape[-1], g),
        ProjectionHead(cfg.embed_dim, cfg.head_prototypes, cfg.head_hidden, cfg.head_bottleneck),
    )
    student = student.to(dev)
    teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad = False
    center, proto_center = (
        SoftmaxCenter(cfg.head_prototypes).to(dev),
        SoftmaxCenter(cfg.head_prototypes).to(dev),
    )
    groups = param_groups([student])
    opt = torch.optim.AdamW(groups)
    sched = Schedules.build(
        total, iters_per_epoch, cfg.lr * batch / 256, cfg.min_lr, cfg.warmup_epochs, cfg.weight_decay,
        cfg.weight_decay_end, cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.warmup_teacher_temp_epochs,
        cfg.ema_momentum,
    )  # fmt: skip
    settings = json.dumps(asdict(cfg), sort_keys=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    epoch, rows = 0, []
    ckpt = out / "checkpoint.pt"
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if (
            state.get("format") == CHECKPOINT_FORMAT
            and state["settings"] == settings
            and state["inputs"] == inputs
        ):
            student.load_state_dict(state["student"])
            teacher.load_state_dict(state["teacher"])
            center.load_state_dict(state["center"])
            proto_center.load_state_dict(state["proto_center"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            epoch, rows = int(state["epoch"]), list(state["log"])
            log.info("resumed %s at epoch %d", ckpt, epoch)
        else:
            log.warning("%s was written with other settings or inputs: starting over", ckpt)
    tok_t, mask_t = torch.as_tensor(tokens, dtype=torch.float32), torch.as_tensor(mask, dtype=torch.bool)
    use_protos = cfg.intra_weight > 0 or cfg.inter_weight > 0
    start_epoch = epoch
    while epoch < cfg.epochs:
        if stop_after is not None and epoch - start_epoch >= stop_after:
            return {"epochs": rows}
        targets = None
        if use_protos and epoch >= cfg.warm_epochs:
            targets = _epoch_targets(teacher, tokens, mask, slide_index, n_slides, cfg, epoch)
        sums: dict[str, float] = {}
        order = torch.randperm(n, generator=gen)
        student.train()
        teacher.eval()  # the EMA teacher runs without stochastic depth (DINO's teacher is built without it)
        for step in range(iters_per_epoch):
            it = epoch * iters_per_epoch + step
            for group in opt.param_groups:
                group["lr"] = float(sched.lr[it])
                group["weight_decay"] = float(sched.weight_decay[it]) if group["apply_wd"] else 0.0
            idx = order[step * batch : (step + 1) * batch]
            crops = multi_crop(
                tok_t[idx], mask_t[idx], cfg.global_crop, cfg.local_crop, cfg.n_local_crops, gen
            )
            crops = [(t.to(dev, non_blocking=True), m.to(dev, non_blocking=True)) for t, m in crops]
            temp = float(sched.teacher_temp[it])
            with torch.no_grad():
                t_logits = [teacher.head(teacher.backbone(t, m)) for t, m in crops[:2]]
            s_logits = [student.head(student.backbone(t, m)) for t, m in crops]
            l_self = dino_loss([center.probs(t, temp) for t in t_logits], s_logits, cfg.student_temp)
            loss, parts = l_self, {"dino": float(l_self.detach())}
            if targets is not None:
                loss, more = _prototype_terms(loss, teacher, proto_center, s_logits, targets, idx, temp, cfg)
                parts.update(more)
            opt.zero_grad()
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(student.parameters(), cfg.clip_grad)
            if epoch < cfg.freeze_last_layer_epochs:
                for p in student.head.prototypes.parameters():
                    p.grad = None
            opt.step()
            ema_update(teacher, student, float(sched.ema_momentum[it]))
            center.update(torch.cat(t_logits))
            if not math.isfinite(float(loss.detach())):
                raise HistodistillError(
                    f"region pretraining: loss {float(loss.detach())} at epoch {epoch}, step {step}"
                )
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                sums[k] = sums.get(k, 0.0) + v
        epoch += 1
        rows.append({"epoch": epoch, **{k: v / iters_per_epoch for k, v in sums.items()}})
        log.info("epoch %d/%d %s", epoch, cfg.epochs, rows[-1])
        state = {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "student": student.state_dict(),
            "teacher": teacher.state_dict(), "center": center.state_dict(),
            "proto_center": proto_center.state_dict(), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "log": rows,
            "settings": settings, "inputs": inputs,
        }  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(ckpt) as tmp:
            torch.save(state, tmp)
    with atomic_path(out / "region_encoder.pt") as tmp:
        torch.save({"backbone": teacher.backbone.cpu().state_dict(), "settings": settings, "in_dim": tokens.shape[-1],
                    "grid": g}, tmp)  # fmt: skip
    with atomic_path(out / "log.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1))
    return {"epochs": rows}


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def load_region_encoder(path: str | Path) -> RegionViT:
    """The trained region encoder (the EMA teacher's backbone) written by `pretrain_regions`, in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = RegionTrainConfig(**json.loads(state["settings"]))
    model = build_encoder(cfg, int(state["in_dim"]), int(state["grid"]))
    model.load_state_dict(state["backbone"])
    return model.eval()


@dataclass
class _Targets:
    codes_intra: torch.Tensor  # [R, D] each region's own prototype (zeros where not kept)
    codes_inter: torch.Tensor  # [R, K, D] the matched prototypes of its K neighbour slides
    keep: torch.Tensor  # [R] bool, regions with targets
    inter_ok: bool  # enough valid slides for K neighbours


@torch.no_grad()
def _epoch_targets(
    teacher, tokens, mask, slide_index, n_slides, cfg: RegionTrainConfig, epoch: int
) -> _Targets:
    feats = embed_regions(teacher.backbone, tokens, mask, crop=cfg.global_crop)
    codes = teacher.head.bottleneck(torch.as_tensor(feats).to(_device(teacher))).cpu().numpy()
    protos = slide_prototypes(
        codes, slide_index, n_slides, cfg.n_prototypes, cfg.seed + epoch, cfg.kmeans_n_init,
        cfg.kmeans_max_iter, cfg.min_regions,
    )  # fmt: skip
    neighbors = top_k_slides(protos, cfg.neighbors, cfg.candidates) if cfg.inter_weight > 0 else None
    if neighbors is None or int(protos.valid.sum()) <= cfg.neighbors:
        if cfg.inter_weight > 0:
            log.warning("epoch %d: %d valid slides, too few for %d neighbours: no L_inter", epoch,
                        int(protos.valid.sum()), cfg.neighbors)  # fmt: skip
        k = max(cfg.neighbors, 1)
        neighbors = Neighbors(
            np.tile(np.arange(n_slides)[:, None], (1, k)),  # self as a stand-in, unused (weight 0)
            np.zeros((n_slides, k)),
            np.tile(np.arange(cfg.n_prototypes), (n_slides, k, 1)),
        )
        inter_ok = False
    else:
        inter_ok = True
    intra, inter, keep = prototype_targets(protos, neighbors, slide_index, protos.assignment)
    log.info("epoch %d: prototypes for %d/%d slides, %d/%d regions with targets", epoch,
             int(protos.valid.sum()), n_slides, int(keep.sum()), len(keep))  # fmt: skip
    return _Targets(torch.as_tensor(intra), torch.as_tensor(inter), torch.as_tensor(keep), inter_ok)


def _prototype_terms(loss, teacher, proto_center, s_logits, targets: _Targets, idx, temp, cfg):
    keep = targets.keep[idx]
    parts = {}
    kept_logits = [s[keep.to(s.device)] for s in s_logits]
    updates = []
    if cfg.intra_weight > 0:
        u = teacher.head.logits(targets.codes_intra[idx][keep].to(_device(teacher)))[:, None]  # [B', 1, P]
        l_intra = prototype_loss(kept_logits, u, proto_center, temp, cfg.student_temp)
        loss = loss + cfg.intra_weight * l_intra
        parts["intra"] = float(l_intra.detach())
        updates.append(u.reshape(-1, u.shape[-1]))
    if cfg.inter_weight > 0 and targets.inter_ok:
        u = teacher.head.logits(targets.codes_inter[idx][keep].to(_device(teacher)))  # [B', K, P]
        l_inter = prototype_loss(kept_logits, u, proto_center, temp, cfg.student_temp)
        loss = loss + cfg.inter_weight * l_inter
        parts["inter"] = float(l_inter.detach())
        updates.append(u.reshape(-1, u.shape[-1]))
    if updates and sum(len(u) for u in updates):
        proto_center.update(torch.cat(updates).detach())
    return loss, parts


VARIANT_WEIGHTS = {"dino": (0.0, 0.0), "dino_intra": (1.0, 0.0), "dino_inter": (0.0, 1.0), "slpd": (1.0, 1.0)}


def pretrain_variants(
    region_store: str | Path,
    outputs: dict[str, str | Path],
    work_dir: str | Path,
    settings: dict | None = None,
    threads: int | None = None,
) -> dict[str, dict]:
    """Pretrain one region encoder per ablation variant (`outputs[variant]`: where its `region_encoder.pt`
    goes; variants dino, dino_intra, dino_inter, slpd keep L_intra / L_inter with weight 0 or 1 × the
    configured α1, α2) on a region store. `work_dir/<variant>` holds each run's checkpoint (resumed by a
    rerun). `settings`: RegionTrainConfig fields (lists become tuples). Returns each variant's log.
    Raises HistodistillError for an unknown variant."""
    import shutil

    from histodistill.slide.regions import RegionStore

    if unknown := set(outputs) - set(VARIANT_WEIGHTS):
        raise HistodistillError(f"unknown SLPD variant(s) {sorted(unknown)}; known: {list(VARIANT_WEIGHTS)}")
    store = RegionStore(region_store)
    data = store.load()
    base = RegionTrainConfig(**{**(settings or {}), "threads": threads})
    digest = str(store.attrs["provenance"]["config_hash"])
    logs = {}
    for variant, target in outputs.items():
        a, b = VARIANT_WEIGHTS[variant]
        cfg = RegionTrainConfig(**{**asdict(base), "intra_weight": a * base.intra_weight,
                                   "inter_weight": b * base.inter_weight})  # fmt: skip
        work = Path(work_dir) / variant
        logs[variant] = pretrain_regions(data["tokens"], data["mask"], data["slide_index"], work, cfg, digest)
        with atomic_path(target) as tmp:
            shutil.copyfile(work / "region_encoder.pt", tmp)
    return logs
