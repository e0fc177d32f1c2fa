"""The region encoder (HIPT ViT4096-256 over tile-embedding grids) and SLPD pretraining."""

import numpy as np
import pytest
import torch

from histodistill.slide.encoder import RegionViT, crop_sizes, multi_crop
from histodistill.slide.pretrain import (
    RegionTrainConfig,
    embed_regions,
    load_region_encoder,
    pretrain_regions,
)


def test_missing_tiles_never_influence_the_region_embedding():
    torch.manual_seed(0)
    model = RegionViT(in_dim=8, grid=4, embed_dim=24, depth=2, num_heads=3, drop_path=0.0).eval()
    tokens = torch.randn(3, 4, 4, 8)
    mask = torch.rand(3, 4, 4) > 0.4
    mask[:, 0, 0] = True
    changed = tokens.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 8) * 100
    with torch.no_grad():
        a, b = model(tokens, mask), model(changed, mask)
        full = model(changed, torch.ones_like(mask))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert not torch.allclose(a, full, atol=1e-3)  # present tiles do matter
    # crops of another size use interpolated position embeddings
    with torch.no_grad():
        assert model(tokens[:, :3, :3], mask[:, :3, :3]).shape == (3, 24)


def test_multi_crop_shapes_flips_and_masks_follow_tokens():
    tokens = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4, 1)
    mask = tokens[..., 0] % 3 != 0
    crops = multi_crop(tokens, mask, 3, 2, 4, torch.Generator().manual_seed(0))
    assert [c[0].shape[1] for c in crops] == [3, 3, 2, 2, 2, 2]
    for t, m in crops:
        assert torch.equal(m, t[..., 0] % 3 != 0)  # the mask travels with its tokens
        for b in range(2):
            block = t[b, :, :, 0]
            rows = block[:, 0] // 4
            assert torch.equal(rows, rows.sort().values) and len(set(rows.tolist())) == len(
                rows
            )  # rows in order
            assert set(block.flatten().tolist()) <= set(range(16 * b, 16 * (b + 1)))  # own region only
    assert crop_sizes(16) == (14, 6) and crop_sizes(8) == (7, 3)


def _toy(rng, n_slides=6, per_slide=6, g=4, d=6):
    styles = rng.normal(size=(3, d)).astype(np.float32)
    slide = np.repeat(np.arange(n_slides), per_slide)
    kind = rng.integers(0, 3, size=(len(slide), g, g))
    tokens = styles[kind] + 0.1 * rng.normal(size=(len(slide), g, g, d)).astype(np.float32)
    mask = rng.random((len(slide), g, g)) > 0.2
    return tokens.astype(np.float32), mask, slide


TINY = dict(
    embed_dim=16, depth=1, num_heads=2, global_crop=3, local_crop=2, n_local_crops=2, head_prototypes=32,
    head_hidden=32, head_bottleneck=8, batch_size=12, epochs=3, warmup_epochs=1, warm_epochs=1,
    n_prototypes=2, neighbors=1, min_regions=4, kmeans_n_init=1, threads=1,
)  # fmt: skip


def test_pretraining_runs_all_terms_and_resumes_exactly(tmp_path):
    tokens, mask, slide = _toy(np.random.default_rng(0))
    cfg = RegionTrainConfig(**TINY)
    full = pretrain_regions(tokens, mask, slide, tmp_path / "a", cfg, inputs="x")["epochs"]
    assert [r["epoch"] for r in full] == [1, 2, 3]
    assert (
        "intra" not in full[0] and {"intra", "inter"} <= set(full[1]) and {"intra", "inter"} <= set(full[2])
    )
    assert all(np.isfinite(r["loss"]) for r in full)
    # a run stopped after 2 epochs, then rerun, resumes and ends where the uninterrupted run did
    assert (
        len(pretrain_regions(tokens, mask, slide, tmp_path / "b", cfg, inputs="x", stop_after=2)["epochs"])
        == 2
    )
    assert not (tmp_path / "b" / "region_encoder.pt").exists()
    resumed = pretrain_regions(tokens, mask, slide, tmp_path / "b", cfg, inputs="x")["epochs"]
    assert resumed[-1]["loss"] == pytest.approx(full[-1]["loss"], rel=1e-5)
    a = embed_regions(load_region_encoder(tmp_path / "a" / "region_encoder.pt"), tokens, mask)
    b = embed_regions(load_region_encoder(tmp_path / "b" / "region_encoder.pt"), tokens, mask)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert a.shape == (36, 16)
