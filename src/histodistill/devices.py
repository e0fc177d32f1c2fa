"""Where models run and in which precision (shared by embedding, teacher caching and training)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_dtype(device: torch.device, precision: str, model_precision: str = "bf16") -> torch.dtype | None:
    """The autocast dtype of a run (None: full precision).

    `precision` `auto`: the model's own precision (`model_precision`, a registry entry's `precision`; bf16
    by default) on GPU, full precision on CPU (CPU autocast is slower than fp32 there); `fp32`, `bf16`,
    `fp16`: that, everywhere.
    """
    dtypes = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision == "auto":
        return dtypes[model_precision] if device.type == "cuda" else None
    return dtypes[precision]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with `n` torch threads, then restore the previous count (None: leave torch's setting).

    Small models on a shared CPU: OpenMP's thread wake-ups can cost ~20× the work itself, and a fixed
    thread count keeps a seed's result bit-identical across machines with different core counts.
    """
    if n is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
