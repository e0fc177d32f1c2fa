"""The encoder interface every registered model implements, and its three backends: timm, HF
transformers and open_clip.

An encoder is a `torch.nn.Module` with

- `forward_features(images) -> tokens`: images float [B, 3, H, W], already resized and normalised by the
  model's `Transform`; tokens [B, T, D] with T = `num_prefix_tokens` + (H/p)·(W/p): the CLS token first,
  then the register tokens, then the patch tokens in row-major grid order (p: the patch size);
- `embed_dim` (D) and `num_prefix_tokens` (1 + registers);
- optionally `forward_pooled(images) -> [B, E]`: the model's own published image embedding where it is not
  a function of the tokens alone (PLIP's visual projection, CONCH's attentional pooler); pooling `pooled`.

The wrappers' `forward(images)` equals `forward_features(images)`, so FLOP counters and `nn.Module` hooks
see the token computation (a timm ViT's `forward` adds its head: with `num_classes=0` a pooling, no matmul).
timm ViTs satisfy the interface as they are (same names); HF transformers models are wrapped
in `HFEncoder`, CONCH's image tower is `ConchVisionTower`. The rest of a model's description (transform,
token layout, precision, hub id) is its `ModelSpec` in registry.py; a `Backend` turns a spec into an
encoder: `build` (architecture, random init), `from_hub` (published weights) and `native` (the module
whose state dict a weight file holds, for `--weights PATH`).
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import timm
import torch
from torch import nn

from histodistill.errors import ModelError

if TYPE_CHECKING:
    from histodistill.models.registry import ModelSpec

POOLINGS = ("cls", "cls_mean", "patch_tokens", "pooled")
_TIMM_LAYERS = {
    "swiglu_packed": timm.layers.SwiGLUPacked,
    "silu": torch.nn.SiLU,
}  # names keep specs JSON-able


@runtime_checkable
class Encoder(Protocol):
    """What every model `load_model` returns implements (see the module docstring for shapes)."""

    embed_dim: int
    num_prefix_tokens: int

    def forward_features(self, images: torch.Tensor) -> torch.Tensor: ...


def pool_tokens(tokens: torch.Tensor, num_prefix_tokens: int, pooling: str) -> torch.Tensor:
    """[B, T, D] tokens → cls [B, D] | cls_mean [B, 2D] (CLS ⊕ mean of patch tokens, registers excluded)
    | patch_tokens [B, P, D]. Raises ModelError for another pooling (`pooled` needs the model: `encode`)."""
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "cls_mean":
        return torch.cat([tokens[:, 0], tokens[:, num_prefix_tokens:].mean(dim=1)], dim=-1)
    if pooling == "patch_tokens":
        return tokens[:, num_prefix_tokens:]
    raise ModelError(f"unknown pooling '{pooling}' for tokens; choose one of {POOLINGS[:3]}")


def encode(model: nn.Module, images: torch.Tensor, num_prefix_tokens: int, pooling: str) -> torch.Tensor:
    """One batch through an encoder and a pooling: [B, 3, H, W] → [B, D'] (or [B, P, D] for patch_tokens).

    `pooled` calls the model's own `forward_pooled` (ModelError if it has none); every other pooling is
    `pool_tokens` of `forward_features`.
    """
    if pooling == "pooled":
        forward_pooled = getattr(model, "forward_pooled", None)
        if forward_pooled is None:
            raise ModelError(
                f"{type(model).__name__} has no pooled output; use cls, cls_mean or patch_tokens"
            )
        return forward_pooled(images)
    return pool_tokens(model.forward_features(images), num_prefix_tokens, pooling)


class HFEncoder(nn.Module):
    """A HF transformers vision model as an encoder: tokens are the model's `last_hidden_state`.

    The token layout is the model's own: ViTModel and Dinov2Model [CLS, patches], Dinov2WithRegistersModel
    [CLS, registers, patches], CLIPVisionModel [CLS, patches] (before CLIP's `post_layernorm`, which HF
    applies to the pooled CLS only). `forward_pooled` is the model's projected image embedding
    (`image_embeds`, e.g. CLIPVisionModelWithProjection: post-LN CLS through the visual projection).
    """

    def __init__(self, model: nn.Module, num_prefix_tokens: int):
        super().__init__()
        self.model = model
        self.embed_dim = int(model.config.hidden_size)
        self.num_prefix_tokens = num_prefix_tokens

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=images).last_hidden_state

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=images)
        if getattr(out, "image_embeds", None) is None:
            raise ModelError(f"{type(self.model).__name__} has no projected image embedding ('pooled')")
        return out.image_embeds

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


class ConchVisionTower(nn.Module):
    """CONCH's image tower (MahmoodLab/CONCH, `conch/open_clip_custom/coca_model.py::_build_vision_tower`
    and `vision_tower.py::VisualModel` with `conch_ViT-B-16.json`), built from timm and open_clip parts.

    trunk: timm VisionTransformer (ViT-B/16 at 448 px, class token, no registers) → tokens [B, 1+784, 768].
    `forward_pooled` is CONCH's `encode_image(proj_contrast=False, normalize=False)` = `forward_no_head`:
    open_clip's AttentionalPooler (1 query, 8 heads, d_model 512 over the 768-d trunk tokens) then a
    LayerNorm → [B, 512]. The caption pooler (256 queries) and the contrastive projection into the text
    space are not part of the image embedding and are not built (their checkpoint keys are dropped).
    CONCH's `conch` package is not on PyPI; open_clip's AttentionalPooler has CONCH's parameter names and
    computes the same attention (batch-first instead of sequence-first).
    """

    def __init__(
        self,
        width: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        img_size: int = 448,
        patch_size: int = 16,
        embed_dim_contrast: int = 512,
        attn_pooler_heads: int = 8,
    ):
        super().__init__()
        from open_clip.transformer import AttentionalPooler
        from timm.models.vision_transformer import VisionTransformer

        self.trunk = VisionTransformer(
            embed_dim=width,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            dynamic_img_size=True,
        )
        self.attn_pool_contrast = AttentionalPooler(
            d_model=embed_dim_contrast, context_dim=width, n_head=attn_pooler_heads, n_queries=1
        )
        self.ln_contrast = nn.LayerNorm(embed_dim_contrast)
        self.embed_dim = width
        self.num_prefix_tokens = self.trunk.num_prefix_tokens

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(images)

    def forward_pooled(self, images: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.forward_features(images))[:, 0])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_features(images)


class Backend(ABC):
    """How one library builds and loads encoders from a `ModelSpec` (`spec.backend` names it)."""

    @abstractmethod
    def build(self, spec: ModelSpec) -> nn.Module:
        """The architecture with the library's random init (seed torch before calling)."""

    @abstractmethod
    def from_hub(self, spec: ModelSpec) -> nn.Module:
        """The architecture with its published weights from `spec.hub_id` (raises the library's errors)."""

    def native(self, encoder: nn.Module) -> nn.Module:
        """The module whose `state_dict` a weight file of this model holds (the encoder itself by default)."""
        return encoder

    def select_state(self, spec: ModelSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a weight file's state dict that `native` loads (all of it by default)."""
        return state


class TimmBackend(Backend):
    """timm ViTs: `spec.arch` is a timm model name, `spec.kwargs` its `create_model` keywords."""

    def _kwargs(self, spec: ModelSpec) -> dict[str, Any]:
        return {k: _TIMM_LAYERS.get(v, v) if isinstance(v, str) else v for k, v in spec.kwargs.items()}

    def build(self, spec: ModelSpec) -> nn.Module:
        return timm.create_model(spec.arch, pretrained=False, **self._kwargs(spec))

    def from_hub(self, spec: ModelSpec) -> nn.Module:
        return timm.create_model(f"hf-hub:{spec.hub_id}", pretrained=True, **self._kwargs(spec))


class TransformersBackend(Backend):
    """HF transformers: `spec.arch` is a transformers model class (ViTModel, Dinov2Model,
    Dinov2WithRegistersModel, CLIPVisionModelWithProjection), `spec.kwargs` its config's keywords.

    `from_hub` uses `<arch>.from_pretrained(hub_id)`, or `AutoModel.from_pretrained(hub_id,
    trust_remote_code=True)` when `spec.trust_remote_code` (a hub repo with its own modelling code, e.g.
    Hibou); weights are loaded in float32. A class with an optional pooling head (ViTModel's dense+tanh
    pooler) is built without it: the published embeddings use the tokens.
    """

    def _class(self, spec: ModelSpec) -> type:
        import transformers

        cls = getattr(transformers, spec.arch, None)
        if cls is None:
            raise ModelError(f"'{spec.name}': transformers has no model class '{spec.arch}'")
        return cls

    @staticmethod
    def _init_kwargs(cls: type) -> dict[str, Any]:
        return (
            {"add_pooling_layer": False} if "add_pooling_layer" in inspect.signature(cls).parameters else {}
        )

    def build(self, spec: ModelSpec) -> nn.Module:
        cls = self._class(spec)
        model = cls(cls.config_class(**spec.kwargs), **self._init_kwargs(cls))
        return HFEncoder(model, spec.num_prefix_tokens)

    def from_hub(self, spec: ModelSpec) -> nn.Module:
        if spec.trust_remote_code:
            from transformers import AutoModel

            model = AutoModel.from_pretrained(spec.hub_id, trust_remote_code=True, dtype=torch.float32)
        else:
            cls = self._class(spec)
            model = cls.from_pretrained(spec.hub_id, dtype=torch.float32, **self._init_kwargs(cls))
        return HFEncoder(model, spec.num_prefix_tokens)

    def native(self, encoder: nn.Module) -> nn.Module:
        return encoder.model


class OpenClipBackend(Backend):
    """open_clip-architecture image towers: `spec.arch` `conch_vision` is `ConchVisionTower(**spec.kwargs)`.

    Weight files are CONCH's full CoCa checkpoint (`pytorch_model.bin` on the hub, or a local copy): the
    image tower's keys (`visual.*`) are kept, minus the caption pooler and the contrastive projection.
    """

    ARCHS = {"conch_vision": ConchVisionTower}
    CHECKPOINT = "pytorch_model.bin"
    UNUSED = ("attn_pool_caption.", "ln_caption.", "proj_contrast")

    def build(self, spec: ModelSpec) -> nn.Module:
        if spec.arch not in self.ARCHS:
            raise ModelError(f"'{spec.name}': unknown open_clip architecture '{spec.arch}'")
        return self.ARCHS[spec.arch](**spec.kwargs)

    def from_hub(self, spec: ModelSpec) -> nn.Module:
        from huggingface_hub import hf_hub_download

        from histodistill.models.registry import read_state_dict

        path = hf_hub_download(spec.hub_id, self.CHECKPOINT)
        model = self.build(spec)
        model.load_state_dict(self.select_state(spec, read_state_dict(path)), strict=True)
        return model

    def select_state(self, spec: ModelSpec, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if any(k.startswith("visual.") for k in state):
            state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        return {k: v for k, v in state.items() if not k.startswith(self.UNUSED)}


BACKENDS: dict[str, Backend] = {
    "timm": TimmBackend(),
    "transformers": TransformersBackend(),
    "open_clip": OpenClipBackend(),
}


def backend_of(spec: ModelSpec) -> Backend:
    """The backend named by `spec.backend` (ModelError for an unknown one)."""
    if spec.backend not in BACKENDS:
        raise ModelError(f"'{spec.name}': unknown backend '{spec.backend}'; known: {sorted(BACKENDS)}")
    return BACKENDS[spec.backend]
