"""Every model's constants in one place: backend, architecture, hub id, transform, token layout, pooling.

`load_model(name, weights=None)` builds the encoder (models/encoders.py: timm, HF transformers or open_clip)
and loads weights from a local file (safetensors, or a torch checkpoint read with `weights_only=True`) or
from the hub id (respecting HF_HUB_OFFLINE). A missing or gated weight is a ModelError saying how to
provide it. Each entry has a `<name>_tiny` twin: the same backend, architecture family, token layout and
transform, two narrow blocks (width 64), seeded random init, for tests and the demo. `student:<run>`
(models/ref.py) loads a checkpoint this pipeline wrote (`save_student`) from an explicit path; its
safetensors metadata holds the architecture.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from histodistill.errors import ModelError
from histodistill.models.encoders import POOLINGS, backend_of, pool_tokens
from histodistill.models.ref import ModelRef

__all__ = ["POOLINGS", "pool_tokens"]  # re-exported: callers import them from the registry

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BIOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
OPENAI_CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
STUDENT_META_KEY = "histodistill_model"
TINY_WIDTH = 64  # every `_tiny` twin's token width
TINY_HEAD = 32  # a twin's pooled-output width, where the model has its own head (`head_dim`)


@dataclass(frozen=True)
class Transform:
    """Input transform: optional resize of the short side to `resize` px, centre crop to `size` px
    (a tile whose size differs and no `resize`: resized to `size`×`size`), normalisation by mean/std
    (of [0, 1] pixel values)."""

    size: int = 224
    resize: int | None = None
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET[0]
    std: tuple[float, float, float] = IMAGENET[1]


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A registered model (built with keywords only).

    backend: `timm`, `transformers` or `open_clip` (models/encoders.py); arch: that library's architecture
    (timm model name, transformers class, open_clip tower); kwargs: its build keywords (timm `create_model`
    keywords, a transformers config's fields, the tower's arguments); hub_id: where the published weights
    are (None: none published). Token layout: tokens [B, 1 + num_registers + (size/patch_size)², embed_dim],
    CLS first. head_dim: width of the model's own pooled output (pooling `pooled`), None if it has none.
    precision: the autocast dtype on GPU when a run asks for `auto` (`bf16`, `fp16` or `fp32`).
    tiny: kwargs overrides of the `_tiny` twin (width TINY_WIDTH, two blocks).
    """

    name: str
    backend: str = "timm"
    arch: str
    hub_id: str | None
    kwargs: dict[str, Any]
    transform: Transform
    embed_dim: int
    patch_size: int
    num_registers: int = 0
    default_pooling: str = "cls"
    head_dim: int | None = None
    precision: str = "bf16"
    trust_remote_code: bool = False
    tiny: dict[str, Any] = field(default_factory=dict)
    random_init: bool = False

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_registers

    def pooled_dim(self, pooling: str) -> int:
        """Width of one pooled embedding: D, 2D for cls_mean, head_dim for pooled (ModelError if none)."""
        if pooling == "pooled":
            if self.head_dim is None:
                raise ModelError(f"'{self.name}' has no pooled output; use cls, cls_mean or patch_tokens")
            return self.head_dim
        return 2 * self.embed_dim if pooling == "cls_mean" else self.embed_dim

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# Tiny twins: the real token layout at a toy size. LayerScale starts at 1 (the real models' 1e-5 is an
# init for training from scratch; trained weights have learned scales): with 1e-5 and random weights every
# block is nearly skipped and all images embed to almost the same vector, which no benchmark can tell apart.
_TINY = {"embed_dim": TINY_WIDTH, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0, "init_values": 1.0}
_TINY_PLAIN = {"embed_dim": TINY_WIDTH, "depth": 2, "num_heads": 2, "mlp_ratio": 4.0}  # no LayerScale
_TINY_HF = {"hidden_size": TINY_WIDTH, "num_hidden_layers": 2, "num_attention_heads": 2}
_SPECS = (
    ModelSpec(
        name="h_optimus_0",
        arch="vit_giant_patch14_reg4_dinov2",
        hub_id="bioptimus/H-optimus-0",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
        transform=Transform(224, None, "bilinear", *BIOPTIMUS),
        embed_dim=1536,
        patch_size=14,
        num_registers=4,
        tiny=_TINY,
    ),
    ModelSpec(
        name="h0_mini",
        arch="vit_base_patch14_reg4_dinov2",
        hub_id="bioptimus/H0-mini",
        kwargs={
            "img_size": 224,
            "init_values": 1e-5,
            "dynamic_img_size": False,
            "num_classes": 0,
            "mlp_ratio": 5.33334,
            "mlp_layer": "swiglu_packed",
            "act_layer": "silu",
        },
        transform=Transform(224, None, "bilinear", *BIOPTIMUS),
        embed_dim=768,
        patch_size=14,
        num_registers=4,
        tiny=_TINY,
    ),
    ModelSpec(
        name="uni",
        arch="vit_large_patch16_224",
        hub_id="MahmoodLab/UNI",
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True, "num_classes": 0},
        transform=Transform(224, None, "bilinear", *IMAGENET),
        embed_dim=1024,
        patch_size=16,
        tiny=_TINY,
    ),
    ModelSpec(
        name="uni2_h",
        arch="vit_giant_patch14_224",
        hub_id="MahmoodLab/UNI2-h",
        kwargs={
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
        transform=Transform(224, None, "bilinear", *IMAGENET),
        embed_dim=1536,
        patch_size=14,
        num_registers=8,
        tiny=_TINY,
    ),
    ModelSpec(
        name="virchow2",
        arch="vit_huge_patch14_224",
        hub_id="paige-ai/Virchow2",
        kwargs={
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
        transform=Transform(224, None, "bicubic", *IMAGENET),
        embed_dim=1280,
        patch_size=14,
        num_registers=4,
        default_pooling="cls_mean",
        tiny=_TINY,
    ),
    ModelSpec(
        name="prov_gigapath",
        arch="vit_giant_patch14_dinov2",
        hub_id="prov-gigapath/prov-gigapath",
        kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
        transform=Transform(224, 256, "bicubic", *IMAGENET),
        embed_dim=1536,
        patch_size=14,
        tiny=_TINY,
    ),
    # ---- the paper's comparison set beyond timm-hub ViTs ----------------------------------------------
    # Phikon (Filiot et al. 2023): iBOT ViT-B/16 as a HF ViTModel; embedding = CLS of last_hidden_state.
    # ViTImageProcessor: resize to 224×224 (bilinear), ImageNet mean/std.
    ModelSpec(
        name="phikon",
        backend="transformers",
        arch="ViTModel",
        hub_id="owkin/phikon",
        kwargs={
            "hidden_size": 768,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "intermediate_size": 3072,
            "image_size": 224,
            "patch_size": 16,
            "qkv_bias": True,
            "layer_norm_eps": 1e-12,
        },
        transform=Transform(224, None, "bilinear", *IMAGENET),
        embed_dim=768,
        patch_size=16,
        tiny={**_TINY_HF, "intermediate_size": 4 * TINY_WIDTH},
    ),
    # Phikon-v2 (Filiot et al. 2024): DINOv2 ViT-L/16 as a HF Dinov2Model, no registers; embedding = CLS.
    # Config values for a local-weights build are the ViT-L/16 ones; `layerscale_value` and `layer_norm_eps`
    # are our reading of the hub config (unverified offline; a hub load takes the hub's config).
    ModelSpec(
        name="phikon_v2",
        backend="transformers",
        arch="Dinov2Model",
        hub_id="owkin/phikon-v2",
        kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "mlp_ratio": 4,
            "image_size": 224,
            "patch_size": 16,
            "layerscale_value": 1e-5,
            "layer_norm_eps": 1e-6,
        },
        transform=Transform(224, None, "bilinear", *IMAGENET),
        embed_dim=1024,
        patch_size=16,
        tiny={**_TINY_HF, "layerscale_value": 1.0},
    ),
    # Hibou-L (HistAI 2024): DINOv2 ViT-L/14 with 4 registers. The hub repo ships its own modelling code
    # (loaded with trust_remote_code); a local-weights build and the twin use transformers'
    # Dinov2WithRegistersModel, the same layout [CLS, 4 registers, 256 patches]. Embedding = CLS
    # (its pooler_output is the post-LN CLS). Mean/std from its image processor; resize 224 then crop 224.
    ModelSpec(
        name="hibou_l",
        backend="transformers",
        arch="Dinov2WithRegistersModel",
        hub_id="histai/hibou-L",
        trust_remote_code=True,
        kwargs={
            "hidden_size": 1024,
            "num_hidden_layers": 24,
            "num_attention_heads": 16,
            "mlp_ratio": 4,
            "image_size": 224,
            "patch_size": 14,
            "num_register_tokens": 4,
            "layerscale_value": 1e-5,
            "layer_norm_eps": 1e-6,
        },
        transform=Transform(224, 224, "bicubic", *HIBOU),
        embed_dim=1024,
        patch_size=14,
        num_registers=4,
        tiny={**_TINY_HF, "layerscale_value": 1.0},
    ),
    # Kaiko ViT-B/8 (kaiko.ai 2024, "Towards large-scale training of pathology foundation models"), timm
    # weights on the hub. Their README: Resize(224) → CenterCrop(224), mean = std = 0.5. We use the CLS
    # token (cls_mean is available); which pooling their eva benchmarks use is not settled here.
    ModelSpec(
        name="kaiko_vitb8",
        arch="vit_base_patch8_224",
        hub_id="1aurent/vit_base_patch8_224.kaiko_ai_towards_large_pathology_fms",
        kwargs={"img_size": 224, "dynamic_img_size": True, "num_classes": 0},
        transform=Transform(224, 224, "bilinear", *HALF),
        embed_dim=768,
        patch_size=8,
        tiny=_TINY_PLAIN,
    ),
    # CONCH (Lu et al. 2024): the image tower of a CoCa model, ViT-B/16 at 448 px (models/encoders.py,
    # ConchVisionTower). Embedding `pooled` = CONCH's encode_image(proj_contrast=False, normalize=False),
    # 512-d. Transform: Resize(448, bicubic) → CenterCrop(448), OpenAI CLIP mean/std.
    ModelSpec(
        name="conch",
        backend="open_clip",
        arch="conch_vision",
        hub_id="MahmoodLab/conch",
        kwargs={"width": 768, "depth": 12, "num_heads": 12, "img_size": 448, "patch_size": 16},
        transform=Transform(448, 448, "bicubic", *OPENAI_CLIP),
        embed_dim=768,
        patch_size=16,
        default_pooling="pooled",
        head_dim=512,
        tiny={
            "width": TINY_WIDTH,
            "depth": 2,
            "num_heads": 2,
            "embed_dim_contrast": TINY_HEAD,
            "attn_pooler_heads": 2,
        },
    ),
    # PLIP (Huang et al. 2023): CLIP ViT-B/32 fine-tuned on OpenPath; the image tower as a HF
    # CLIPVisionModelWithProjection. Embedding `pooled` = CLIPModel.get_image_features (post-LN CLS through
    # the visual projection), 512-d. CLIPImageProcessor: resize short side 224 (bicubic), crop 224.
    ModelSpec(
        name="plip",
        backend="transformers",
        arch="CLIPVisionModelWithProjection",
        hub_id="vinid/plip",
        kwargs={
            "hidden_size": 768,
            "intermediate_size": 3072,
            "num_hidden_layers": 12,
            "num_attention_heads": 12,
            "image_size": 224,
            "patch_size": 32,
            "projection_dim": 512,
            "hidden_act": "quick_gelu",
        },
        transform=Transform(224, 224, "bicubic", *OPENAI_CLIP),
        embed_dim=768,
        patch_size=32,
        default_pooling="pooled",
        head_dim=512,
        tiny={**_TINY_HF, "intermediate_size": 4 * TINY_WIDTH, "projection_dim": TINY_HEAD},
    ),
    # Bare DINOv2-style architectures for students (and benchmark teachers): no published weights, so
    # seeded random init unless `weights` are given. Same normalisation as the H-optimus family.
    ModelSpec(
        name="vit_s14_reg4",
        arch="vit_small_patch14_reg4_dinov2",
        hub_id=None,
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
        transform=Transform(224, None, "bilinear", *BIOPTIMUS),
        embed_dim=384,
        patch_size=14,
        num_registers=4,
        tiny=_TINY,
        random_init=True,
    ),
    ModelSpec(
        name="vit_l14_reg4",
        arch="vit_large_patch14_reg4_dinov2",
        hub_id=None,
        kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False, "num_classes": 0},
        transform=Transform(224, None, "bilinear", *BIOPTIMUS),
        embed_dim=1024,
        patch_size=14,
        num_registers=4,
        tiny=_TINY,
        random_init=True,
    ),
)
_REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
if any(ModelRef.parse(name).is_student for name in _REGISTRY):  # `student-…` is a student reference
    raise ModelError("a registry name may not start with 'student'")


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add `spec` to the registry (its `_tiny` twin comes with it); returns it.

    Raises ModelError if the name is taken, is a student reference (`student-…`), or names an unknown
    backend. Registry entries of this package are in `_SPECS`; this is for code that adds its own.
    """
    if spec.name in _REGISTRY or spec.name.endswith("_tiny"):
        raise ModelError(f"model '{spec.name}' is already registered (or names a `_tiny` twin)")
    if ModelRef.parse(spec.name).is_student:
        raise ModelError(f"a registry name may not start with 'student': '{spec.name}'")
    backend_of(spec)
    _REGISTRY[spec.name] = spec
    return spec


def list_models() -> list[str]:
    return sorted([*_REGISTRY, *(f"{n}_tiny" for n in _REGISTRY)])


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model or of its `_tiny` twin (student:<run> specs come from checkpoints).

    Raises ModelError for an unknown name, listing the registered ones.
    """
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
            embed_dim=TINY_WIDTH,
            head_dim=None if spec.head_dim is None else TINY_HEAD,
            random_init=True,
        )
    raise ModelError(f"unknown model '{name}'; registered: {', '.join(list_models())}, or student:<run>")


