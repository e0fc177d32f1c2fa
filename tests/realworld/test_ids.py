"""Fault 6: an id can never leave its output folder, and the sample sheet, the CLI and the Snakemake wildcard
constraints accept exactly the same ids (histodistill.ids)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from histodistill.cli import build_parser, main
from histodistill.config import read_sample_sheet
from histodistill.demo.slides import DemoSlideConfig, make_demo_cohort, make_demo_slide
from histodistill.export import export_h5, export_plismbench
from histodistill.ids import ID_REGEX, IdError, PathEscapeError, check_id, id_from_path, inside, is_safe_id
from histodistill.tilestore import INDEX_COLUMNS

REPO = Path(__file__).resolve().parents[2]
GOOD = ["a", "TCGA-A1-A0SB-01Z-00-DX1.8F9A", "slide_01", "v1.2.3", "-x", "_"]
BAD = [
    "../escaped",
    "..",
    ".",
    "a/b",
    "a\\b",
    "/abs",
    ".hidden",
    "trailing.",
    "a..b",
    "a b",
    "",
    "tissue_é",  # Unicode letters pass str.isalnum but not the wildcard constraint
    "スライド",
    "a\tb",
    "x" * 201,
]


@pytest.mark.parametrize("value", GOOD)
def test_safe_ids_pass_everywhere(value):
    assert is_safe_id(value) and check_id(value) == value
    assert re.fullmatch(ID_REGEX, value)  # the Snakemake wildcard constraint


@pytest.mark.parametrize("value", BAD)
def test_unsafe_ids_fail_with_the_id_and_the_rule(value):
    assert not is_safe_id(value)
    assert len(value) > 200 or not re.fullmatch(ID_REGEX, value)
    with pytest.raises(IdError, match=re.escape(repr(value)) + r" is not a safe id: use only ASCII letters"):
        check_id(value)


def test_wildcard_constraints_are_the_shared_validator():
    """rules/common.smk constrains slide, cohort and dataset with histodistill.ids.ID_REGEX itself."""
    text = (REPO / "rules" / "common.smk").read_text()
    block = text[text.index("wildcard_constraints:") :].split("\n\n")[0]
    for wildcard in ("slide", "cohort", "dataset"):
        assert re.search(rf"^\s+{wildcard}=ID_REGEX,$", block, re.M), wildcard
    assert "from histodistill.ids import ID_REGEX" in text


def test_unicode_id_fails_at_the_sample_sheet(tmp_path):
    sheet = tmp_path / "s.tsv"
    sheet.write_text("slide_id\tpath\tcohort\nok\ta.svs\tc\ntissue_é\tb.svs\tc\n", encoding="utf-8")
    with pytest.raises(
        IdError, match=r"sample sheet .*s\.tsv: id\(s\) \['tissue_é'\] are not safe ids.*Rename"
    ):
        read_sample_sheet(sheet)
    sheet.write_text("slide_id\tpath\tcohort\nok\ta.svs\t../up\n")
    with pytest.raises(IdError, match=r"\['\.\./up'\]"):
        read_sample_sheet(sheet)


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("ids")
    return make_demo_slide(d / "s.tiff", seed=3, spec=DemoSlideConfig(512, 512, mpp=0.5, levels=2))


def test_cli_refuses_an_escaping_slide_id(tmp_path, small_slide):
    work = tmp_path / "work"
    work.mkdir()
    out = work / "tiles.parquet"
    args = build_parser().parse_args(
        ["tile", str(small_slide), "--out", str(out), "--slide-id", "../escaped"]
    )
    with pytest.raises(IdError, match=r"--slide-id '\.\./escaped' is not a safe id"):
        args.func(args)
    assert main(["tile", str(small_slide), "--out", str(out), "--slide-id", "../escaped"]) == 2
    assert not out.exists() and sorted(p.name for p in tmp_path.rglob("*")) == ["work"]


def test_cli_default_id_drops_ome_and_the_extension(tmp_path, small_slide):
    assert id_from_path("/x/a.ome.tiff") == "a" and id_from_path("b.OME.TIF") == "b"
    assert (
        id_from_path("c.svs") == "c" and id_from_path("d.v2.tiff") == "d.v2" and id_from_path("e.ome") == "e"
    )
    # a derived id is corrected (and the correction logged); an explicit one never is
    assert id_from_path("/data/tissue é.svs") == "tissue_e"
    assert id_from_path("/d/slide one's.tiff") == "slide_one_s" and id_from_path("/d/..a...b.svs") == "a.b"
    with pytest.raises(IdError, match=r"\.\.\.\.svs': slide id '' is not a safe id.*--slide-id"):
        id_from_path("/data/....svs")
    link = tmp_path / "case7.ome.tiff"
    link.symlink_to(small_slide)  # any TIFF: only the name matters for the id
    out = tmp_path / "t.parquet"
    args = build_parser().parse_args(["tile", str(link), "--out", str(out)])
    args.func(args)
    import pandas as pd

    assert set(pd.read_parquet(out)["slide_id"]) == {"case7"}


def test_demo_cohort_refuses_an_escaping_cohort(tmp_path):
    with pytest.raises(IdError, match=r"cohort '\.\./x'"):
        make_demo_cohort(tmp_path / "d", n_slides=1, cohort="../x")
    assert not (tmp_path / "x_00.tiff").exists()


def _embedding_store(path: Path, slide_ids: list[str]) -> Path:
    """A finished embedding store as `extract_embeddings` leaves it: two tiles per slide, D = 4."""
    n = 2 * len(slide_ids)
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.create_array("embeddings", data=np.arange(n * 4, dtype=np.float32).reshape(n, 4))
    index = {
        "slide_index": np.repeat(np.arange(len(slide_ids), dtype=np.int32), 2),
        "tile_id": np.arange(n, dtype=np.int64),
        "x0": np.tile(np.array([0, 448], np.int64), len(slide_ids)),
        "y0": np.zeros(n, np.int64),
        "level": np.zeros(n, np.int32),
        "tissue_frac": np.ones(n, np.float32),
    }
    assert set(index) == set(INDEX_COLUMNS)
    for name, values in index.items():
        root.create_array(name, data=values)
    slides = [{"slide_id": s, "slide_mpp": 0.25} for s in slide_ids]
    prov = {"slides": slides, "tile_px": 224, "mpp": 0.5, "model_id": "m", "pooling": "cls"}
    root.attrs.update({"complete": True, "provenance": prov})
    return path


@pytest.mark.parametrize("exporter", [export_plismbench, export_h5])
def test_exporters_refuse_an_escaping_id_and_write_nothing_outside(tmp_path, exporter):
    store = _embedding_store(tmp_path / "emb.zarr", ["ok", "../escaped"])
    out = tmp_path / "deep" / "out"
    with pytest.raises(IdError, match=r"'\.\./escaped' is not a safe id"):
        exporter(store, out)
    assert not (tmp_path / "deep" / "escaped").exists() and not (tmp_path / "deep" / "escaped.h5").exists()
    written = exporter(_embedding_store(tmp_path / "ok.zarr", ["ok", "b.2"]), out)
    assert all(p.resolve().is_relative_to(out.resolve()) for p in written) and len(written) == 2


def test_inside_resolves_and_refuses_escapes(tmp_path):
    root = tmp_path / "out"
    root.mkdir()
    assert inside(root, "a.h5") == (root / "a.h5").resolve()
    assert inside(root, "a", "features.npy") == (root / "a" / "features.npy").resolve()
    for parts in (("../x.h5",), ("..", "x"), ("/etc/passwd",), ("",), (".",)):
        with pytest.raises(PathEscapeError, match="outside"):
            inside(root, *parts)
    (root / "link").symlink_to(tmp_path)  # a symlink pointing out of the folder is caught too
    with pytest.raises(PathEscapeError, match=r"resolves to .*outside"):
        inside(root, "link", "x.h5")
