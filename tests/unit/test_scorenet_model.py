"""ScoreNet's model (histodistill.bench.scorenet.model): the paper's size, shapes, gradient through the top-K."""

import dataclasses

import pytest
import torch

from histodistill.bench import BenchmarkError
from histodistill.bench.scorenet.model import (
    LocalEncoder,
    PaperLocalViT,
    ScoreNet,
    ScoreNetModelConfig,
    n_masked,
)
from histodistill.models import load_model

SMALL = ScoreNetModelConfig(
    region_px=32,
    low_patch_px=8,
    embed_dim=32,
    depth=2,
    num_heads=2,
    n_global_blocks=1,
    mixer_depth=2,
    top_k=2,
    num_samples=200,
    sigma=0.05,
)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_paper_config_has_the_papers_parameter_count():
    """1.79M (the paper): scorer 673,252 (ViT 96 wide, 8 deep, 4 heads, ratio 2, 16 px patches, CPVT PEG,
    plus 4 head-mixing weights) + local ViT 673,248 (same ViT) + mixer 446,400 (4 blocks, ratio 4, no qkv bias)
    = 1,792,900, the classifier head not counted (as in the reference code, where it is a separate module)."""
    config = ScoreNetModelConfig()
    model = ScoreNet(config, PaperLocalViT(config), n_classes=7)
    assert (_count(model.scorer), _count(model.local), _count(model.mixer)) == (673_252, 673_248, 446_400)
    assert _count(model) - _count(model.head) == 1_792_900
    assert model.head.in_features == 3 * 96  # scorer's two global blocks ⊕ the mixer token (reference: 288)


def test_shapes_and_selected_regions_any_aspect_ratio():
    torch.manual_seed(0)
    model = ScoreNet(SMALL, PaperLocalViT(SMALL), n_classes=3).eval()
    images = torch.rand(2, 3, 32 * 3 + 5, 32 * 5)  # 3 × 5 regions; 5 extra rows are cropped
    with torch.no_grad():
        out = model(images)
    assert out.logits.shape == (2, 3) and out.scores.shape == (2, 15) and out.grid == (3, 5)
    assert out.indices.shape == (2, 2)
    assert torch.equal(out.indices, out.scores.topk(2).indices.sort(-1).values)
    assert ((out.scores.sum(-1) > 0) & (out.scores.sum(-1) < 1)).all()  # attention mass on regions, not self
    # the gathered regions are exactly the ROI's pixels of those grid cells
    regions = model._gather(images, out.indices, out.grid)
    i = int(out.indices[0, 1])
    assert torch.equal(
        regions[0, 1], images[0, :, (i // 5) * 32 : (i // 5 + 1) * 32, (i % 5) * 32 : (i % 5 + 1) * 32]
    )
    assert torch.equal(model.regions(images, out.grid)[0, i], regions[0, 1])


def test_gradient_reaches_the_scorer_only_through_the_topk():
    """The head-mixing weights change only the scores, which change the output only through the selection:
    their gradient is non-zero in training (perturbed top-K) and zero with the hard top-K (eval)."""
    torch.manual_seed(0)
    local = LocalEncoder(load_model("h0_mini_tiny", random_init=True))
    model = ScoreNet(SMALL, local, n_classes=2)
    images = torch.rand(2, 3, 96, 128)
    model.train()
    model(images, generator=torch.Generator().manual_seed(0)).logits[:, 0].sum().backward()
    assert model.scorer.head_weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in local.model.parameters())  # frozen
    assert model.mixer.blocks[0].attn.qkv.weight.grad is not None
    model.zero_grad()
    model.eval()
    with torch.enable_grad():
        model(images).logits[:, 0].sum().backward()
    assert model.scorer.head_weights.grad is None or model.scorer.head_weights.grad.abs().sum() == 0


def test_scorer_only():
    torch.manual_seed(0)
    only = ScoreNet(ScoreNetModelConfig(**{**SMALL.__dict__, "scorer_only": True}), None, n_classes=2).eval()
    assert only.mixer is None and only(torch.rand(1, 3, 64, 64)).logits.shape == (1, 2)


@pytest.mark.parametrize(
    ("k", "fraction", "expected"),
    [(1, 0.75, 1), (2, 0.75, 2), (4, 0.75, 3), (10, 0.75, 8), (4, 0.0, 0), (3, 1.0, 3)],
)
def test_masked_count_rounds_half_up(k, fraction, expected):
    assert n_masked(k, fraction) == expected


def test_masking_probe_blanks_that_many_selected_regions():
    """75% of K = 4 selected regions: 3 of the mixer's 4 input tokens are zero, the 4th is the unmasked
    region's embedding; masking all of them equals the fine branch on zero tokens."""
    torch.manual_seed(0)
    model = ScoreNet(ScoreNetModelConfig(**{**SMALL.__dict__, "top_k": 4}), PaperLocalViT(SMALL), 2).eval()
    images = torch.rand(2, 3, 64, 96)
    seen = []
    model.mixer.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))
    with torch.no_grad():
        full = model(images)
        masked = model(images, mask_fraction=0.75, generator=torch.Generator().manual_seed(0))
        blank = model(images, mask_fraction=1.0, generator=torch.Generator().manual_seed(0))
        global_token, _ = model.scorer(model.thumbnail(images)[0])
        expected = model.head(torch.cat([global_token, model.mixer(torch.zeros(2, 4, 32))], dim=-1))
    clean, probe = seen[0], seen[1]
    zero = (probe == 0).all(dim=-1)  # [B, K]
    assert zero.sum(dim=-1).tolist() == [3, 3]
    torch.testing.assert_close(probe[~zero], clean[~zero])
    assert not torch.allclose(full.logits, masked.logits)
    torch.testing.assert_close(blank.logits, expected)


