"""Model registry: name → builder, input transform, token layout and poolings (see registry.py)."""

from histodistill.models.registry import (
    POOLINGS,
    LoadedModel,
    ModelSpec,
    Transform,
    get_spec,
    list_models,
    load_model,
    pool_tokens,
    save_student,
)

__all__ = [
    "POOLINGS",
    "LoadedModel",
    "ModelSpec",
    "Transform",
    "get_spec",
    "list_models",
    "load_model",
    "pool_tokens",
    "save_student",
]
