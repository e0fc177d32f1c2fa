"""Images of every mode give the same, correct uint8 RGB (histodistill.images), in the probe-dataset and HEST
paths too. Each generator writes a tiny image whose expected RGB is computed by hand in the test."""

from __future__ import annotations

import struct
import zlib

import h5py
import numpy as np
import pytest
import tifffile
import zarr
from PIL import Image

from histodistill.bench import BenchmarkError
from histodistill.bench.datasets import pack_image_dataset
from histodistill.bench.hest import read_patch_images
from histodistill.images import ImageReadError, as_rgb8, read_image_rgb

# One row of pixels: black, white, mid grey, a colour.
RGB = np.array([[[0, 0, 0], [255, 255, 255], [128, 128, 128], [200, 40, 90]]], np.uint8)
GREY = np.array([[0, 255, 128, 77]], np.uint8)


def _png16(path, pixels: np.ndarray, color_type: int) -> None:
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): color type 0 grey, 2 RGB, 6 RGBA."""
    h, w = pixels.shape[:2]
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_rgb8_is_unchanged(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "a.png"), RGB)


@pytest.mark.parametrize("suffix", [".png", ".tiff"])
def test_grey_is_expanded(tmp_path, suffix):
    path = tmp_path / f"g{suffix}"
    if suffix == ".png":
        Image.fromarray(GREY, "L").save(path)
    else:
        tifffile.imwrite(path, GREY, photometric="minisblack")
    np.testing.assert_array_equal(read_image_rgb(path), np.repeat(GREY[..., None], 3, axis=2))


def test_one_bit_is_black_and_white(tmp_path):
    Image.fromarray(np.array([[0, 255, 255, 0]], np.uint8)).convert("1").save(tmp_path / "b.png")
    expected = np.array([[[0] * 3, [255] * 3, [255] * 3, [0] * 3]], np.uint8)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "b.png"), expected)


def test_rgba_is_composited_on_white(tmp_path):
    rgba = np.array([[[200, 40, 90, 255], [200, 40, 90, 0], [0, 0, 0, 128], [100, 200, 0, 51]]], np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    # colour·α + 255·(1 − α): opaque stays, transparent → white, black at 128/255 → 127, 51/255 = 0.2.
    expected = np.array([[[200, 40, 90], [255, 255, 255], [127, 127, 127], [224, 244, 204]]], np.uint8)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "a.png"), expected)


def test_grey_with_alpha(tmp_path):
    la = np.array([[[0, 255], [0, 0], [100, 51]]], np.uint8)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    expected = np.repeat(np.array([[0, 255, 224]], np.uint8)[..., None], 3, axis=2)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "la.png"), expected)


def test_palette_is_expanded_with_its_transparency(tmp_path):
    image = Image.fromarray(np.array([[0, 1, 2, 1]], np.uint8), "P")
    image.putpalette([10, 20, 30, 200, 40, 90, 0, 0, 0] + [0] * (3 * 253))
    image.save(tmp_path / "p.png")
    expected = np.array([[[10, 20, 30], [200, 40, 90], [0, 0, 0], [200, 40, 90]]], np.uint8)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "p.png"), expected)
    image.save(tmp_path / "pt.png", transparency=2)  # index 2 fully transparent → white
    expected[0, 2] = 255
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "pt.png"), expected)


def test_palette_tiff(tmp_path):
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, 1] = (65535, 0, 32896)  # 32896 = 128 · 257
    tifffile.imwrite(
        tmp_path / "p.tiff", np.array([[0, 1]], np.uint8), photometric="palette", colormap=colormap
    )
    expected = np.array([[[0, 0, 0], [255, 0, 128]]], np.uint8)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "p.tiff"), expected)


V16 = np.array([0, 128, 129, 32768, 65535, 1000], np.uint16)
V16_TO_8 = np.array([0, 0, 1, 128, 255, 4], np.uint8)  # round(v · 255 / 65535) = round(v / 257)


def test_sixteen_bit_grey_png_is_scaled(tmp_path):
    _png16(tmp_path / "g16.png", V16[None], 0)
    np.testing.assert_array_equal(
        read_image_rgb(tmp_path / "g16.png"), np.repeat(V16_TO_8[None, :, None], 3, 2)
    )


def test_sixteen_bit_rgb_tiff_is_scaled_exactly(tmp_path):
    pixels = np.stack([V16, V16[::-1], np.full_like(V16, 65535)], axis=-1)[None]
    tifffile.imwrite(tmp_path / "c16.tiff", pixels, photometric="rgb")
    expected = np.stack([V16_TO_8, V16_TO_8[::-1], np.full_like(V16_TO_8, 255)], axis=-1)[None]
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "c16.tiff"), expected)


def test_sixteen_bit_rgb_png_keeps_the_high_byte(tmp_path):
    """The documented deviation: Pillow reduces 16-bit colour PNGs to their high byte (≤ 1 level off)."""
    pixels = np.stack([V16] * 3, axis=-1)[None]
    _png16(tmp_path / "c16.png", pixels, 2)
    out = read_image_rgb(tmp_path / "c16.png")
    np.testing.assert_array_equal(out[0, :, 0], (V16 >> 8).astype(np.uint8))
    assert np.abs(out[0, :, 0].astype(int) - V16_TO_8).max() <= 1


def test_sixteen_bit_rgba_tiff_is_composited(tmp_path):
    pixels = np.array([[[65535, 0, 0, 65535], [0, 0, 0, 0], [0, 0, 0, 32768]]], np.uint16)
    tifffile.imwrite(tmp_path / "a16.tiff", pixels, photometric="rgb", extrasamples=[2])
    expected = np.array([[[255, 0, 0], [255, 255, 255], [127, 127, 127]]], np.uint8)
    np.testing.assert_array_equal(read_image_rgb(tmp_path / "a16.tiff"), expected)


def test_float_and_bool_arrays():
    np.testing.assert_array_equal(as_rgb8(np.array([[0.0, 0.5, 1.0]]))[0, :, 0], [0, 128, 255])
    np.testing.assert_array_equal(as_rgb8(np.array([[False, True]]))[0, :, 1], [0, 255])
    with pytest.raises(ImageReadError, match=r"x\.npy: floating-point pixels range 0–300"):
        as_rgb8(np.array([[0.0, 300.0]]), "x.npy")


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tiff"])
def test_unreadable_file_names_the_file(tmp_path, content, suffix):
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=rf"cannot read image .*broken\{suffix}"):
        read_image_rgb(path)
    with pytest.raises(ImageReadError, match=r"missing\.png"):
        read_image_rgb(tmp_path / "missing.png")


def test_probe_dataset_packs_every_mode_to_the_same_rgb(tmp_path):
    """pack_image_dataset: the same picture saved as RGB, RGBA (opaque), grey-as-RGB, palette, 16-bit TIFF."""
    side = 8
    rgb = np.zeros((side, side, 3), np.uint8)
    rgb[:, :4] = (200, 40, 90)
    rgb[:, 4:] = (255, 255, 255)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((side, side), 255, np.uint8)]), "RGBA").save(
        tmp_path / "rgba.png"
    )
    Image.fromarray(rgb).quantize(4).save(tmp_path / "p.png")
    tifffile.imwrite(tmp_path / "c16.tiff", rgb.astype(np.uint16) * 257, photometric="rgb")
    half_transparent = np.dstack([rgb, np.where(np.arange(side) < 4, 255, 0)[None].repeat(side, 0)])
    Image.fromarray(half_transparent.astype(np.uint8), "RGBA").save(tmp_path / "ta.png")
    names = ["rgb.png", "rgba.png", "p.png", "c16.tiff", "ta.png"]
    (tmp_path / "m.csv").write_text("path,label,split\n" + "".join(f"{n},x,train\n" for n in names))
    n = pack_image_dataset(tmp_path / "m.csv", tmp_path / "s.zarr", tmp_path / "rows.csv", tile_px=side)
    tiles = zarr.open_group(tmp_path / "s.zarr", mode="r")["tiles"][:]
    assert n == len(names) and tiles.shape == (len(names), side, side, 3)
    for name, tile in zip(names, tiles, strict=True):
        np.testing.assert_array_equal(tile, rgb, err_msg=name)


def test_probe_dataset_error_names_the_broken_file(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "ok.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    (tmp_path / "m.csv").write_text("path,label,split\nok.png,a,train\nbad.png,b,test\n")
    with pytest.raises(BenchmarkError, match=r"line 3: cannot read image .*bad\.png"):
        pack_image_dataset(tmp_path / "m.csv", tmp_path / "s.zarr", tmp_path / "rows.csv", tile_px=4)


@pytest.mark.parametrize(
    ("img", "expected"),
    [
        (np.array([[[0, 255], [128, 77]]], np.uint8), "grey"),  # [N, H, W]
        (np.array([[[[0], [255]], [[128], [77]]]], np.uint8), "grey"),  # [N, H, W, 1]
        (np.array([[[[0, 0, 0, 0], [10, 20, 30, 255]], [[0, 0, 0, 255], [9, 9, 9, 255]]]], np.uint8), "rgba"),
        (np.array([[[0, 65535], [32768, 257]]], np.uint16), "grey16"),
    ],
)
def test_hest_patches_of_any_mode(tmp_path, img, expected):
    path = tmp_path / "s.h5"
    with h5py.File(path, "w") as f:
        f["img"] = img
    out = read_patch_images(path)
    assert out.dtype == np.uint8 and out.shape == (1, 2, 2, 3)
    want = {
        "grey": np.array([[0, 255], [128, 77]], np.uint8)[..., None].repeat(3, -1),
        "grey16": np.array([[0, 255], [128, 1]], np.uint8)[..., None].repeat(3, -1),
        "rgba": np.array([[[255, 255, 255], [10, 20, 30]], [[0, 0, 0], [9, 9, 9]]], np.uint8),
    }[expected]
    np.testing.assert_array_equal(out[0], want)


def test_plism_h5_tiles_of_any_mode(tmp_path):
    """ingest_h5: the same tile stored as RGB, opaque RGBA, 16-bit RGB and (for a grey picture) 2-D grey."""
    from histodistill.matched_tiles import ingest_h5, read_manifest
    from histodistill.tilestore import TileStore

    side = 16
    rgb = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    grey = rgb[..., 0]
    variants = {
        "GMH_S60": {"16_0_0": rgb, "16_16_0": np.repeat(grey[..., None], 3, 2)},
        "GMH_AT2": {"16_0_0": np.dstack([rgb, np.full((side, side), 255, np.uint8)]), "16_16_0": grey},
        "GIV_S60": {
            "16_0_0": rgb.astype(np.uint16) * 257,
            "16_16_0": grey[..., None].astype(np.uint16) * 257,
        },
    }
    h5_dir = tmp_path / "h5"
    h5_dir.mkdir()
    for slide, tiles in variants.items():
        with h5py.File(h5_dir / f"{slide}_to_GMH_S60.tif.h5", "w") as f:
            for key, value in tiles.items():
                f.create_dataset(key, data=value)
    sheet = tmp_path / "plism.tsv"
    sheet.write_text(
        "slide_id\tpath\tscanner\tstaining\nGMH_S60\ta.tiff\tS60\tGMH\nGMH_AT2\tb.tiff\tAT2\tGMH\n"
        "GIV_S60\tc.tiff\tS60\tGIV\n"
    )
    manifest = read_manifest(sheet, "GMH_S60")
    assert ingest_h5(manifest, "GMH_S60", h5_dir, tmp_path / "t.zarr", tmp_path / "t.parquet") == 2
    tiles = TileStore(tmp_path / "t.zarr").tiles
    for s in range(3):
        np.testing.assert_array_equal(tiles[s, 0], rgb)
        np.testing.assert_array_equal(tiles[s, 1], np.repeat(grey[..., None], 3, 2))


@pytest.mark.parametrize("mode", ["grey", "rgba", "rgb16"])
def test_hest_task_of_any_mode_packs_to_the_rgb_tiles(tmp_path, mode):
    """pack_hest_task: a demo HEST task whose patch files are rewritten as grey [N, H, W], opaque RGBA or
    16-bit RGB gives the tile store the RGB (grey: R = G = B) tiles."""
    from histodistill.bench.datasets import pack_hest_task
    from histodistill.bench.hest import load_task
    from histodistill.demo.tasks import make_demo_hest
    from histodistill.tilestore import TileStore

    tiles = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    if mode == "grey":
        tiles = np.repeat(tiles[..., :1], 3, axis=3)
    task_dir = make_demo_hest(tmp_path / "task", tiles, seed=1, spots_per_sample=5)
    expected = []
    for sample in load_task(task_dir).samples.values():
        with h5py.File(sample.patches_path, "r+") as f:
            rgb = f["img"][()]
            expected.append(rgb)
            del f["img"]
            f["img"] = {
                "grey": rgb[..., 0],
                "rgba": np.concatenate([rgb, np.full(rgb.shape[:3] + (1,), 255, np.uint8)], axis=3),
                "rgb16": rgb.astype(np.uint16) * 257,
            }[mode]
    n = pack_hest_task(task_dir, tmp_path / "hest.zarr", chunk_tiles=3)
    np.testing.assert_array_equal(TileStore(tmp_path / "hest.zarr").read(0, n), np.concatenate(expected))
