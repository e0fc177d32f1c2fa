import numpy as np
from PIL import Image, ImageDraw

from histodistill.tissue import MaskConfig, tile_fractions, tissue_mask


def _pink_disk(size=200, radius=60, noise=3.0, seed=0):
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (size, size), (242, 242, 242))
    ImageDraw.Draw(img).ellipse(
        [size / 2 - radius, size / 2 - radius, size / 2 + radius, size / 2 + radius], fill=(225, 140, 190)
    )
    arr = np.asarray(img, np.float32) + rng.normal(0, noise, (size, size, 1))
    truth = np.hypot(*(np.mgrid[0:size, 0:size] - (size - 1) / 2)) <= radius
    return np.clip(arr, 0, 255).astype(np.uint8), truth


def test_mask_finds_a_stained_disk():
    img, truth = _pink_disk()
    mask = tissue_mask(img, MaskConfig(mask_mpp=8.0, min_object_um2=8 * 8 * 50, min_hole_um2=0))
    iou = (mask & truth).sum() / (mask | truth).sum()
    assert iou > 0.95


def test_small_objects_are_removed_and_holes_filled():
    img, _ = _pink_disk(radius=60)
    draw_img = Image.fromarray(img)
    d = ImageDraw.Draw(draw_img)
    d.ellipse([10, 10, 16, 16], fill=(225, 140, 190))  # a speck of ~28 px
    d.ellipse([97, 97, 103, 103], fill=(242, 242, 242))  # a small hole in the disk
    img = np.asarray(draw_img)
    mask = tissue_mask(img, MaskConfig(mask_mpp=8.0, min_object_um2=8 * 8 * 100, min_hole_um2=8 * 8 * 100))
    assert not mask[8:19, 8:19].any()
    assert mask[98:103, 98:103].all()


def test_blank_and_constant_images_have_no_tissue():
    rng = np.random.default_rng(1)
    noisy = np.clip(242 + rng.normal(0, 2.5, (120, 160, 1)), 0, 255).astype(np.uint8).repeat(3, 2)
    assert not tissue_mask(noisy, MaskConfig()).any()
    assert not tissue_mask(np.full((50, 50, 3), 200, np.uint8), MaskConfig()).any()


def test_tile_fractions_match_brute_force():
    rng = np.random.default_rng(2)
    mask = rng.random((40, 60)) > 0.6
    px0 = 32.0
    x0 = np.array([0, 448, 896, 1000, 1800])
    y0 = np.array([0, 0, 448, 300, 800])
    frac = tile_fractions(mask, x0, y0, 448.0, px0)
    for f, x, y in zip(frac, x0, y0, strict=True):
        c0, r0 = round(x / px0), round(y / px0)
        c1, r1 = min(round((x + 448) / px0), 60), min(round((y + 448) / px0), 40)
        assert f == mask[r0:r1, c0:c1].sum() / ((c1 - c0) * (r1 - r0))


def test_all_tissue_image_is_all_tissue_and_tinted_glass_is_not():
    """Otsu on an image that is only tissue would cut it in two: the floor decides instead. Glass with a
    faint yellow tint (saturation ≈ 0.07, above the floor) next to tissue stays background."""
    rng = np.random.default_rng(3)
    tissue = np.clip(np.array([215.0, 140, 185]) + rng.normal(0, 6, (40, 40, 3)), 0, 255).astype(np.uint8)
    params = MaskConfig(min_object_um2=0, min_hole_um2=0)
    assert tissue_mask(tissue, params).all()
    img, truth = _pink_disk(noise=1.0)
    glass = (img == img[0, 0]).all(2) | ~truth
    tinted = img.copy()
    tinted[glass & ~truth] = (226, 222, 210)  # luminance 0.87: inside the brightness window
    mask = tissue_mask(tinted, MaskConfig(mask_mpp=8.0, min_object_um2=8 * 8 * 50, min_hole_um2=0))
    assert (mask & truth).sum() / (mask | truth).sum() > 0.95
