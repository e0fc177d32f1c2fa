import numpy as np
import pytest
import torch

from histodistill.augment import (
    GLOBAL_1,
    GLOBAL_2,
    LOCAL,
    VIEW_FIELDS,
    AugmentConfig,
    draw_views,
    geometric,
    global_kinds,
    photometric,
    render,
)

F = {name: i for i, name in enumerate(VIEW_FIELDS)}


def _tile(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)


def test_same_tile_and_view_same_params_and_pixels():
    kinds = global_kinds(4) + [LOCAL, LOCAL]
    a = draw_views(0, "slide", 12, kinds, (224, 224))
    b = draw_views(0, "slide", 12, kinds, (224, 224))
    np.testing.assert_array_equal(a, b)
    tile = _tile()
    for p in a:
        assert torch.equal(render(tile, p), render(tile.copy(), p.copy()))


def test_views_differ_across_tiles_views_and_seeds():
    base = draw_views(0, "slide", 1, [GLOBAL_1, GLOBAL_1], (224, 224))
    assert not np.array_equal(base[0], base[1])
    assert not np.array_equal(base, draw_views(0, "slide", 2, [GLOBAL_1, GLOBAL_1], (224, 224)))
    assert not np.array_equal(base, draw_views(1, "slide", 1, [GLOBAL_1, GLOBAL_1], (224, 224)))
    assert not np.array_equal(base, draw_views(0, "other", 1, [GLOBAL_1, GLOBAL_1], (224, 224)))
    # a view's parameters do not depend on how many views are drawn
    np.testing.assert_array_equal(base[0], draw_views(0, "slide", 1, [GLOBAL_1], (224, 224))[0])


def test_stored_params_rebuild_the_exact_image_after_a_round_trip():
    """The pattern of the teacher cache: params are stored as float64, read back, re-rendered."""
    tile = _tile(3)
    params = draw_views(5, "s", 7, global_kinds(2), (224, 224))
    images = [render(tile, p) for p in params]
    stored = np.frombuffer(params.astype(np.float64).tobytes()).reshape(params.shape)
    for p, img in zip(stored, images, strict=True):
        assert torch.equal(render(tile, p), img)


def test_distributions_follow_dinov2():
    cfg = AugmentConfig()
    g1 = np.stack([draw_views(0, "s", t, [GLOBAL_1], (224, 224))[0] for t in range(400)])
    g2 = np.stack([draw_views(0, "s", t, [GLOBAL_2], (224, 224))[0] for t in range(400)])
    loc = np.stack([draw_views(0, "s", t, [LOCAL], (224, 224))[0] for t in range(400)])
    area = g1[:, F["height"]] * g1[:, F["width"]] / 224**2
    assert area.min() >= 0.30 and area.max() <= 1.0
    local_area = loc[:, F["height"]] * loc[:, F["width"]] / 224**2
    assert local_area.max() <= 0.33 and (loc[:, F["out_px"]] == cfg.local_px).all()
    assert (g1[:, F["blur_sigma"]] > 0).all()  # first global crop: always blurred
    assert 0.02 < (g2[:, F["blur_sigma"]] > 0).mean() < 0.2
    assert 0.1 < g2[:, F["solarize"]].mean() < 0.3 and g1[:, F["solarize"]].sum() == 0
    assert 0.7 < g1[:, F["jitter"]].mean() < 0.9
    assert 0.4 < g1[:, F["flip"]].mean() < 0.6


