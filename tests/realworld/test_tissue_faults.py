"""Tissue detection on real-world faults (issue 13): each kind on its own generated slide, asserting the
right tile set, not only "no crash". Generators: tests/realworld/generators.py.

Tissue fills whole cells of the tile grid, so the expected tiles are exact (no ±1 tolerance anywhere): a
tissue cell's mask fraction is ≈ 1 and a glass, ink or dark cell's ≈ 0, far from min_tissue = 0.5.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
from PIL import Image

import histodistill.slides as slides_module
from histodistill.errors import ModelError
from histodistill.slides import open_slide, read_scaled
from histodistill.tiling import QC_COLORS, TilingConfig, plan_tiles, read_tile_table, tile_slide
from histodistill.tissue import MaskConfig, detect_tissue
from tests.realworld import generators as gen

T = gen.TILE_PX


def _cells(table) -> set[tuple[int, int]]:
    return {(int(y) // T, int(x) // T) for x, y in zip(table["x0"], table["y0"], strict=True)}


@pytest.fixture(scope="module")
def ink_slide(tmp_path_factory):
    return gen.pen_ink_slide(tmp_path_factory.mktemp("ink") / "ink.tiff")


@pytest.fixture(scope="module")
def dark_slide(tmp_path_factory):
    return gen.dark_background_slide(tmp_path_factory.mktemp("dark") / "dark.tiff")


def test_pen_ink_is_not_tissue(tmp_path, ink_slide):
    table = tile_slide(ink_slide.path, "ink", tmp_path / "t.parquet", gen.GRID)
    assert _cells(table) == ink_slide.tissue_cells  # 16 tissue tiles, no ink tile
    ink_cells = {
        (r, c)
        for r in range(ink_slide.ink.shape[0] // T)
        for c in range(ink_slide.ink.shape[1] // T)
        if ink_slide.ink[r * T : (r + 1) * T, c * T : (c + 1) * T].mean() > 0.5
    }
    assert len(ink_cells) >= 8 and not (_cells(table) & ink_cells)
    # The fault is real: saturation alone (no ink filter) keeps ink-only tiles.
    no_filter = tile_slide(
        ink_slide.path, "ink", tmp_path / "u.parquet", dataclasses.replace(gen.GRID, remove_ink=False)
    )
    assert _cells(no_filter) & ink_cells


@pytest.mark.parametrize("color", ["blue", "green", "red", "black"])
def test_each_ink_color_is_removed_and_stains_are_kept(color):
    """One pen colour at a time next to H&E: the ink is flagged as ink, the stained tissue is not."""
    rng = np.random.default_rng(5)
    tissue = np.asarray(Image.fromarray(gen.he_texture(128, 64, rng)).reduce(4))  # ≈ 8 µm/px
    ink = np.clip(np.array(gen.INK_RGB[color], np.float32) + rng.normal(0, 3, (32, 16, 3)), 0, 255)
    glass = np.full((32, 16, 3), 242, np.uint8)
    image = np.concatenate([glass, tissue, glass, ink.astype(np.uint8), glass], axis=1)
    found = detect_tissue(image, MaskConfig(min_object_um2=0, min_hole_um2=0))
    # Black marker's darkest pixels (luminance < min_brightness) are removed as dark background instead.
    removed = found.ink | found.dark if color == "black" else found.ink
    assert removed[:, 52:60].all() and not found.mask[:, 48:64].any()
    assert found.mask[2:-2, 18:30].mean() > 0.95 and not found.ink[:, 17:31].any()


def test_dark_tinted_background_is_not_tissue(tmp_path, dark_slide):
    table = tile_slide(dark_slide.path, "dark", tmp_path / "t.parquet", gen.GRID)
    assert _cells(table) == dark_slide.tissue_cells  # 20 tissue tiles, no dark tile
    # The fault is real: without the brightness floor the tinted background counts as tissue.
    no_floor = tile_slide(
        dark_slide.path, "dark", tmp_path / "u.parquet", dataclasses.replace(gen.GRID, min_brightness=0.0)
    )
    dark_cells = {
        (r, c)
        for r in range(dark_slide.dark.shape[0] // T)
        for c in range(dark_slide.dark.shape[1] // T)
        if dark_slide.dark[r * T : (r + 1) * T, c * T : (c + 1) * T].all()
    }
    assert len(dark_cells) > 30 and not (_cells(table) & dark_cells) and _cells(no_floor) & dark_cells


@pytest.mark.parametrize("bits", [8, 16])
def test_grey_slides_keep_their_tissue(tmp_path, bits, caplog):
    truth = gen.grey_slide(tmp_path / f"grey{bits}.tiff", bits)
    with caplog.at_level(logging.WARNING):
        table = tile_slide(truth.path, f"grey{bits}", tmp_path / "t.parquet", gen.GRID)
    assert _cells(table) == truth.tissue_cells  # 26 tiles
    assert "looks greyscale" in caplog.text and "optical density" in caplog.text
    _, meta = read_tile_table(tmp_path / "t.parquet")
    assert meta["greyscale"] is True and meta["tissue_cue"] == "optical density"


def test_qc_shows_ink_and_dark_background_in_their_own_colors(tmp_path, ink_slide, dark_slide):
    for truth, key in ((ink_slide, "pen ink (removed)"), (dark_slide, "dark background (removed)")):
        qc = tmp_path / f"{key[:3]}.png"
        tile_slide(truth.path, "s", tmp_path / "t.parquet", gen.GRID, qc=qc, qc_max_px=512)
        image = np.asarray(Image.open(qc).convert("RGB")).astype(int)
        removed = truth.ink if truth.ink is not None else truth.dark
        h, w = removed.shape
        scale = 512 / max(h, w)
        small = np.asarray(Image.fromarray(removed).resize((round(w * scale), round(h * scale))))
        core = small > 0
        slide_part = image[: small.shape[0], : small.shape[1]]
        tint = np.array(QC_COLORS[key])
        dist = np.abs(slide_part[core] - tint).sum(1)
        other = np.abs(slide_part[~core] - tint).sum(1)
        assert np.median(dist) < np.median(other) / 2  # the removed pixels are tinted its colour
        assert image.shape[0] > small.shape[0] + 60  # the legend band below the slide


def test_one_tile_slide_full_of_tissue_gives_one_tile(tmp_path):
    truth = gen.one_tile_slide(tmp_path / "one.tiff")
    table = tile_slide(truth.path, "one", tmp_path / "t.parquet", TilingConfig())  # 224 px at 0.5 µm/px
    assert len(table) == 1 and table["tissue_frac"].iloc[0] > 0.9


@pytest.mark.parametrize("height", [1, 2, 3, 5, 10])
def test_strip_thumbnails_are_complete_and_repeatable(tmp_path, height, caplog):
    path, mean = gen.strip_slide(tmp_path / f"strip{height}.tiff", height)
    with open_slide(path) as slide:
        first = read_scaled(slide, 0.5, 8.0)
        scratch = [np.full(first.shape, 255 - k, np.uint8) for k in range(8)]  # dirty the allocator
        del scratch
        second = read_scaled(slide, 0.5, 8.0)
    np.testing.assert_array_equal(first, second)
    assert first.shape == (1, round(3000 * 0.5 / 8.0), 3)
    assert np.abs(first.astype(float) - mean).max() < 4  # every pixel is the strip's colour
    with caplog.at_level(logging.WARNING):
        table = tile_slide(path, "strip", tmp_path / "t.parquet", TilingConfig(), qc=tmp_path / "qc.png")
    assert table.empty and "smaller than one tile" in caplog.text


def test_qc_does_not_decode_the_slide_again(tmp_path, ink_slide, monkeypatch):
    """The QC image comes from the pass that read the mask's thumbnail: the same level-0 reads with QC."""
    single = tmp_path / "single.tiff"
    with open_slide(ink_slide.path) as slide:
        pixels = np.asarray(slide.read_region((0, 0), 0, (1344, 1120)))[..., :3]  # tissue and some ink
    _write_single_level(pixels, single)
    calls = []
    original = slides_module._read_argb  # the one decode every OpenSlide read goes through (read_rgb)

    def counting(slide, x0, y0, level, width, height):
        calls.append((level, (width, height)))
        return original(slide, x0, y0, level, width, height)

    monkeypatch.setattr(slides_module, "_read_argb", counting)
    plan_tiles(single, "s", gen.GRID)
    without_qc = list(calls)
    calls.clear()
    tile_slide(single, "s", tmp_path / "t.parquet", gen.GRID, qc=tmp_path / "qc.png")
    assert calls == without_qc and all(level == 0 for level, _ in calls)
    assert sum(h for _, (_, h) in calls) == pixels.shape[0]  # level 0 decoded once, row by row


