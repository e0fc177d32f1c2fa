"""SLPD pretraining of the region encoder: DINO with region-level multi-crop, plus L_intra and L_inter.

Source: Yu, Lin & Xu, "SLPD" (MICCAI 2023) and its reference code (github.com/Carboxy/SLPD,
`Hierarchical-Pretraining/main_SLPD.py`, itself HIPT's `main_dino4k.py` plus the prototype terms). Per epoch
from `warm_epochs` on (the reference's `--warm_epoch` 20: DINO alone before), the teacher embeds every
region (its centre `global_crop`² crop, the reference's `CenterCrop(14)`) to the head's L2-normalised
bottleneck code; each slide's codes are clustered (`epoch_prototypes`, `prototypes.cluster_slide`), slides are matched
(`prototypes.top_k_slides`) and every region gets its own prototype and its K neighbours' matched
prototypes as targets. A step's loss is L_self + α1·L_intra + α2·L_inter (`slide.losses.prototype_loss`).
`intra_weight = inter_weight = 0` is plain HIPT/DINO region pretraining (the ablation's "DINO only").

The defaults are the reference run for TCGA-NSCLC (`vit4k_xs`; 100 epochs; batch 128 (the reference's per
GPU; here the global batch: 128 × processes to match a multi-GPU reference run); 2 global 14²
and 8 local 6² crops; head 65,536 prototypes, hidden 2,048, bottleneck 256; lr 5e-4 per 256 with 10 warm-up
epochs to 1e-6; weight decay 0.04 → 0.4; teacher temperature 0.04; EMA 0.996 → 1; gradient clip 3; last
layer frozen for the first epoch; M = 4 prototypes, K = 1 neighbour, 32 regions at least per slide).

It runs on the distillation engine, not a copy of it: `ProjectionHead` (heads.py, DINO init), `SoftmaxCenter`
(centering.py; its update all-reduces over processes), `Schedules` (schedules.py: LR, weight decay, teacher
temperature, EMA momentum; `Schedules.apply`), `ema_update`, `dino_loss` (losses.py) and, from engine.py,
`param_groups`, `init_process` / `wrap_ddp` (torchrun's DDP: gloo on CPU, NCCL on CUDA), `save_checkpoint` /
`read_checkpoint` (atomic, rank 0, bound to input digests: the region store's provenance hash and the
settings' hash); multi-process runs start through `distill.launch.torchrun_command`. Only the loop is this
module's (the distillation `Trainer` is bound to the teacher cache and tile store).

Streaming: a region store larger than `preload_mib` is never loaded whole. A step reads its batch's regions
(one Zarr chunk per region; the next batch is read in a background thread while this one trains); the
per-epoch clustering reads one slide's regions at a time (`epoch_prototypes`). Memory: a batch, one slide's
regions and codes, the prototypes [S, M, D], and per-region indices ([R] slide and assignment, 16 bytes a
region); benchmarks/slpd_memory.py measures it flat in the store size. A store of at most `preload_mib`
(the demo's) is read into memory once instead: the same numbers, without a Zarr read per step.

DDP: `batch_size` is the global batch, split evenly over the processes; every rank draws the epoch's order
and the whole batch's crops from the same seeded generator and keeps its share, so a region's crops do not
depend on the process count. The per-epoch k-means is sharded by slide (slide s on rank s mod W) and merged
by an all-reduce of sums with zeros elsewhere (exact: every rank holds bitwise the same prototypes); the
slide matching (`top_k_slides`) runs on rank 0 and is broadcast. L_intra and L_inter are means over the
global batch's regions with targets (local means weighted by their share), so 2 processes train what 1
does (tests/unit/test_slide_pretrain.py). Checkpoints (every epoch) hold every rank's RNG states.

Deliberate deviations, named: `inter_weight` > 0 with too few valid slides falls back to no L_inter for that
epoch (logged); the epoch's regions are batched in sorted order within a batch (the batch is a random set).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from histodistill.atomic import atomic_path
from histodistill.devices import torch_threads
from histodistill.distill.centering import SoftmaxCenter
from histodistill.distill.engine import (
    init_process,
    param_groups,
    read_checkpoint,
    save_checkpoint,
    wrap_ddp,
)
from histodistill.distill.heads import ProjectionHead
from histodistill.distill.launch import process_threads, run_processes, thread_env, torchrun_command
from histodistill.distill.losses import dino_loss
from histodistill.distill.schedules import Schedules, ema_update
from histodistill.errors import HistodistillError
from histodistill.logs import LOG_FORMAT
from histodistill.provenance import config_hash
from histodistill.slide.encoder import RegionViT, multi_crop
from histodistill.slide.losses import prototype_loss
from histodistill.slide.prototypes import (
    Neighbors,
    Prototypes,
    cluster_slide,
    prototype_targets,
    top_k_slides,
)
from histodistill.slide.regions import RegionStore

log = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 2  # 1: one process, whole store in memory, not bound by input digests


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
    preload_mib: int = 256  # a store this small is read into memory once, a larger one streamed
    seed: int = 0
    threads: int | None = None


def build_encoder(cfg: RegionTrainConfig, in_dim: int, grid: int) -> RegionViT:
    return RegionViT(in_dim, grid, cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.drop_path)


class _Net(nn.Module):
    """Region encoder + projection head; `forward` maps a list of crops (tokens, mask) to one [B, P] logits
    tensor per crop (the module DDP wraps: its forward is what synchronises the gradients)."""

    def __init__(self, backbone: RegionViT, head: ProjectionHead):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        return [self.head(self.backbone(t, m)) for t, m in crops]


def _center_crop(tokens: torch.Tensor, mask: torch.Tensor, size: int):
    g = tokens.shape[1]
    a = (g - min(size, g)) // 2
    return tokens[:, a : a + size, a : a + size], mask[:, a : a + size, a : a + size]


@torch.no_grad()
def embed_regions(
    backbone: RegionViT, tokens, mask, batch_size: int = 256, crop: int | None = None
) -> np.ndarray:
    """CLS embeddings [R, E] float32 of regions tokens [R, G, G, D] / mask [R, G, G] (the whole grid, or its
    centre `crop`²), in eval mode. `tokens` and `mask` may be NumPy or Zarr arrays: they are read
    `batch_size` regions at a time."""
    backbone.eval()
    dev = next(backbone.parameters()).device
    out = []
    for s in range(0, tokens.shape[0], batch_size):  # a Zarr array has a shape, not a len
        t, m = torch.as_tensor(tokens[s : s + batch_size]), torch.as_tensor(mask[s : s + batch_size])
        if crop:
            t, m = _center_crop(t, m, crop)
        out.append(backbone(t.float().to(dev), m.bool().to(dev)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, backbone.embed_dim), np.float32)


def pretrain_regions(
    regions: str | Path | RegionStore,
    out: str | Path,
    config: RegionTrainConfig | None = None,
    inputs: str | None = None,
    stop_after: int | None = None,
    device: str = "auto",
) -> dict:
    """Train the region encoder on a region store (tokens [R, G, G, D] float32, mask [R, G, G] bool,
    slide_index [R]; `slide.regions`), streaming it: a step reads its batch's regions, the per-epoch
    clustering one slide's regions at a time.

    In one process, or in each process of a torchrun launch (`init_process`: DDP, gloo on CPU, NCCL on CUDA;
    `batch_size` is the global batch, split evenly over the processes). Writes to the folder `out` (rank 0):
    `checkpoint.pt` after every epoch (resumed by a rerun with the same settings and `inputs`, by default the
    store's provenance hash) and, at the end, `region_encoder.pt` (the EMA teacher's backbone state, the one
    SLPD evaluates) and `log.json` (per-epoch losses, means over the global batch). Returns the log. Raises
    HistodistillError for fewer regions than one batch, a batch not divisible by the process count or a
    non-finite loss. `stop_after` ends the run after that many epochs of this call (tests: an interrupted
    run), without the final files. `device`: "auto" (this process's CUDA device when available), "cpu" or
    "cuda".
    """
    cfg = config or RegionTrainConfig()
    store = regions if isinstance(regions, RegionStore) else RegionStore(regions)
    digest = inputs if inputs is not None else str(store.attrs["provenance"]["config_hash"])
    with torch_threads(cfg.threads):
        return _pretrain(store, Path(out), cfg, digest, stop_after, device)


class _Prefetch:
    """Reads the next step's regions in a background thread while this step trains (a Zarr read releases
    the GIL in its decompression and I/O). Order and content are those of `store.read(rows)`."""

    def __init__(self, store: RegionStore):
        self.store, self.pool, self.pending = store, ThreadPoolExecutor(1), None

    def submit(self, rows: np.ndarray) -> None:
        self.pending = self.pool.submit(self.store.read, rows)

    def take(self) -> tuple[np.ndarray, np.ndarray]:
        result, self.pending = self.pending.result(), None
        return result

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


def _pretrain(store: RegionStore, out: Path, cfg: RegionTrainConfig, inputs: str, stop_after, device) -> dict:
    rank, _, world, dev = init_process(device)
    if store.preload(cfg.preload_mib):
        log.info("%s: %.1f MiB of tokens ≤ preload_mib %d: read into memory", store.path, store.nbytes / 2**20,
                 cfg.preload_mib)  # fmt: skip
    slide_index = store.slide_index
    n, g, dim = len(slide_index), store.grid, store.dim
    batch = min(cfg.batch_size, n)
    if batch < 2:
        raise HistodistillError(f"region pretraining needs at least 2 regions, {store.path} has {n}")
    if batch % world:
        raise HistodistillError(
            f"slpd.train.batch_size {batch} (the global batch) is not divisible by {world} processes"
        )
    local = batch // world
    n_slides = len(store.slides)
    slide_rows = store.slide_rows()
    iters_per_epoch = n // batch
    total = iters_per_epoch * cfg.epochs
    torch.manual_seed(cfg.seed)
    student = _Net(
        build_encoder(cfg, dim, g),
        ProjectionHead(cfg.embed_dim, cfg.head_prototypes, cfg.head_hidden, cfg.head_bottleneck),
    ).to(dev)
    teacher = copy.deepcopy(student).requires_grad_(False)
    ddp = wrap_ddp(student, dev, world)
    center = SoftmaxCenter(cfg.head_prototypes).to(dev)
    proto_center = SoftmaxCenter(cfg.head_prototypes).to(dev)
    opt = torch.optim.AdamW(param_groups([student]))
    sched = Schedules.build(
        total, iters_per_epoch, cfg.lr * batch / 256, cfg.min_lr, cfg.warmup_epochs, cfg.weight_decay,
        cfg.weight_decay_end, cfg.teacher_temp, cfg.warmup_teacher_temp, cfg.warmup_teacher_temp_epochs,
        cfg.ema_momentum,
    )  # fmt: skip
    settings = json.dumps(asdict(cfg), sort_keys=True)
    bound = {"regions": inputs, "settings": config_hash(asdict(cfg))}
    gen = torch.Generator().manual_seed(cfg.seed)  # epoch order and crops: the same on every rank
    epoch, rows = 0, []
    ckpt = out / "checkpoint.pt"
    state = read_checkpoint(ckpt, CHECKPOINT_FORMAT, bound, start="epoch 0")
    if state is not None:
        student.load_state_dict(state["student"])
        teacher.load_state_dict(state["teacher"])
        center.load_state_dict(state["center"])
        proto_center.load_state_dict(state["proto_center"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        _set_rng(state["rng"], rank, dev)
        epoch, rows = int(state["epoch"]), list(state["log"])
        log.info("resumed %s at epoch %d", ckpt, epoch)
    use_protos = cfg.intra_weight > 0 or cfg.inter_weight > 0
    start_epoch = epoch
    log.info("SLPD region pretraining: %d regions of %d slides, rank %d of %d, device %s, batch %d (%d here)",
             n, n_slides, rank, world, dev, batch, local)  # fmt: skip
    prefetch = _Prefetch(store)
    try:
        while epoch < cfg.epochs:
            if stop_after is not None and epoch - start_epoch >= stop_after:
                return {"epochs": rows}
            targets = None
            if use_protos and epoch >= cfg.warm_epochs:
                targets = _epoch_targets(teacher, store, slide_rows, cfg, epoch, rank, world, dev)
            order = torch.randperm(n, generator=gen).numpy()
            batches = [np.sort(order[i * batch : (i + 1) * batch]) for i in range(iters_per_epoch)]
            mine = [b[rank * local : (rank + 1) * local] for b in batches]  # this rank's share of each batch
            sums: dict[str, float] = {}
            ddp.train()
            teacher.eval()  # the EMA teacher runs without stochastic depth (DINO's teacher is built without it)
            prefetch.submit(mine[0])
            for step in range(iters_per_epoch):
                it = epoch * iters_per_epoch + step
                sched.apply(opt, it)
                tok, msk = prefetch.take()
                if step + 1 < iters_per_epoch:
                    prefetch.submit(mine[step + 1])
                idx = mine[step]
                crops = multi_crop(
                    torch.from_numpy(tok), torch.from_numpy(msk), cfg.global_crop, cfg.local_crop,
                    cfg.n_local_crops, gen, draw=(batch, rank * local),
                )  # fmt: skip
                crops = [(t.to(dev, non_blocking=True), m.to(dev, non_blocking=True)) for t, m in crops]
                temp = float(sched.teacher_temp[it])
                with torch.no_grad():
                    t_logits = teacher(crops[:2])
                s_logits = ddp(crops)
                l_self = dino_loss([center.probs(t, temp) for t in t_logits], s_logits, cfg.student_temp)
                loss, parts = l_self, {"dino": l_self.detach()}
                if targets is not None:
                    loss, more = _prototype_terms(
                        loss, teacher, proto_center, s_logits, targets, idx, temp, cfg, world
                    )
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
                names = ["loss", *parts]
                values = torch.stack([loss.detach(), *parts.values()]).float()
                if world > 1:  # the global batch's figures: the mean of equal-sized local means
                    dist.all_reduce(values)
                    values /= world
                values = values.cpu().tolist()
                if not math.isfinite(values[0]):
                    raise HistodistillError(
                        f"region pretraining: loss {values[0]} at epoch {epoch}, step {step}"
                    )
                for k, v in zip(names, values, strict=True):
                    sums[k] = sums.get(k, 0.0) + v
            epoch += 1
            rows.append({"epoch": epoch, **{k: v / iters_per_epoch for k, v in sums.items()}})
            if rank == 0:
                log.info("epoch %d/%d %s", epoch, cfg.epochs, rows[-1])
            state = {
                "format": CHECKPOINT_FORMAT, "epoch": epoch, "student": student.state_dict(),
                "teacher": teacher.state_dict(), "center": center.state_dict(),
                "proto_center": proto_center.state_dict(), "optimizer": opt.state_dict(),
                "generator": gen.get_state(), "rng": _gather_rng(rank, world, dev), "log": rows,
                "settings": settings, "inputs": bound,
            }  # fmt: skip
            save_checkpoint(ckpt, state, rank, world)
    finally:
        prefetch.close()
    if rank == 0:
        with atomic_path(out / "region_encoder.pt") as tmp:
            torch.save({"backbone": {k: v.cpu() for k, v in teacher.backbone.state_dict().items()},
                        "settings": settings, "in_dim": dim, "grid": g}, tmp)  # fmt: skip
        with atomic_path(out / "log.json") as tmp:
            tmp.write_text(json.dumps(rows, indent=1))
    if world > 1:
        dist.barrier()
    return {"epochs": rows}


def _gather_rng(rank: int, world: int, dev: torch.device) -> list[dict]:
    """Every rank's torch RNG states (CPU, and CUDA on a GPU: stochastic depth draws from them), rank order."""
    mine = {"cpu": torch.get_rng_state()}
    if dev.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(dev)
    if world == 1:
        return [mine]
    out: list = [None] * world
    dist.all_gather_object(out, mine)
    return out


