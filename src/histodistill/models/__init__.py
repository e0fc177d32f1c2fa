"""Model registry: name → encoder backend, input transform, token layout and poolings (see registry.py).

`ModelRef` (models/ref.py) is importable without torch; everything else is loaded on first use
(PEP 562), so `from histodistill.models.ref import ModelRef` in the Snakefile stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from histodistill.models.ref import ModelRef

_LAZY = {
    "POOLINGS": "histodistill.models.registry",
    "LoadedModel": "histodistill.models.registry",
    "ModelSpec": "histodistill.models.registry",
    "Transform": "histodistill.models.registry",
    "get_spec": "histodistill.models.registry",
    "list_models": "histodistill.models.registry",
    "load_model": "histodistill.models.registry",
    "pool_tokens": "histodistill.models.registry",
    "save_student": "histodistill.models.registry",
    "register_model": "histodistill.models.registry",
    "Encoder": "histodistill.models.encoders",
    "encode": "histodistill.models.encoders",
}

__all__ = ["ModelRef", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'histodistill.models' has no attribute '{name}'")
