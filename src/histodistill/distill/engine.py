"""The training engine's shared pieces: processes (DDP), parameter groups and bound checkpoints.

One copy, used by every training loop of the pipeline: the distillation `Trainer` (trainer.py), the
teacher-heads stage (teacher_heads.py) and SLPD region pretraining (slide/pretrain.py). Together with
`schedules.Schedules` (per-iteration LR, weight decay, teacher temperature, EMA momentum; `apply` sets a
step's values on the optimizer), `schedules.ema_update`, `heads.ProjectionHead` and `centering.SoftmaxCenter`
(whose centre update all-reduces over processes), a loop needs only its own data and losses.

- `dist_env` / `init_process`: rank, local rank and world size from torchrun (then SLURM), the process group
  (NCCL on CUDA, gloo on CPU) and this process's device; `wrap_ddp` wraps a module in DDP for world > 1.
- `save_checkpoint` / `read_checkpoint`: a checkpoint is a dict with a `format` and the digests of its
  `inputs`; it is written atomically by rank 0 (all ranks wait at a barrier), and read back only when its
  format and every input digest match (a checkpoint is never loaded in part; a mismatch is logged by name).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from histodistill.atomic import atomic_path
from histodistill.errors import HistodistillError

log = logging.getLogger(__name__)


def dist_env() -> tuple[int, int, int]:
    """(rank, local_rank, world_size): torchrun's variables first, then SLURM's, else a single process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    if "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return (
            int(os.environ["SLURM_PROCID"]),
            int(os.environ.get("SLURM_LOCALID", 0)),
            int(os.environ["SLURM_NTASKS"]),
        )
    return 0, 0, 1


def init_process(device: str = "auto") -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) of this process.

    With world size > 1 the default process group is initialised (once; NCCL when CUDA is available, else
    gloo) from the environment torchrun sets. `device` "auto" is `cuda:<local_rank>` when CUDA is available,
    else the CPU; a CUDA device becomes the current one."""
    rank, local_rank, world = dist_env()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    return rank, local_rank, world, dev


def wrap_ddp(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """`module` in DistributedDataParallel when world > 1 (gradients all-reduced, averaged), else itself.
    Only calls through the returned module's `forward` synchronise gradients."""
    if world <= 1:
        return module
    return nn.parallel.DistributedDataParallel(
        module, device_ids=[device.index] if device.type == "cuda" else None
    )


def param_groups(modules: list[nn.Module]) -> list[dict]:
    """AdamW groups of the trainable parameters of `modules`: with weight decay (matrices) and without
    (biases, norms, cls/register tokens, position embeddings), flagged by `apply_wd`."""
    decay, no_decay = [], []
    for module in modules:
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            (
                no_decay if p.ndim <= 1 or name.endswith(("cls_token", "reg_token", "pos_embed")) else decay
            ).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False}]


def save_checkpoint(path: str | Path, state: Mapping, rank: int = 0, world: int = 1) -> None:
    """Write `state` to `path` atomically on rank 0 (torch.save); with world > 1 every rank then waits at a
    barrier, so no rank runs ahead of a checkpoint being written."""
    path = Path(path)
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save(dict(state), tmp)
        log.info("checkpoint → %s", path)
    if world > 1:
        dist.barrier()


def stale_inputs(recorded: Mapping | None, inputs: Mapping[str, str]) -> list[str]:
    """The keys of `inputs` whose digest differs from `recorded` (all of them when nothing was recorded)."""
    recorded = recorded or {}
    return [key for key, digest in inputs.items() if recorded.get(key) != digest]


def read_checkpoint(
    path: str | Path,
    format_version: int,
    inputs: Mapping[str, str],
    note: str = "",
    start: str = "iteration 0",
) -> dict | None:
    """The checkpoint at `path` when it exists, is of `format_version` and records exactly the digests
    `inputs`; None when there is none or an input changed (logged with the names of the changed inputs:
    the run starts over at `start`). Loaded with `weights_only=True` onto the CPU.

    Raises HistodistillError for a checkpoint of another format (`note`: what changed in the format, for
    the message): it cannot be resumed exactly, and it is never loaded in part."""
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != format_version:
        raise HistodistillError(
            f"{path} is a checkpoint of format {state.get('format', 1)}, this version reads format "
            f"{format_version}{f' ({note})' if note else ''}: it cannot be resumed; delete it to start over"
        )
    stale = stale_inputs(state.get("inputs"), inputs)
    if stale:
        log.warning(
            "checkpoint %s was trained on other inputs (%s changed): starting over at %s",
            path,
            ", ".join(stale),
            start,
        )
        return None
    return state