def _set_rng(states: list[dict], rank: int, dev: torch.device) -> None:
    """This rank's RNG states from `_gather_rng`'s list (rank 0's when the run had fewer processes)."""
    mine = states[rank] if rank < len(states) else states[0]
    torch.set_rng_state(mine["cpu"])
    if dev.type == "cuda" and "cuda" in mine:
        torch.cuda.set_rng_state(mine["cuda"], dev)


def load_region_encoder(path: str | Path) -> RegionViT:
    """The trained region encoder (the EMA teacher's backbone) written by `pretrain_regions`, in eval mode."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    cfg = RegionTrainConfig(**json.loads(state["settings"]))
    model = build_encoder(cfg, int(state["in_dim"]), int(state["grid"]))
    model.load_state_dict(state["backbone"])
    return model.eval()


@dataclass
class _Targets:
    prototypes: Prototypes  # every slide's prototypes [S, M, D] and every region's assignment [R]
    neighbors: Neighbors  # every slide's K matched slides
    inter_ok: bool  # enough valid slides for K neighbours
    slide_index: np.ndarray  # [R] every region's slide


def _device_for_collectives(dev: torch.device) -> torch.device:
    return dev if dev.type == "cuda" else torch.device("cpu")  # NCCL reduces CUDA tensors, gloo CPU ones


EMBED_BATCH = 256  # regions per teacher pass of the per-epoch clustering (and per read: slides are grouped)


def _slide_groups(slides: list[int], slide_rows: list[np.ndarray], regions: int) -> list[list[int]]:
    """Consecutive runs of `slides` holding up to `regions` regions together (a larger slide alone): what
    one read and one teacher pass of the clustering take."""
    groups: list[list[int]] = []
    count = 0
    for s in slides:
        if groups and count + len(slide_rows[s]) <= regions:
            groups[-1].append(s)
            count += len(slide_rows[s])
        else:
            groups.append([s])
            count = len(slide_rows[s])
    return groups


@torch.no_grad()
def epoch_prototypes(
    teacher: _Net,
    store: RegionStore,
    slide_rows: list[np.ndarray],
    cfg: RegionTrainConfig,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
) -> Prototypes:
    """The per-slide k-means prototypes of one epoch, from the teacher's L2-normalised bottleneck codes of
    each region's centre `global_crop`² crop, reading the regions of one slide (or of a few consecutive
    small slides, `EMBED_BATCH` regions together) at a time: memory holds max(one slide, 256) regions and
    their codes, plus the [S, M, D] prototypes and the [R] assignment.

    With `world` > 1 the slides are dealt to the ranks (slide s on rank s mod world), so each slide is
    clustered once, by one rank, and the results are merged by an all-reduce of sums with zeros elsewhere
    (exact): every rank ends with bitwise the same prototypes. Same numbers as `slide_prototypes` on all
    codes at once (`cluster_slide`, seed `cfg.seed + epoch`)."""
    dev = device or _device(teacher)
    m, d = cfg.n_prototypes, cfg.head_bottleneck
    min_regions = max(m, cfg.min_regions)
    centroids = np.zeros((len(slide_rows), m, d), np.float32)
    labels = np.zeros(len(store), np.int64)  # assignment + 1 (0: not clustered), summed over ranks
    valid = np.zeros(len(slide_rows), np.int64)
    mine = [s for s in range(rank, len(slide_rows), world) if len(slide_rows[s]) >= min_regions]
    for group in _slide_groups(mine, slide_rows, EMBED_BATCH):
        rows = np.concatenate([slide_rows[s] for s in group])
        tokens, mask = store.read(rows)
        feats = embed_regions(teacher.backbone, tokens, mask, EMBED_BATCH, crop=cfg.global_crop)
        codes = teacher.head.bottleneck(torch.as_tensor(feats).to(dev)).float().cpu().numpy()
        start = 0
        for s in group:
            rows = slide_rows[s]
            centroids[s], assigned = cluster_slide(
                codes[start : start + len(rows)], m, cfg.seed + epoch, cfg.kmeans_n_init, cfg.kmeans_max_iter
            )
            labels[rows] = assigned + 1
            valid[s] = 1
            start += len(rows)
    if world > 1:
        where = _device_for_collectives(dev)
        merged = []
        for arr in (centroids, labels, valid):
            t = torch.from_numpy(arr).to(where)
            dist.all_reduce(t)
            merged.append(t.cpu().numpy())
        centroids, labels, valid = merged
    return Prototypes(centroids, labels - 1, valid.astype(bool))


@torch.no_grad()
def _epoch_targets(
    teacher, store: RegionStore, slide_rows, cfg: RegionTrainConfig, epoch: int, rank: int, world: int, dev
) -> _Targets:
    protos = epoch_prototypes(teacher, store, slide_rows, cfg, epoch, rank, world, dev)
    n_slides = len(slide_rows)
    enough = int(protos.valid.sum()) > cfg.neighbors
    neighbors, inter_ok = None, cfg.inter_weight > 0 and enough
    if inter_ok:  # the matching: on rank 0, broadcast (one result for every rank)
        box = [top_k_slides(protos, cfg.neighbors, cfg.candidates) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(box, src=0, device=_device_for_collectives(dev))
        neighbors = box[0]
    if neighbors is None:
        if cfg.inter_weight > 0:
            log.warning("epoch %d: %d valid slides, too few for %d neighbours: no L_inter", epoch,
                        int(protos.valid.sum()), cfg.neighbors)  # fmt: skip
        k = max(cfg.neighbors, 1)
        neighbors = Neighbors(
            np.tile(np.arange(n_slides)[:, None], (1, k)),  # self as a stand-in, unused (weight 0)
            np.zeros((n_slides, k)),
            np.tile(np.arange(cfg.n_prototypes), (n_slides, k, 1)),
        )
    if rank == 0:
        log.info("epoch %d: prototypes for %d/%d slides, %d/%d regions assigned", epoch,
                 int(protos.valid.sum()), n_slides, int((protos.assignment >= 0).sum()), len(store))  # fmt: skip
    return _Targets(protos, neighbors, inter_ok, store.slide_index)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _prototype_terms(loss, teacher, proto_center, s_logits, targets: _Targets, idx, temp, cfg, world: int):
    """loss + α1·L_intra + α2·L_inter of this rank's regions `idx`. Each term is a mean over the regions with
    targets of the *global* batch: the local mean is weighted by (local count × world / global count), so the
    DDP average of the ranks' gradients is the gradient of the global mean (ranks may hold unequal counts)."""
    dev = _device(teacher)
    intra, inter, keep = prototype_targets(
        targets.prototypes, targets.neighbors, targets.slide_index[idx], targets.prototypes.assignment[idx]
    )
    keep_t = torch.from_numpy(keep)
    count = torch.tensor([float(keep.sum())], device=_device_for_collectives(dev))
    total = count.clone()
    if world > 1:
        dist.all_reduce(total)
    if float(total) == 0:
        return loss, {}
    weight = float(count) * world / float(total)
    parts = {}
    kept_logits = [s[keep_t.to(s.device)] for s in s_logits]
    updates = []
    if cfg.intra_weight > 0:
        u = teacher.head.logits(torch.from_numpy(intra[keep]).to(dev))[:, None]  # [B', 1, P]
        l_intra = weight * prototype_loss(kept_logits, u, proto_center, temp, cfg.student_temp)
        loss = loss + cfg.intra_weight * l_intra
        parts["intra"] = l_intra.detach()
        updates.append(u.reshape(-1, u.shape[-1]))
    if cfg.inter_weight > 0 and targets.inter_ok:
        u = teacher.head.logits(torch.from_numpy(inter[keep]).to(dev))  # [B', K, P]
        l_inter = weight * prototype_loss(kept_logits, u, proto_center, temp, cfg.student_temp)
        loss = loss + cfg.inter_weight * l_inter
        parts["inter"] = l_inter.detach()
        updates.append(u.reshape(-1, u.shape[-1]))
    if updates:  # every rank calls it (the centre's all-reduce), with its possibly empty rows
        proto_center.update(torch.cat(updates).detach())
    return loss, parts