def test_render_shapes_and_ops():
    tile = _tile(4)
    p = draw_views(0, "s", 0, [GLOBAL_1, LOCAL], (224, 224))
    assert render(tile, p[0]).shape == (3, 224, 224) and render(tile, p[1]).shape == (3, 98, 98)
    q = np.zeros(len(VIEW_FIELDS))
    q[[F["height"], F["width"], F["out_px"]]] = 224
    assert torch.equal(render(tile, q), torch.from_numpy(tile).permute(2, 0, 1))  # identity view
    q[F["flip"]] = 1
    assert torch.equal(render(tile, q), torch.from_numpy(tile[:, ::-1].copy()).permute(2, 0, 1))
    q[F["flip"]], q[F["grayscale"]] = 0, 1
    gray = render(tile, q)
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def _torchvision_render(tile: np.ndarray, p: np.ndarray, cfg: AugmentConfig = AugmentConfig()):
    """The reference: torchvision's public ops one image at a time (how `render` was first written)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from histodistill.augment import _ORDERS

    x = torch.from_numpy(tile).permute(2, 0, 1).contiguous()
    top, left, h, w, out = (int(p[F[k]]) for k in ("top", "left", "height", "width", "out_px"))
    x = TF.resized_crop(x, top, left, h, w, [out, out], InterpolationMode.BICUBIC, antialias=True)
    if p[F["flip"]]:
        x = TF.horizontal_flip(x)
    if p[F["jitter"]]:
        ops = (
            lambda t: TF.adjust_brightness(t, p[F["brightness"]]),
            lambda t: TF.adjust_contrast(t, p[F["contrast"]]),
            lambda t: TF.adjust_saturation(t, p[F["saturation"]]),
            lambda t: TF.adjust_hue(t, p[F["hue"]]),
        )
        for i in _ORDERS[int(p[F["order"]])]:
            x = ops[i](x)
    if p[F["grayscale"]]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p[F["blur_sigma"]] > 0:
        s = float(p[F["blur_sigma"]])
        x = TF.gaussian_blur(x, [cfg.blur_kernel] * 2, [s, s])
    if p[F["solarize"]]:
        x = TF.solarize(x, cfg.solarize_threshold)
    return x


def _he_tiles(n: int) -> np.ndarray:
    """Smooth H&E-like tiles (pink/purple fields, upsampled noise) so every op changes pixels."""
    rng = np.random.default_rng(7)
    coarse = rng.normal([200, 120, 180], 30, (n, 28, 28, 3)).clip(0, 255).astype(np.float32)
    return np.kron(coarse, np.ones((1, 8, 8, 1), np.float32)).astype(np.uint8)


def test_geometric_equals_torchvision_resized_crop_bit_for_bit():
    """`geometric` (a channels-last view of the crop box, torch's bicubic antialiased interpolate) equals
    torchvision's `resized_crop` + `horizontal_flip` of the CHW tile, as `render` was first written, for
    global and local views of smooth and noisy tiles (so cached views rebuild unchanged); a box outside
    the tile is a ValueError."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    tiles = [*_he_tiles(4), _tile(1), _tile(2)]
    n = 0
    for t, tile in enumerate(tiles):
        chw = torch.from_numpy(tile).permute(2, 0, 1).contiguous()
        for p in draw_views(5, "s", t, [GLOBAL_1, GLOBAL_2] * 8 + [LOCAL] * 16, (224, 224)):
            top, left, h, w, out = (int(p[F[k]]) for k in ("top", "left", "height", "width", "out_px"))
            expected = TF.resized_crop(
                chw, top, left, h, w, [out, out], InterpolationMode.BICUBIC, antialias=True
            )
            expected = TF.horizontal_flip(expected) if p[F["flip"]] else expected
            got = geometric(tile, p)
            assert got.is_contiguous() and got.dtype == torch.uint8
            assert torch.equal(got, expected), (t, p)
            n += 1
    assert n == 192
    q = np.zeros(len(VIEW_FIELDS))
    q[[F["top"], F["height"], F["width"], F["out_px"]]] = (10, 224, 224, 224)
    with pytest.raises(ValueError, match="outside"):
        geometric(tiles[0], q)


def test_batched_photometric_equals_torchvision_one_image_at_a_time():
    """`photometric` on a batch of geometric views = torchvision's ops per image, bit for bit (CPU), for
    every op and its order; `render` is geometric + photometric. 48 views cover every branch."""
    tiles = _he_tiles(24)
    drawn = np.concatenate([draw_views(3, "s", t, global_kinds(2), (224, 224)) for t in range(100)])
    pick = [*range(36), *np.flatnonzero(drawn[:, F["solarize"]] > 0)[:6]]
    pick += list(np.flatnonzero(drawn[:, F["grayscale"]] > 0)[:6])
    params, tile_of = drawn[pick], np.array(pick) % 24
    for field in ("jitter", "grayscale", "solarize", "flip"):  # each branch is taken and skipped
        assert 0 < (params[:, F[field]] > 0).sum() < len(params), field
    assert 0 < (params[:, F["blur_sigma"]] == 0).sum()
    reference = torch.stack([_torchvision_render(tiles[t], p) for t, p in zip(tile_of, params, strict=True)])
    views = torch.stack([geometric(tiles[t], p) for t, p in zip(tile_of, params, strict=True)])
    out = photometric(views, params)
    assert out.dtype == torch.uint8 and out.shape == (48, 3, 224, 224)
    assert torch.equal(out, reference)
    assert torch.equal(photometric(views[5:9], torch.from_numpy(params[5:9])), reference[5:9])  # any batch
    assert torch.equal(render(tiles[tile_of[7]], params[7]), reference[7])
    asks = (params[:, [F["jitter"], F["grayscale"], F["blur_sigma"], F["solarize"]]] > 0).any(1)
    changed = (out != views).flatten(1).any(1).numpy()
    assert asks.sum() > 40 and changed[asks].all() and not changed[~asks].any()
    local = draw_views(0, "s", 1, [LOCAL] * 3, (224, 224))  # 98 px crops
    assert torch.equal(
        photometric(torch.stack([geometric(tiles[1], p) for p in local]), local),
        torch.stack([_torchvision_render(tiles[1], p) for p in local]),
    )
    with pytest.raises(ValueError, match="uint8 views"):
        photometric(views.float(), params)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_photometric_on_the_gpu_agrees_with_the_cpu():
    """The student's views finished on a GPU vs the teacher cache's (rendered on the CPU): CUDA kernels
    round differently, so a few pixels differ by a few uint8 levels. Tolerance: max |Δ| ≤ 3 levels,
    ≤ 0.5% of values differing at all, mean |Δ| ≤ 0.01 level."""
    tiles = _he_tiles(32)
    params = np.concatenate([draw_views(1, "s", t, global_kinds(2), (224, 224)) for t in range(32)])
    views = torch.stack([geometric(tiles[i // 2], p) for i, p in enumerate(params)])
    cpu = photometric(views, params).int()
    gpu = photometric(views.cuda(), params).cpu().int()
    diff = (gpu - cpu).abs()
    assert diff.max() <= 3 and (diff > 0).float().mean() <= 0.005 and diff.float().mean() <= 0.01


def _he_tile():
    """An H&E uint8 tile [224, 224, 3]: random haematoxylin and eosin concentrations (no DAB; 20 % glass)
    through scikit-image's `hed2rgb` (Ruifrok & Johnston's vectors), so its colours lie in the H-E-D gamut."""
    from skimage.color import hed2rgb

    rng = np.random.default_rng(11)
    hed = np.zeros((224, 224, 3))
    hed[..., :2] = rng.uniform(0, 0.08, (224, 224, 2)) * (rng.random((224, 224, 1)) < 0.8)
    return np.round(hed2rgb(hed) * 255).astype(np.uint8)


def test_hed_jitter_off_by_default_and_drawn_last():
    """Off (DINOv2's recipe) by default: the HED fields are 0. On, the other fields are those of the same
    view without it (the HED draws come last), and σ, b are uniform in ± `hed_jitter`."""
    kinds = global_kinds(2) + [LOCAL]
    off = draw_views(0, "s", 3, kinds, (224, 224))
    hed = [F[k] for k in VIEW_FIELDS if k.startswith("hed")]
    assert (off[:, hed] == 0).all()
    on = np.stack(
        [draw_views(0, "s", t, kinds, (224, 224), AugmentConfig(hed_jitter=0.2)) for t in range(200)]
    )
    np.testing.assert_array_equal(on[3][:, : F["hed"]], off[:, : F["hed"]])
    assert (on[..., F["hed"]] == 1).all()
    values = on[..., F["hed_scale_h"] :]
    assert values.shape[-1] == 6 and np.abs(values).max() <= 0.2 and np.abs(values).max() > 0.19
    assert abs(values.mean()) < 0.01  # centred (200 × 3 views × 6 draws)


def test_hed_jitter_with_zero_sigma_and_bias_is_the_identity():
    """σ = b = 0 returns the image to within one uint8 level, for any colour (no clipping of the
    concentrations, rounding: augment._hed's deliberate deviations)."""
    q = np.zeros(len(VIEW_FIELDS))
    q[[F["height"], F["width"], F["out_px"]]] = 224
    q[F["hed"]] = 1
    for tile in (_tile(6), _he_tile()):
        out = render(tile, q).permute(1, 2, 0).numpy().astype(int)
        assert np.abs(out - tile.astype(int)).max() <= 1


def test_hed_jitter_equals_scikit_image_on_he_colours():
    """On an H&E image (every pixel inside the H-E-D gamut), one view's HED jitter equals scikit-image's
    rgb2hed → s·(1 + σ) + b → hed2rgb (DIAG's HedColorAugmenter) to within one uint8 level; the stored
    parameters rebuild the view bit for bit, and more haematoxylin darkens the nuclei's red channel."""
    from skimage.color import hed2rgb, rgb2hed

    tile = _he_tile()
    q = np.zeros(len(VIEW_FIELDS))
    q[[F["height"], F["width"], F["out_px"]]] = 224
    q[F["hed"]] = 1
    sigma, bias = np.array([0.15, -0.1, 0.05]), np.array([0.02, -0.03, 0.01])
    q[F["hed_scale_h"] : F["hed_scale_d"] + 1], q[F["hed_bias_h"] : F["hed_bias_d"] + 1] = sigma, bias
    out = render(tile, q)
    ref = np.round(np.clip(hed2rgb(rgb2hed(tile) * (1 + sigma) + bias), 0, 1) * 255)
    assert np.abs(out.permute(1, 2, 0).numpy() - ref).max() <= 1
    assert torch.equal(render(tile, q.copy()), out)
    more_h = q.copy()
    more_h[F["hed_bias_h"]] = 0.1
    assert render(tile, more_h)[0].float().mean() < out[0].float().mean() - 5


def test_hed_jitter_batched_equals_one_view_at_a_time():
    """`photometric` on a batch of views with and without HED jitter (and DINOv2's ops after it) equals
    `render` one view at a time, bit for bit."""
    tile = _he_tile()
    params = np.concatenate(
        [
            draw_views(1, "s", t, global_kinds(2), (224, 224), AugmentConfig(hed_jitter=0.2 * (t % 2)))
            for t in range(4)
        ]
    )
    batch = torch.stack([geometric(tile, p) for p in params])
    one = torch.stack([render(tile, p) for p in params])
    assert torch.equal(photometric(batch, params), one)