def build_model(spec: ModelSpec, pretrained_from_hub: bool = False) -> torch.nn.Module:
    """The encoder of `spec` (models/encoders.py): random init, or the hub's weights (the library's errors
    propagate: `load_model` turns them into a ModelError that says how to provide the weights)."""
    backend = backend_of(spec)
    return backend.from_hub(spec) if pretrained_from_hub else backend.build(spec)


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A weight file's state dict: safetensors, or a torch checkpoint read with `weights_only=True` (its
    `state_dict`/`model`/`teacher` entry if it has one). ModelError if torch cannot read it safely."""
    path = Path(path)
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
    model: torch.nn.Module  # an encoder (models/encoders.py), in eval mode
    spec: ModelSpec
    weights: str  # where the weights came from (path, hub id or random init)
    weights_digest: str


def load_model(
    name: str,
    weights: str | Path | None = None,
    seed: int = 0,
    random_init: bool = False,
) -> LoadedModel:
    """Build `name` in eval mode with its weights (see the module docstring for the sources).

    `name` is a registry name, a `_tiny` twin, or a student (`student:<run>` or `student-<run>`, whose
    checkpoint `weights` must name: the workflow passes the distill rule's output). `random_init=True`
    builds the real architecture with seeded random weights (for timing, never results). Raises ModelError
    for an unknown name, weights that are missing or do not fit, or hub weights that cannot be had.
    """
    ref = ModelRef.parse(name)
    if ref.is_student:
        if weights is None:
            raise ModelError(
                f"no checkpoint given for '{ref.id}': pass its path (--weights; in the workflow the distill "
                f"rule's output reaches the job as input.student) — run the distill rule first"
            )
        return load_student(weights, ref.id)
    spec = get_spec(name)
    backend = backend_of(spec)
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise ModelError(f"weights for '{name}' not found: {path}")
        model = backend.build(spec)
        state = backend.select_state(spec, _strip_prefixes(read_state_dict(path)))
        try:
            missing, unexpected = backend.native(model).load_state_dict(state, strict=False)
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
        return LoadedModel(
            backend.build(spec).eval(), spec, f"random-init(seed={seed})", f"random-init:{seed}"
        )
    if spec.hub_id is None:
        raise ModelError(f"'{name}' has no hub id: give its weights with --weights PATH")
    try:
        model = backend.from_hub(spec)
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

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(hub_id, filename)
            if isinstance(cached, str):
                return file_digest(cached)
    except Exception:
        pass
    return f"hf-hub:{hub_id}"


def save_student(
    model: torch.nn.Module, spec: ModelSpec, path: str | Path, extra: dict[str, Any] | None = None
) -> None:
    """Write a student checkpoint: safetensors weights (of the backend's native module) with the spec in
    the metadata, atomically."""
    from histodistill.atomic import atomic_path

    meta = {STUDENT_META_KEY: json.dumps({"spec": spec.to_json(), **(extra or {})})}
    native = backend_of(spec).native(model)
    state = {k: v.detach().contiguous().cpu() for k, v in native.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)


def load_student(path: str | Path, name: str) -> LoadedModel:
    """A checkpoint `save_student` wrote, as `name` (`student:<run>`). ModelError if the file is missing
    or is not a histodistill student checkpoint."""
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
    backend_of(spec).native(model).load_state_dict(load_file(path), strict=True)
    return LoadedModel(model.eval(), spec, str(path), file_digest(path))
