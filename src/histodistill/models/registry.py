"""Every model's constants in one place: timm architecture, hub id, transform, token layout, pooling.

`load_model(name, weights=None)` builds the architecture and loads weights from a local file (safetensors,
or a torch checkpoint read with `weights_only=True`) or from the hub id (respecting HF_HUB_OFFLINE). A
missing or gated weight is a ModelError saying how to provide it. Each entry has a `<name>_tiny` twin: the
same architecture family and token layout, two narrow blocks, seeded random init, for tests and the demo.
`student:<run>` loads a checkpoint this pipeline wrote (`save_student`), whose safetensors metadata holds
the architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from histodistill.errors import ModelError

POOLINGS = ("cls", "cls_mean", "patch_tokens")
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
_LAYERS = {"swiglu_packed": timm.layers.SwiGLUPacked, "silu": torch.nn.SiLU}  # names keep specs JSON-able
STUDENT_META_KEY = "histodistill_model"


@dataclass(frozen=True)
class Transform:
    """Input transform: optional resize of the short side, centre crop to `size`, normalisation."""

    size: int = 224
    resize: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    arch: str
    hub_id: str | None
    kwargs: dict[str, Any]
    transform: Transform
    embed_dim: int
    patch_size: int
    num_registers: int
    default_pooling: str = "cls"
    tiny: dict[str, Any] = field(default_factory=dict)  # kwargs overrides of the `_tiny` twin
    random_init: bool = False

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_registers

    def pooled_dim(self, pooling: str) -> int:
        return 2 * self.embed_dim if pooling == "cls_mean" else self.embed_dim

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Tiny twins: the real token layout at a toy size. LayerScale starts at 1 (the real models' 1e-5 is an
# init for training from scratch; trained weights have learned scales): with 1e-5 and random weights every
# block is nearly skipped and all images embed to almost the same vector, which no benchmark can tell apart.
_TINY = {"embed_dim": 64, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "init_values": 1.0}
_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "h_optimus_0",
            "vit_giant_patch14_reg4_dinov2",
            "bioptimus/H-optimus-0",
            {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
            Transform(224, None, "bilinear", *BIOPTIMUS),
            1536,
            14,
            4,
            "cls",
            _TINY,
        ),
        ModelSpec(
            "h0_mini",
            "vit_base_patch14_reg4_dinov2",
            "bioptimus/H0-mini",
            {
                "img_size": 224,
                "init_values": 1e-5,
                "dynamic_img_size": False,
                "num_classes": 0,
                "mlp_ratio": 5.33334,
                "mlp_layer": "swiglu_packed",
                "act_layer": "silu",
            },
            Transform(224, None, "bilinear", *BIOPTIMUS),
            768,
            14,
            4,
            "cls",
            _TINY,
        ),
        ModelSpec(
            "uni",
            "vit_large_patch16_224",
            "MahmoodLab/UNI",
            {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
            Transform(224, None, "bilinear", *IMAGENET),
            1024,
            16,
            0,
            "cls",
            _TINY,
        ),
        ModelSpec(
            "uni2_h",
            "vit_giant_patch14_224",
            "MahmoodLab/UNI2-h",
            {
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "mlp_layer": "swiglu_packed",
                "act_layer": "silu",
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            Transform(224, None, "bilinear", *IMAGENET),
            1536,
            14,
            8,
            "cls",
            _TINY,
        ),
        ModelSpec(
            "virchow2",
            "vit_huge_patch14_224",
            "paige-ai/Virchow2",
            {
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "mlp_ratio": 5.3375,
                "reg_tokens": 4,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": "swiglu_packed",
                "act_layer": "silu",
            },
            Transform(224, None, "bicubic", *IMAGENET),
            1280,
            14,
            4,
            "cls_mean",
            _TINY,
        ),
        ModelSpec(
            "prov_gigapath",
            "vit_giant_patch14_dinov2",
            "prov-gigapath/prov-gigapath",
            {"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
            Transform(224, 256, "bicubic", *IMAGENET),
            1536,
            14,
            0,
            "cls",
            _TINY,
        ),
        # Bare DINOv2-style architectures for students (and benchmark teachers): no published weights, so
        # seeded random init unless `weights` are given. Same normalisation as the H-optimus family.
        ModelSpec(
            "vit_s14_reg4",
            "vit_small_patch14_reg4_dinov2",
            None,
            {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
            Transform(224, None, "bilinear", *BIOPTIMUS),
            384,
            14,
            4,
            "cls",
            _TINY,
            random_init=True,
        ),
        ModelSpec(
            "vit_l14_reg4",
            "vit_large_patch14_reg4_dinov2",
            None,
            {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
            Transform(224, None, "bilinear", *BIOPTIMUS),
            1024,
            14,
            4,
            "cls",
            _TINY,
            random_init=True,
        ),
    )
}


def list_models() -> list[str]:
    return sorted([*_REGISTRY, *(f"{n}_tiny" for n in _REGISTRY)])


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model or of its `_tiny` twin (student:<run> specs come from checkpoints)."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    base = name.removesuffix("_tiny")
    if name.endswith("_tiny") and base in _REGISTRY:
        spec = _REGISTRY[base]
        return replace(
            spec,
            name=name,
            hub_id=None,
            kwargs={**spec.kwargs, **spec.tiny},
            embed_dim=spec.tiny["embed_dim"],
            random_init=True,
        )
    raise ModelError(f"unknown model '{name}'; registered: {', '.join(list_models())}, or student:<run>")


def build_model(spec: ModelSpec, pretrained_from_hub: bool = False) -> torch.nn.Module:
    kwargs = {k: _LAYERS.get(v, v) if isinstance(v, str) else v for k, v in spec.kwargs.items()}
    name = f"hf-hub:{spec.hub_id}" if pretrained_from_hub else spec.arch
    return timm.create_model(name, pretrained=pretrained_from_hub, **kwargs)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never a bare pickle
    except Exception as exc:
        raise ModelError(
            f"cannot read weights {path} with weights_only=True ({exc}); convert to safetensors"
        ) from exc
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "backbone.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


@dataclass
class LoadedModel:
    model: torch.nn.Module
    spec: ModelSpec
    weights: str  # where the weights came from (path, hub id or random init)
    weights_digest: str


def load_model(
    name: str,
    weights: str | Path | None = None,
    seed: int = 0,
    results_dir: str | Path = "results",
    random_init: bool = False,
) -> LoadedModel:
    """Build `name` in eval mode with its weights (see the module docstring for the sources).

    `random_init=True` builds the real architecture with seeded random weights (for timing, never results).
    """
    if name.startswith("student:"):
        path = (
            Path(weights)
            if weights
            else Path(results_dir) / "students" / name.split(":", 1)[1] / "student.safetensors"
        )
        return load_student(path, name)
    spec = get_spec(name)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"weights for '{name}' not found: {path}")
        model = build_model(spec)
        state = _strip_prefixes(_read_state_dict(path))
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ModelError(f"weights {path} do not fit '{name}' ({spec.arch}): {exc}") from exc
        if missing or unexpected:
            raise ModelError(
                f"weights {path} do not fit '{name}' ({spec.arch}): missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
        return LoadedModel(model.eval(), spec, str(path), file_digest(path))
    if spec.random_init or random_init:
        # Seeded per name: twins that share an architecture (e.g. the tiny teacher and tiny student) must
        # not start from the same weights, or a "random baseline" would equal the teacher.
        torch.manual_seed(_name_seed(name, seed))
        return LoadedModel(build_model(spec).eval(), spec, f"random-init(seed={seed})", f"random-init:{seed}")
    if spec.hub_id is None:
        raise ModelError(f"'{name}' has no hub id: give its weights with --weights PATH")
    try:
        model = build_model(spec, pretrained_from_hub=True)
    except Exception as exc:  # hub errors come in many types (gated, offline, not found, network)
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False")
        raise ModelError(
            f"cannot load weights of '{name}' from hf-hub:{spec.hub_id} ({type(exc).__name__}: {exc}). "
            f"Provide them: pass --weights /path/to/model.safetensors (config `models.{name}.weights`), or "
            f"request access on the hub, `huggingface-cli login`, and download once"
            + (" (HF_HUB_OFFLINE is set: only the local cache is searched)" if offline else "")
        ) from exc
    return LoadedModel(model.eval(), spec, f"hf-hub:{spec.hub_id}", _hub_digest(spec.hub_id))


def _name_seed(name: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


def _hub_digest(hub_id: str) -> str:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(hub_id, "model.safetensors")
        if isinstance(cached, str):
            return file_digest(cached)
    except Exception:
        pass
    return f"hf-hub:{hub_id}"


def save_student(
    model: torch.nn.Module, spec: ModelSpec, path: str | Path, extra: dict[str, Any] | None = None
) -> None:
    """Write a student checkpoint: safetensors weights with the architecture in the metadata."""
    from histodistill.atomic import atomic_path

    meta = {STUDENT_META_KEY: json.dumps({"spec": spec.to_json(), **(extra or {})})}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_student(path: str | Path, name: str) -> LoadedModel:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"student checkpoint for '{name}' not found: {path} (run the distill rule first)")
    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get(STUDENT_META_KEY)
    if raw is None:
        raise ModelError(
            f"{path} is not a histodistill student checkpoint (no '{STUDENT_META_KEY}' metadata)"
        )
    data = json.loads(raw)["spec"]
    data["transform"] = Transform(
        **{
            **data["transform"],
            "mean": tuple(data["transform"]["mean"]),
            "std": tuple(data["transform"]["std"]),
        }
    )
    spec = replace(ModelSpec(**data), name=name, random_init=False)
    model = build_model(spec)
    model.load_state_dict(load_file(path), strict=True)
    return LoadedModel(model.eval(), spec, str(path), file_digest(path))


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pooling: str) -> torch.Tensor:
    """[B, T, D] tokens → cls [B, D] | cls_mean [B, 2D] (CLS ⊕ mean of patch tokens, registers excluded)
    | patch_tokens [B, P, D]."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "cls_mean":
        return torch.cat([tokens[:, 0], tokens[:, num_prefix_tokens:].mean(dim=1)], dim=-1)
    if pooling == "patch_tokens":
        return tokens[:, num_prefix_tokens:]
    raise ModelError(f"unknown pooling '{pooling}'; choose one of {POOLINGS}")
