"""The region encoder (HIPT ViT4096-256 over tile-embedding grids) and SLPD pretraining."""

import pytest
import torch

from histodistill.slide.encoder import RegionViT, crop_sizes, multi_crop


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


def test_multi_crop_draws_for_the_global_batch():
    """A rank's share of a global batch gets the crops the whole batch would give those regions."""
    tokens = torch.randn(6, 5, 5, 2)
    mask = torch.rand(6, 5, 5) > 0.3
    whole = multi_crop(tokens, mask, 3, 2, 2, torch.Generator().manual_seed(1))
    part = multi_crop(tokens[2:4], mask[2:4], 3, 2, 2, torch.Generator().manual_seed(1), draw=(6, 2))
    for (t, m), (tp, mp) in zip(whole, part, strict=True):
        assert torch.equal(t[2:4], tp) and torch.equal(m[2:4], mp)
    with pytest.raises(ValueError, match="does not hold"):
        multi_crop(tokens[:2], mask[:2], 3, 2, 2, torch.Generator(), draw=(3, 2))