def test_roi_smaller_than_a_region_is_an_error():
    model = ScoreNet(SMALL, PaperLocalViT(SMALL), 2)
    with pytest.raises(BenchmarkError, match="smaller than one 32 px region"):
        model(torch.rand(1, 3, 16, 64))


def test_lora_local_encoder_trains_only_adapters():
    loaded = load_model("h0_mini_tiny", random_init=True)
    local = LocalEncoder(loaded, finetune="lora", lora_rank=4)
    trainable = {n for n, p in local.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in loaded.model.parameters())  # the loaded model is untouched
    assert not any("lora_" in n for n, _ in loaded.model.named_parameters())
    out = local(torch.rand(2, 3, 32, 32))  # resized to the model's 224 px input
    assert out.shape == (2, loaded.spec.pooled_dim(local.pooling))
    with pytest.raises(BenchmarkError, match="'frozen' or 'lora'"):
        LocalEncoder(loaded, finetune="full")


def test_cached_region_embeddings_give_the_same_forward_and_reach_the_scorer():
    """A frozen encoder's embeddings of all regions (`embed_regions`) stand in for the encoder: the same logits
    in eval and in training (the straight-through selection is hard in the forward pass), and the scorer still
    gets a gradient through the perturbed top-K."""
    torch.manual_seed(0)
    local = LocalEncoder(load_model("h0_mini_tiny", random_init=True))
    model = ScoreNet(SMALL, local, n_classes=2)
    images = torch.rand(2, 3, 96, 128)
    cached = model.embed_regions(images)
    assert cached.shape == (2, 12, local.embed_dim) and not cached.requires_grad
    thumbnails = model.thumbnail(images)[0]
    model.eval()
    with torch.no_grad():  # with both cached, the full-resolution ROI is not needed at all
        direct, via_cache = model(images), model(None, region_embeddings=cached, thumbnails=thumbnails)
    assert torch.equal(direct.indices, via_cache.indices)
    assert torch.allclose(direct.logits, via_cache.logits, atol=1e-5)
    model.train()
    out = model(
        None, generator=torch.Generator().manual_seed(0), region_embeddings=cached, thumbnails=thumbnails
    )
    assert torch.allclose(out.logits, direct.logits, atol=1e-5)  # hard selection forward, dropout-free blocks
    out.logits[:, 0].sum().backward()
    assert model.scorer.head_weights.grad.abs().sum() > 0


def test_standardize_fits_the_training_statistics_and_is_the_same_in_training_and_eval():
    """A frozen encoder's embeddings are standardized per feature with fixed statistics: after `fit` the fitted
    rows have mean 0 and standard deviation 1 in every feature, in train and in eval mode alike; unfitted it is
    the identity. Only a registry encoder gets it (the paper's ViT trains with the rest)."""
    torch.manual_seed(0)
    local = LocalEncoder(load_model("h0_mini_tiny", random_init=True))
    model = ScoreNet(SMALL, local, n_classes=2)
    assert model.standardize is not None and model.project[0] is model.standardize
    x = torch.randn(50, local.embed_dim) * torch.linspace(0.1, 10, local.embed_dim) + 7.0
    assert torch.equal(model.standardize(x), x)
    model.standardize.fit(x)
    for mode in (True, False):
        model.train(mode)
        z = model.standardize(x)
        assert torch.allclose(z.mean(0), torch.zeros(local.embed_dim), atol=1e-5)
        assert torch.allclose(z.std(0), torch.ones(local.embed_dim), atol=1e-4)
    with pytest.raises(BenchmarkError, match="at least 2"):
        model.standardize.fit(x[:1])
    off = ScoreNet(dataclasses.replace(SMALL, embed_norm=False), local, n_classes=2)
    assert off.standardize is None and not isinstance(off.project, torch.nn.Sequential)
    assert ScoreNet(SMALL, PaperLocalViT(SMALL), n_classes=2).standardize is None
