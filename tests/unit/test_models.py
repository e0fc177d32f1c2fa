import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from histodistill.errors import ModelError
from histodistill.models import get_spec, list_models, load_model, pool_tokens, save_student
from histodistill.models.registry import build_model
from histodistill.models.transforms import ModelTransform

# name → (params in millions, embed dim, prefix tokens, patch size): the published architectures.
PUBLISHED = {
    "h_optimus_0": (1134.8, 1536, 5, 14),
    "h0_mini": (85.7, 768, 5, 14),
    "uni": (303.4, 1024, 1, 16),
    "uni2_h": (681.4, 1536, 9, 14),
    "virchow2": (631.2, 1280, 5, 14),
    "prov_gigapath": (1134.8, 1536, 1, 14),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_real_architectures_match_the_published_models(name):
    spec = get_spec(name)
    with torch.device("meta"):  # no memory: shapes only
        model = build_model(spec)
    params, dim, prefix, patch = PUBLISHED[name]
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == params
    assert model.embed_dim == spec.embed_dim == dim
    assert model.num_prefix_tokens == spec.num_prefix_tokens == prefix
    assert model.patch_embed.patch_size == (patch, patch)


def test_h_optimus_0_constants():
    spec = get_spec("h_optimus_0")
    assert spec.hub_id == "bioptimus/H-optimus-0"
    assert spec.kwargs["init_values"] == 1e-5 and spec.kwargs["dynamic_img_size"] is False
    assert spec.transform.mean == (0.707223, 0.578729, 0.703617)
    assert spec.transform.std == (0.211883, 0.230117, 0.177517)
    assert (
        get_spec("h0_mini").kwargs["mlp_layer"] == "swiglu_packed"
        and get_spec("h0_mini").kwargs["act_layer"] == "silu"
    )
    assert get_spec("virchow2").default_pooling == "cls_mean"


@pytest.mark.parametrize("name", [n for n in list_models() if n.endswith("_tiny")])
def test_tiny_twins_keep_the_token_layout(name):
    loaded = load_model(name, seed=1)
    base = get_spec(name.removesuffix("_tiny"))
    with torch.inference_mode():
        tokens = loaded.model.forward_features(torch.zeros(2, 3, 224, 224))
    n_patches = (224 // base.patch_size) ** 2
    assert tokens.shape == (2, base.num_prefix_tokens + n_patches, loaded.spec.embed_dim)
    assert loaded.spec.num_prefix_tokens == base.num_prefix_tokens


def test_tiny_init_is_seeded():
    a, b, c = (load_model("h0_mini_tiny", seed=s).model for s in (1, 1, 2))
    assert torch.equal(a.cls_token, b.cls_token) and not torch.equal(a.cls_token, c.cls_token)


def test_poolings_on_known_tokens():
    # 2 images, 1 CLS + 4 registers + 3 patch tokens, dim 2: values chosen so each pooling is checkable.
    tokens = torch.zeros(2, 8, 2)
    tokens[:, 0] = torch.tensor([1.0, 2.0])
    tokens[:, 1:5] = 100.0  # registers: must never enter the patch mean
    tokens[0, 5:] = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 3.0]])
    cls = pool_tokens(tokens, 5, "cls")
    assert torch.equal(cls, torch.tensor([[1.0, 2.0], [1.0, 2.0]]))
    cls_mean = pool_tokens(tokens, 5, "cls_mean")
    assert torch.equal(cls_mean[0], torch.tensor([1.0, 2.0, 2.0, 1.0]))
    assert torch.equal(cls_mean[1], torch.tensor([1.0, 2.0, 0.0, 0.0]))
    assert pool_tokens(tokens, 5, "patch_tokens").shape == (2, 3, 2)
    with pytest.raises(ModelError, match="unknown pooling"):
        pool_tokens(tokens, 5, "mean")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_poolings_for_each_registered_token_layout(name):
    """Known tokens laid out as the model lays them out: CLS, its registers, then the patch grid."""
    spec = get_spec(name)
    grid = (224 // spec.patch_size) ** 2
    tokens = torch.full((1, spec.num_prefix_tokens + grid, 3), -50.0)  # registers: a value that must not leak
    tokens[0, 0] = torch.tensor([7.0, 8.0, 9.0])
    tokens[0, spec.num_prefix_tokens :] = torch.arange(grid, dtype=torch.float32)[:, None]
    pooled = pool_tokens(tokens, spec.num_prefix_tokens, "cls_mean")[0]
    assert pooled[:3].tolist() == [7.0, 8.0, 9.0]
    assert pooled[3:].tolist() == [(grid - 1) / 2] * 3
    assert pool_tokens(tokens, spec.num_prefix_tokens, "patch_tokens").shape == (1, grid, 3)


def test_unknown_model():
    with pytest.raises(ModelError, match="unknown model 'h_optimus_9'"):
        load_model("h_optimus_9")


def test_local_weights_safetensors_and_weights_only_torch(tmp_path):
    reference = load_model("uni_tiny", seed=3).model
    st = tmp_path / "w.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in reference.state_dict().items()}, str(st))
    pt = tmp_path / "w.pth"
    torch.save({"model": reference.state_dict()}, pt)
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        expected = reference.forward_features(x)
        for path in (st, pt):
            loaded = load_model("uni_tiny", weights=path)
            assert loaded.weights_digest.startswith("sha256:")
            assert torch.allclose(loaded.model.forward_features(x), expected)
    with pytest.raises(ModelError, match="do not fit"):
        load_model("h0_mini_tiny", weights=st)
    with pytest.raises(ModelError, match="not found"):
        load_model("uni_tiny", weights=tmp_path / "missing.safetensors")


def test_student_checkpoint_round_trip(tmp_path):
    loaded = load_model("h0_mini_tiny", seed=4)
    path = tmp_path / "students" / "run1" / "student.safetensors"
    save_student(loaded.model, loaded.spec, path, extra={"run": "run1"})
    student = load_model("student:run1", weights=path)  # the path arrives explicitly (input.student)
    assert student.spec.num_prefix_tokens == 5 and student.spec.arch == loaded.spec.arch
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode():
        assert torch.equal(student.model.forward_features(x), loaded.model.forward_features(x))
    with pytest.raises(ModelError, match="run the distill rule"):
        load_model("student:nope")  # no checkpoint given
    with pytest.raises(ModelError, match="run the distill rule"):
        load_model("student-nope", weights=tmp_path / "students" / "nope" / "student.safetensors")


def test_offline_hub_without_cache_says_how_to_provide_weights(tmp_path):
    code = "from histodistill.models import load_model; load_model('h_optimus_0')"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode != 0
    assert "ModelError" in result.stderr and "hf-hub:bioptimus/H-optimus-0" in result.stderr
    assert "--weights" in result.stderr and "HF_HUB_OFFLINE is set" in result.stderr


def test_transform_resizes_crops_and_normalizes():
    t = ModelTransform(get_spec("h_optimus_0").transform)
    tile = torch.full((256, 256, 3), 255, dtype=torch.uint8)
    x = t(tile.numpy())
    assert x.shape == (3, 224, 224)
    expected = (1 - torch.tensor(get_spec("h_optimus_0").transform.mean)) / torch.tensor(
        get_spec("h_optimus_0").transform.std
    )
    assert torch.allclose(x[:, 0, 0], expected)
    g = ModelTransform(get_spec("prov_gigapath").transform)  # resize 256 then centre crop 224
    assert g(torch.zeros(224, 224, 3, dtype=torch.uint8)).shape == (3, 224, 224)
