"""Encoder backends beyond timm (HF transformers, open_clip), the comparison set, and the one ModelRef."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from histodistill.embed import EmbeddingStore, extract_embeddings
from histodistill.errors import ModelError
from histodistill.models import Encoder, ModelRef, encode, get_spec, load_model, register_model, registry
from histodistill.models.registry import ModelSpec, Transform
from histodistill.models.transforms import ModelTransform
from histodistill.tilestore import TileStore, pack_tiles
from histodistill.tiling import TilingConfig, tile_slide

# name → (backend, prefix tokens, patch grid side, default pooling, mean): the published layouts.
COMPARISON = {
    "phikon": ("transformers", 1, 14, "cls", (0.485, 0.456, 0.406)),
    "phikon_v2": ("transformers", 1, 14, "cls", (0.485, 0.456, 0.406)),
    "hibou_l": ("transformers", 5, 16, "cls", (0.7068, 0.5755, 0.722)),
    "kaiko_vitb8": ("timm", 1, 28, "cls", (0.5, 0.5, 0.5)),
    "conch": ("open_clip", 1, 28, "pooled", (0.48145466, 0.4578275, 0.40821073)),
    "plip": ("transformers", 1, 7, "pooled", (0.48145466, 0.4578275, 0.40821073)),
}


def test_model_ref_translates_both_forms():
    for text in ("student:run1", "student-run1"):
        ref = ModelRef.parse(text)
        assert ref.is_student and ref.run == "run1"
        assert ref.id == "student:run1" and ref.slug == "student-run1" and str(ref) == "student:run1"
    assert ModelRef.parse(ModelRef.parse("student:a-b.2").slug) == ModelRef.student("a-b.2")
    plain = ModelRef.parse("h0_mini_tiny")
    assert not plain.is_student and plain.id == plain.slug == "h0_mini_tiny"
    with pytest.raises(ModelError, match="registry model"):
        _ = plain.run
    for bad in ("student:", "student-", "a/b", "x:y", ""):
        with pytest.raises(ModelError, match="invalid"):
            ModelRef.parse(bad)


@pytest.mark.parametrize("name", sorted(COMPARISON))
def test_comparison_twins_have_the_published_layout_and_transform(name):
    backend, prefix, grid, pooling, mean = COMPARISON[name]
    spec = get_spec(name)
    assert spec.backend == backend and spec.num_prefix_tokens == prefix and spec.default_pooling == pooling
    assert spec.transform.size // spec.patch_size == grid and spec.transform.mean == mean
    loaded = load_model(f"{name}_tiny", seed=1)
    assert isinstance(loaded.model, Encoder) and loaded.spec.transform == spec.transform
    x = torch.rand(2, 3, spec.transform.size, spec.transform.size)
    with torch.inference_mode():
        tokens = loaded.model.forward_features(x)
        pooled = encode(loaded.model, x, loaded.spec.num_prefix_tokens, pooling)
        cls_mean = encode(loaded.model, x, loaded.spec.num_prefix_tokens, "cls_mean")
    assert tokens.shape == (2, prefix + grid**2, loaded.spec.embed_dim)
    assert pooled.shape == (2, loaded.spec.pooled_dim(pooling))
    # registers are excluded from the patch mean, for every backend
    torch.testing.assert_close(cls_mean[:, loaded.spec.embed_dim :], tokens[:, prefix:].mean(1))
    if backend != "timm":  # the wrappers' forward is the token computation (timm's adds its pooling head)
        assert loaded.model.forward(x).shape == tokens.shape


def test_twins_are_seeded_per_name():
    a, b = (load_model("phikon_tiny", seed=s).model for s in (1, 1))
    c = load_model("phikon_v2_tiny", seed=1).model
    wa, wb = a.model.embeddings.patch_embeddings.projection.weight, b.model.embeddings.patch_embeddings
    assert torch.equal(wa, wb.projection.weight)
    assert not torch.equal(wa, c.model.embeddings.patch_embeddings.projection.weight)


def test_plip_pooled_is_clips_projected_image_embedding():
    loaded = load_model("plip_tiny")
    x = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        pooled = encode(loaded.model, x, 1, "pooled")
        clip = loaded.model.model  # the HF CLIPVisionModelWithProjection itself
        assert isinstance(clip, transformers.CLIPVisionModelWithProjection)
        hidden = clip.vision_model(pixel_values=x).last_hidden_state
        expected = clip.visual_projection(clip.vision_model.post_layernorm(hidden[:, 0]))
    torch.testing.assert_close(pooled, expected)


def test_conch_loads_the_image_tower_of_a_full_coca_checkpoint(tmp_path):
    reference = load_model("conch_tiny", seed=5).model
    state = {f"visual.{k}": v.contiguous() for k, v in reference.state_dict().items()}
    state["visual.attn_pool_caption.query"] = torch.zeros(4, 32)  # caption pooler, text tower: not used
    state["visual.proj_contrast"] = torch.zeros(32, 32)
    state["text.token_embedding.weight"] = torch.zeros(10, 32)
    path = tmp_path / "conch.safetensors"
    save_file(state, str(path))
    loaded = load_model("conch_tiny", weights=path)
    x = torch.rand(1, 3, 448, 448)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model.forward_pooled(x), reference.forward_pooled(x))
        assert loaded.model.forward_pooled(x).shape == (1, 32)
    with pytest.raises(ModelError, match="do not fit"):
        load_model("plip_tiny", weights=path)


@pytest.mark.parametrize("name", ["phikon", "conch"])  # transformers and open_clip hub loads
def test_offline_hub_without_cache_says_how_to_provide_weights(tmp_path, name):
    code = f"from histodistill.models import load_model; load_model('{name}')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode != 0
    assert "ModelError" in result.stderr and f"hf-hub:{get_spec(name).hub_id}" in result.stderr
    assert "--weights" in result.stderr and "HF_HUB_OFFLINE is set" in result.stderr


def test_student_needs_an_explicit_checkpoint_path():
    with pytest.raises(ModelError, match="input.student"):
        load_model("student-demo")


def test_registered_transformers_vit_embeds_the_demo(tmp_path, demo_slide, monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # this test's registration only
    spec = register_model(
        ModelSpec(
            name="hf_vit_test",
            backend="transformers",
            arch="ViTModel",
            hub_id=None,
            kwargs={
                "hidden_size": 32,
                "num_hidden_layers": 2,
                "num_attention_heads": 2,
                "intermediate_size": 64,
                "image_size": 224,
                "patch_size": 16,
            },
            transform=Transform(224, None, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
            embed_dim=32,
            patch_size=16,
            random_init=True,
        )
    )
    with pytest.raises(ModelError, match="already registered"):
        register_model(spec)
    tile_slide(demo_slide, "a", tmp_path / "a.parquet", TilingConfig(min_tissue=0.0))
    pack_tiles([tmp_path / "a.parquet"], tmp_path / "store.zarr", chunk_tiles=8)
    out = tmp_path / "emb.zarr"
    n = extract_embeddings("hf_vit_test", tmp_path / "store.zarr", out, batch_size=4, num_workers=0)
    tiles = TileStore(tmp_path / "store.zarr")
    emb = EmbeddingStore(out)
    assert n == len(tiles) and emb.embeddings.shape == (len(tiles), 32)
    assert emb.attrs["provenance"]["arch"] == "ViTModel"
    hf = load_model("hf_vit_test").model.model  # the transformers ViTModel itself, same seeded weights
    assert isinstance(hf, transformers.ViTModel)
    transform = ModelTransform(spec.transform)
    x = torch.stack([transform(tiles[i]) for i in range(len(tiles))])
    with torch.inference_mode():
        expected = hf(pixel_values=x).last_hidden_state[:, 0].numpy()  # the CLS embedding, straight from HF
    np.testing.assert_allclose(emb.embeddings, expected, rtol=1e-4, atol=1e-5)
    patches = tmp_path / "patches.zarr"
    extract_embeddings("hf_vit_test", tmp_path / "store.zarr", patches, pooling="patch_tokens", num_workers=0)
    assert EmbeddingStore(patches).embeddings.shape == (len(tiles), 196, 32)
