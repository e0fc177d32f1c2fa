"""PLISM stage: demo set with known warps, elastix registration accuracy and QC, matched tiles, h5 source."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from histodistill import slides as slides_module
from histodistill.demo.plism import (
    DEMO_SCANNERS,
    PlismDemoConfig,
    _random_warp,
    make_plism_demo,
    reference_to_moving,
    warp_to_reference,
)
from histodistill.errors import ConfigError, SlideError
from histodistill.matched_tiles import (
    PlismError,
    cut_matched_tiles,
    cut_registered,
    ingest_h5,
    read_manifest,
    read_matched_table,
)
from histodistill.registration import (
    RegistrationConfig,
    RegistrationError,
    load_transform,
    map_points,
    ncc,
    register_to_grid,
    tile_centers_um,
)
from histodistill.tilestore import TileStore
from histodistill.tiling import TilingConfig, read_tile_table, tile_slide

REF = "GMH_S60"
# One inter-scanner, one inter-staining and one both-different pair are registered (each ~8 s on 2 CPUs).
MOVING = ("GMH_AT2", "GIV_S60", "GIV_GT450")
FAST = RegistrationConfig(iterations=250)


@pytest.fixture(scope="module")
def plism_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plism_demo")
    spec = PlismDemoConfig(2048, 1536, scanners=("S60", "AT2", "GT450"), stainings=("GMH", "GIV"))
    make_plism_demo(out, seed=0, spec=spec)
    return out


@pytest.fixture(scope="module")
def grid(plism_demo) -> Path:
    out = plism_demo / "grid.parquet"
    tile_slide(plism_demo / f"{REF}.tiff", REF, out, TilingConfig(min_tissue=0.5))
    return out


@pytest.fixture(scope="module")
def registered(plism_demo, grid) -> dict[str, dict]:
    qc = {}
    for slide in MOVING:
        qc[slide] = register_to_grid(
            plism_demo / f"{REF}.tiff",
            plism_demo / f"{slide}.tiff",
            grid,
            plism_demo / "transforms" / slide,
            plism_demo / "qc" / f"{slide}.json",
            plism_demo / "qc" / f"{slide}.png",
            FAST,
            names=(REF, slide),
        )
    return qc


def test_demo_warp_inverse_is_exact():
    warp = _random_warp(np.random.default_rng(3), PlismDemoConfig(), (1024.0, 768.0))
    q = np.random.default_rng(4).uniform(0, 800, (50, 2))
    u = reference_to_moving(warp, q)
    np.testing.assert_allclose(warp_to_reference(warp, u), q, atol=1e-6)
    assert np.linalg.norm(u - q, axis=1).max() > 1.0  # the warp is not the identity


def test_demo_set_has_variants_with_own_mpp_and_color(plism_demo):
    manifest = read_manifest(plism_demo / "plism.tsv", REF)
    assert len(manifest) == 6 and set(manifest["scanner"]) == {"S60", "AT2", "GT450"}
    truth = json.loads((plism_demo / "truth.json").read_text())
    assert truth["reference"] == REF
    assert truth["slides"][REF]["warp"]["elastic"] == []
    means = {}
    for slide_id, row in manifest.iterrows():
        with slides_module.open_slide(row["path"]) as slide:
            mpp = slides_module.resolve_mpp(dict(slide.properties))
            assert mpp.x == pytest.approx(DEMO_SCANNERS[row["scanner"]]["mpp"], rel=1e-4)
            assert 0.22 <= mpp.x <= 0.27
            means[slide_id] = slides_module.read_scaled(slide, mpp.x, 8.0).reshape(-1, 3).mean(axis=0)
    assert np.abs(means["GIV_S60"] - means[REF]).max() > 2  # another staining, another colour


def test_registration_maps_tile_centers_within_2um(plism_demo, grid, registered):
    table, meta = read_tile_table(grid)
    centers = tile_centers_um(table, meta)
    assert len(centers) >= 5
    truth = json.loads((plism_demo / "truth.json").read_text())["slides"]
    errors = []
    for slide in MOVING:
        mapped = map_points(load_transform(plism_demo / "transforms" / slide), centers)
        expected = reference_to_moving(truth[slide]["warp"], centers)
        before = np.linalg.norm(centers - expected, axis=1)
        assert before.mean() > 5  # the slides really are displaced
        errors.append(np.linalg.norm(mapped - expected, axis=1))
    errors = np.concatenate(errors)
    assert errors.mean() <= 2.0, errors
    assert errors.max() <= 5.0, errors


def test_registration_qc_records_and_pictures(plism_demo, registered):
    for slide, qc in registered.items():
        assert qc["passed"], qc
        assert qc["ncc_after_median"] > qc["ncc_before_median"] + 0.3
        assert qc["ncc_after_median"] >= FAST.min_ncc
        saved = json.loads((plism_demo / "qc" / f"{slide}.json").read_text())
        assert saved["slide_id"] == slide and saved["passed"]
        assert (plism_demo / "qc" / f"{slide}.png").stat().st_size > 1000
        names = sorted(p.name for p in (plism_demo / "transforms" / slide).iterdir())
        assert names == ["affine.txt", "bspline.txt", "registration.json"]


def test_registration_never_reads_level_0(plism_demo, grid, tmp_path, monkeypatch):
    levels = []
    original = slides_module.read_rgb

    def spy(slide, x0, y0, level, width, height):
        levels.append(level)
        return original(slide, x0, y0, level, width, height)

    monkeypatch.setattr(slides_module, "read_rgb", spy)
    register_to_grid(
        plism_demo / f"{REF}.tiff",
        plism_demo / "GMH_GT450.tiff",
        grid,
        tmp_path / "t",
        tmp_path / "qc.json",
        None,
        RegistrationConfig(iterations=50, min_ncc=-1, max_residual_um=1e9),
        names=(REF, "GMH_GT450"),
    )
    assert levels and 0 not in levels


def test_different_tissue_fails_qc(plism_demo, grid, tmp_path):
    other = make_plism_demo(
        tmp_path / "other", seed=5, spec=PlismDemoConfig(2048, 1536, scanners=("S60",), stainings=("GMH",))
    ).parent
    args = (plism_demo / f"{REF}.tiff", other / "GMH_S60.tiff", grid)
    with pytest.raises(RegistrationError, match="'intruder'.*failed registration QC"):
        register_to_grid(*args, tmp_path / "t1", tmp_path / "q1.json", None, FAST, names=(REF, "intruder"))
    qc = register_to_grid(
        *args,
        tmp_path / "t2",
        tmp_path / "q2.json",
        None,
        FAST,
        names=(REF, "intruder"),
        on_failure="exclude",
    )
    assert not qc["passed"] and qc["ncc_after_median"] < FAST.min_ncc


def test_matched_tiles_are_aligned_rows(plism_demo, grid, registered, tmp_path):
    manifest = read_manifest(plism_demo / "plism.tsv", REF)
    manifest = manifest.loc[[REF, *MOVING]]
    transforms = {s: str(plism_demo / "transforms" / s) for s in MOVING}
    summary = cut_matched_tiles(
        manifest,
        REF,
        grid,
        transforms,
        registered,
        tmp_path / "tiles.zarr",
        tmp_path / "tiles.parquet",
        workers=2,
    )
    assert summary["passed"].all() and len(summary) == len(MOVING)
    store = TileStore(tmp_path / "tiles.zarr")
    n_slides, n_tiles = store.tiles.shape[:2]
    assert (n_slides, store.tiles.shape[2:]) == (4, (224, 224, 3)) and n_tiles >= 5
    assert len(store) == n_slides * n_tiles
    np.testing.assert_array_equal(store.read(n_tiles - 2, n_tiles + 3)[3], store.tiles[1, 1])
    table, meta = read_matched_table(tmp_path / "tiles.parquet")
    assert list(table.columns[:8]) == [
        "slide_id", "scanner", "staining", "tile_index", "tile_id", "x0", "y0", "residual_um"
    ]  # fmt: skip
    assert len(table) == n_slides * n_tiles and meta["reference"] == REF and meta["excluded"] == []
    assert (
        table.groupby("slide_id")["tile_id"]
        .apply(list)
        .apply(lambda ids: ids == table["tile_id"][:n_tiles].tolist())
    ).all()

    def od(tile):
        return -np.log(np.maximum(tile.astype(np.float32), 1) / 255).sum(axis=2)

    ref_tiles = store.tiles[0]
    for s in range(1, n_slides):
        matched = [ncc(od(ref_tiles[i]), od(store.tiles[s, i])) for i in range(n_tiles)]
        shifted = [ncc(od(ref_tiles[i]), od(store.tiles[s, (i + 1) % n_tiles])) for i in range(n_tiles)]
        assert np.median(matched) > 0.8, matched  # the same tissue, whatever the scanner and staining
        assert np.median(shifted) < 0.3, shifted


def test_failed_slide_is_excluded_and_named(plism_demo, grid, registered, tmp_path):
    manifest = read_manifest(plism_demo / "plism.tsv", REF).loc[[REF, *MOVING]]
    qc = {**registered, "GIV_S60": {**registered["GIV_S60"], "passed": False}}
    transforms = {s: str(plism_demo / "transforms" / s) for s in MOVING}
    cut_matched_tiles(manifest, REF, grid, transforms, qc, tmp_path / "t.zarr", tmp_path / "t.parquet")
    table, meta = read_matched_table(tmp_path / "t.parquet")
    assert meta["excluded"] == ["GIV_S60"] and "GIV_S60" not in set(table["slide_id"])
    assert TileStore(tmp_path / "t.zarr").tiles.shape[0] == 3


def test_cut_registered_reads_the_registration_files(plism_demo, grid, registered, tmp_path):
    records = read_manifest(plism_demo / "plism.tsv", REF).loc[[REF, *MOVING]].to_dict("records")
    qc_files = [plism_demo / "qc" / f"{s}.json" for s in MOVING]  # written by register_to_grid
    transforms = [plism_demo / "transforms" / s for s in MOVING]
    out = tmp_path / "out"
    summary = cut_registered(
        records, REF, grid, transforms, qc_files, out / "t.zarr", out / "t.parquet", out / "summary.tsv"
    )
    assert summary["passed"].all() and sorted(summary["slide_id"]) == sorted(MOVING)
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.tsv", sep="\t"), summary, check_dtype=False)
    table, meta = read_matched_table(out / "t.parquet")
    assert meta["excluded"] == [] and list(dict.fromkeys(table["slide_id"])) == [REF, *MOVING]


def test_missing_slide_file_leaves_no_store(plism_demo, grid, registered, tmp_path):
    manifest = read_manifest(plism_demo / "plism.tsv", REF).loc[[REF, *MOVING]].copy()
    manifest.loc["GMH_AT2", "path"] = str(tmp_path / "gone.tiff")
    transforms = {s: str(plism_demo / "transforms" / s) for s in MOVING}
    with pytest.raises(SlideError, match="GMH_AT2.*not found"):
        cut_matched_tiles(
            manifest, REF, grid, transforms, registered, tmp_path / "t.zarr", tmp_path / "t.parquet"
        )
    assert not (tmp_path / "t.zarr").exists() and not (tmp_path / "t.parquet").exists()


def test_load_transform_names_what_is_missing(tmp_path):
    with pytest.raises(RegistrationError, match="missing affine.txt"):
        load_transform(tmp_path)


# --- manifest ------------------------------------------------------------------------------------------


def _manifest(tmp_path: Path, rows: list[str], header: str = "slide_id\tpath\tscanner\tstaining") -> Path:
    path = tmp_path / "plism.tsv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


GOOD = ["GMH_S60\ta.tiff\tS60\tGMH", "GMH_AT2\tb.tiff\tAT2\tGMH", "GIV_S60\tc.tiff\tS60\tGIV"]


def test_manifest_reads_and_filters_stainings(tmp_path):
    path = _manifest(tmp_path, GOOD)
    assert read_manifest(path, REF)["slide_id"].tolist() == ["GMH_S60", "GMH_AT2", "GIV_S60"]
    assert read_manifest(path, REF, ["GMH"])["slide_id"].tolist() == ["GMH_S60", "GMH_AT2"]
    with pytest.raises(ConfigError, match="reference's staining 'GMH'"):
        read_manifest(path, REF, ["GIV"])
    with pytest.raises(ConfigError, match=r"\['XX'\] not in the manifest"):
        read_manifest(path, REF, ["GMH", "XX"])


@pytest.mark.parametrize(
    ("rows", "reference", "match"),
    [
        (GOOD, "GMH_S99", "reference 'GMH_S99' is not in the manifest"),
        (
            [*GOOD, "other\td.tiff\tAT2\tGMH"],
            REF,
            r"duplicate \(scanner, staining\): AT2/GMH: \['GMH_AT2', 'other'\]",
        ),
        ([*GOOD, "GMH_AT2\td.tiff\tP\tGMH"], REF, r"duplicate slide_id\(s\) \['GMH_AT2'\]"),
        (["bad id\ta.tiff\tS60\tGMH"], REF, "unsafe slide id"),
    ],
)
def test_manifest_errors_name_the_item(tmp_path, rows, reference, match):
    with pytest.raises(ConfigError, match=match):
        read_manifest(_manifest(tmp_path, rows), reference)


def test_manifest_missing_column(tmp_path):
    with pytest.raises(ConfigError, match=r"lacks column\(s\) \['staining'\]"):
        read_manifest(_manifest(tmp_path, ["GMH_S60\ta\tS60"], "slide_id\tpath\tscanner"), REF)


# --- the public pre-registered tiles (h5) ----------------------------------------------------------------


def _write_h5(directory: Path, slide: str, tiles: dict[str, np.ndarray]) -> None:
    directory.mkdir(exist_ok=True)
    with h5py.File(directory / f"{slide}_to_{REF}.tif.h5", "w") as f:
        for key, value in tiles.items():
            f.create_dataset(key, data=value)


def _h5_set(tmp_path: Path, ids: list[str]) -> tuple[pd.DataFrame, Path]:
    rng = np.random.default_rng(0)
    h5_dir = tmp_path / "h5"
    for slide in ("GMH_S60", "GMH_AT2", "GIV_S60"):
        _write_h5(h5_dir, slide, {tid: rng.integers(0, 255, (224, 224, 3), dtype=np.uint8) for tid in ids})
    return read_manifest(_manifest(tmp_path, GOOD), REF), h5_dir


def test_h5_source_rows_sorted_by_x_then_y(tmp_path):
    ids = ["16_448_0", "16_0_224", "16_224_0", "16_0_0", "16_1000_5"]
    manifest, h5_dir = _h5_set(tmp_path, ids)
    n = ingest_h5(manifest, REF, h5_dir, tmp_path / "t.zarr", tmp_path / "t.parquet", chunk_tiles=2)
    assert n == 5
    table, meta = read_matched_table(tmp_path / "t.parquet")
    expected = ["16_0_0", "16_0_224", "16_224_0", "16_448_0", "16_1000_5"]
    assert table["tile_id"][:5].tolist() == expected and meta["source"] == "h5"
    assert table["x0"][:5].tolist() == [0, 0, 224, 448, 1000]
    store = TileStore(tmp_path / "t.zarr")
    assert store.tiles.shape == (3, 5, 224, 224, 3)
    with h5py.File(h5_dir / f"GIV_S60_to_{REF}.tif.h5") as f:
        for i, tid in enumerate(expected):
            np.testing.assert_array_equal(store.tiles[2, i], f[tid][()])


def test_h5_keys_in_plismbenchs_form_are_read_as_level_x_y(tmp_path):
    # plismbench reads key.split("_")[1:] as (level, x, y): a leading field, then three integers
    ids = ["tile_16_448_0", "tile_16_0_224", "tile_16_224_0"]
    manifest, h5_dir = _h5_set(tmp_path, ids)
    ingest_h5(manifest, REF, h5_dir, tmp_path / "t.zarr", tmp_path / "t.parquet")
    table, _ = read_matched_table(tmp_path / "t.parquet")
    assert table["tile_id"][:3].tolist() == ["tile_16_0_224", "tile_16_224_0", "tile_16_448_0"]
    assert table["x0"][:3].tolist() == [0, 224, 448] and table["y0"][:3].tolist() == [224, 0, 0]
    (tmp_path / "bad").mkdir()
    manifest, h5_dir = _h5_set(tmp_path / "bad", ["16_x_0"])
    with pytest.raises(PlismError, match="unexpected tile id '16_x_0'"):
        ingest_h5(manifest, REF, h5_dir, tmp_path / "u.zarr", tmp_path / "u.parquet")


@pytest.mark.parametrize(
    ("change", "match"), [("drop", r"missing \['16_224_0'\]"), ("add", r"extra \['16_9_9'\]")]
)
def test_h5_source_missing_or_extra_tile_is_named(tmp_path, change, match):
    ids = ["16_0_0", "16_224_0", "16_448_0"]
    manifest, h5_dir = _h5_set(tmp_path, ids)
    bad = {
        tid: np.zeros((224, 224, 3), np.uint8) for tid in ids if not (change == "drop" and tid == "16_224_0")
    }
    if change == "add":
        bad["16_9_9"] = np.zeros((224, 224, 3), np.uint8)
    _write_h5(h5_dir, "GMH_AT2", bad)
    with pytest.raises(PlismError, match="'GMH_AT2'.*" + match):
        ingest_h5(manifest, REF, h5_dir, tmp_path / "t.zarr", tmp_path / "t.parquet")
    assert not (tmp_path / "t.zarr").exists() and not (tmp_path / "t.parquet").exists()


def test_h5_source_missing_file_is_named(tmp_path):
    manifest, h5_dir = _h5_set(tmp_path, ["16_0_0"])
    (h5_dir / f"GIV_S60_to_{REF}.tif.h5").unlink()
    with pytest.raises(PlismError, match="GIV_S60_to_GMH_S60.tif.h5"):
        ingest_h5(manifest, REF, h5_dir, tmp_path / "t.zarr", tmp_path / "t.parquet")


def test_a_saved_transform_names_no_temporary_file(tmp_path):
    """elastix records the B-spline map's initial transform as a file in its temporary folder, deleted after
    the run: saved, that path would dangle and make two runs' files differ. Maps chain by order instead."""
    import SimpleITK as sitk

    from histodistill.registration import save_transform

    maps = [sitk.GetDefaultParameterMap("affine"), sitk.GetDefaultParameterMap("bspline")]
    maps[1]["InitialTransformParameterFileName"] = [
        str(tmp_path / "elastix-x1" / "TransformParameters.0.txt")
    ]
    save_transform(maps, tmp_path / "t", {})
    text = (tmp_path / "t" / "bspline.txt").read_text()
    assert "elastix-x1" not in text
    assert '(InitialTransformParameterFileName "NoInitialTransform")' in text
    assert [dict(m) for m in load_transform(tmp_path / "t")][1]["Transform"] == ("BSplineTransform",)