VARIANT_WEIGHTS = {"dino": (0.0, 0.0), "dino_intra": (1.0, 0.0), "dino_inter": (0.0, 1.0), "slpd": (1.0, 1.0)}


def pretrain_variants(
    region_store: str | Path,
    outputs: dict[str, str | Path],
    work_dir: str | Path,
    settings: dict | None = None,
    threads: int | None = None,
    nproc_per_node: int = 1,
    log_path: str | Path | None = None,
) -> dict[str, dict]:
    """Pretrain one region encoder per ablation variant (`outputs[variant]`: where its `region_encoder.pt`
    goes; variants dino, dino_intra, dino_inter, slpd keep L_intra / L_inter with weight 0 or 1 × the
    configured α1, α2) on a region store, streamed (`pretrain_regions`). `work_dir/<variant>` holds each
    run's checkpoint (resumed by a rerun). `settings`: RegionTrainConfig fields. `nproc_per_node` > 1 runs
    the variants under torchrun (`distill.launch.torchrun_command`, this module's `main` in every process;
    their output appended to `log_path` when given). Returns each variant's log. Raises HistodistillError
    for an unknown variant or a failed torchrun."""
    if unknown := set(outputs) - set(VARIANT_WEIGHTS):
        raise HistodistillError(f"unknown SLPD variant(s) {sorted(unknown)}; known: {list(VARIANT_WEIGHTS)}")
    base = RegionTrainConfig(**{**(settings or {}), "threads": threads})
    if nproc_per_node > 1:  # the processes share the job's threads (distill.launch.process_threads)
        shared = {**asdict(base), "threads": process_threads(threads, nproc_per_node)}
        return _launch(region_store, outputs, work_dir, shared, nproc_per_node, log_path)
    store = RegionStore(region_store)
    rank = init_process()[0]
    logs = {}
    for variant, target in outputs.items():
        a, b = VARIANT_WEIGHTS[variant]
        cfg = RegionTrainConfig(**{**asdict(base), "intra_weight": a * base.intra_weight,
                                   "inter_weight": b * base.inter_weight})  # fmt: skip
        work = Path(work_dir) / variant
        logs[variant] = pretrain_regions(store, work, cfg)
        if rank == 0:
            with atomic_path(target) as tmp:
                shutil.copyfile(work / "region_encoder.pt", tmp)
    return logs


def _launch(region_store, outputs, work_dir, settings: dict, nproc_per_node: int, log_path) -> dict:
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    job = work_dir / "slpd_job.json"
    job.write_text(json.dumps({"region_store": str(region_store), "work_dir": str(work_dir), "settings": settings,
                               "outputs": {k: str(v) for k, v in outputs.items()}}))  # fmt: skip
    command = torchrun_command(__name__, [job], nproc_per_node=nproc_per_node)
    log.info("launching %s (%s threads per process)", " ".join(command), settings["threads"])
    code = run_processes(command, thread_env(settings["threads"]), log_path)  # and torch_threads in each
    if code:
        raise HistodistillError(f"SLPD region pretraining under torchrun failed (exit {code}); see the log")
    return {v: {"epochs": json.loads((work_dir / v / "log.json").read_text())} for v in outputs}


def main(argv: list[str] | None = None) -> int:
    """Entry point of each torchrun process: python -m histodistill.slide.pretrain JOB.json (`_launch`)."""
    job = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    settings = dict(job["settings"])
    pretrain_variants(job["region_store"], job["outputs"], job["work_dir"], settings, settings.pop("threads"))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
