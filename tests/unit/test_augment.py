import numpy as np
import torch

from histodistill.augment import (
    GLOBAL_1,
    GLOBAL_2,
    LOCAL,
    VIEW_FIELDS,
    AugmentConfig,
    draw_views,
    global_kinds,
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