def _write_single_level(pixels: np.ndarray, path) -> None:
    import tifffile

    res = 1e4 / gen.SLIDE_MPP
    tifffile.imwrite(
        path,
        pixels,
        tile=(256, 256),
        photometric="rgb",
        compression="zlib",
        resolution=(res, res),
        resolutionunit="CENTIMETER",
        metadata=None,
    )


def test_learned_method_needs_an_existing_weights_file(tmp_path, ink_slide):
    params = dataclasses.replace(gen.GRID, tissue_method="learned")
    with pytest.raises(ModelError, match="tissue_weights is not set"):
        tile_slide(ink_slide.path, "s", tmp_path / "t.parquet", params)
    missing = tmp_path / "nope.pt"
    with pytest.raises(ModelError, match=r"not found: .*nope\.pt"):
        tile_slide(
            ink_slide.path,
            "s",
            tmp_path / "t.parquet",
            dataclasses.replace(params, tissue_weights=str(missing)),
        )
    assert not (tmp_path / "t.parquet").exists()


def test_learned_method_runs_a_torchscript_segmenter(tmp_path, ink_slide):
    """The seam's contract on a TorchScript module (a fixed rule, not a trained model): logits [1, 2, H, W]
    whose class 1 is "red at least 0.03 above blue" (eosin-rich tissue, and red ink); the mask follows
    it, minus the ink the classical filter removes."""
    torch = pytest.importorskip("torch")

    class RedOverBlue(torch.nn.Module):
        def forward(self, x):
            mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
            std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            rgb = x * std + mean  # undo the contract's ImageNet normalization
            score = (rgb[:, 0:1] - rgb[:, 2:3] - 0.03) * 100.0
            return torch.cat([-score, score], dim=1)

    weights = tmp_path / "seg.pt"
    torch.jit.script(RedOverBlue()).save(str(weights))
    params = dataclasses.replace(gen.GRID, tissue_method="learned", tissue_weights=str(weights))
    table = tile_slide(ink_slide.path, "s", tmp_path / "t.parquet", params)
    assert _cells(table) == ink_slide.tissue_cells
    _, meta = read_tile_table(tmp_path / "t.parquet")
    assert meta["tissue_cue"] == "learned"
