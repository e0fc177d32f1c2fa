"""Fault 7: a registration that fails names the slide, keeps elastix's log next to the QC record, and
`on_failure: exclude` covers every failure path (elastix error, unreadable moving slide, failed QC).

The generator writes a reference slide (1024 × 768 px at 0.25 µm/px, 128 × 96 px at elastix's 2 µm/px) and
a tiny moving slide (48 × 48 px: 6 × 6 px at 2 µm/px), smaller than elastix's coarsest pyramid level, so
elastix itself fails ("Too many samples map outside moving image buffer").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from histodistill.cli import main
from histodistill.demo.slides import DemoSlideConfig, make_demo_slide, render_tissue, write_pyramid_tiff
from histodistill.registration import RegistrationConfig, RegistrationError, register_to_grid
from histodistill.tiling import TilingConfig, tile_slide

FAST = RegistrationConfig(iterations=50)


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("registration_errors")
    spec = DemoSlideConfig(1024, 768, mpp=0.25, levels=3)
    ref = make_demo_slide(d / "ref.tiff", seed=1, spec=spec)
    tiny = d / "tiny.tiff"
    write_pyramid_tiff(render_tissue(spec, 1)[:48, :48], tiny, 0.25, levels=1)
    broken = d / "broken.tiff"
    broken.write_bytes(b"II*\x00" + bytes(200))  # a TIFF header and nothing readable
    grid = d / "grid.parquet"
    tile_slide(ref, "ref", grid, TilingConfig(min_tissue=0.0))
    return {"ref": ref, "tiny": tiny, "broken": broken, "grid": grid}


def _register(slides, moving: str, out: Path, on_failure: str) -> dict:
    return register_to_grid(
        slides["ref"],
        slides[moving],
        slides["grid"],
        out / "transforms" / moving,
        out / "qc" / f"{moving}.json",
        out / "qc" / f"{moving}.png",
        FAST,
        names=("ref", moving),
        on_failure=on_failure,
    )


def test_elastix_failure_names_the_slide_and_keeps_the_log(slides, tmp_path):
    with pytest.raises(RegistrationError) as info:
        _register(slides, "tiny", tmp_path, "error")
    message = str(info.value)
    log = tmp_path / "qc" / "tiny.elastix.log"
    assert "elastix failed to register slide 'tiny'" in message
    assert "Too many samples map outside moving image buffer" in message  # elastix's own reason
    assert f"elastix log: {log}" in message and "on_failure: exclude" in message
    assert log.is_file() and "Too many samples map outside moving image buffer" in log.read_text()
    assert not (tmp_path / "transforms" / "tiny").exists()


def test_exclude_covers_the_elastix_failure(slides, tmp_path):
    qc = _register(slides, "tiny", tmp_path, "exclude")
    assert qc["passed"] is False and "slide 'tiny'" in qc["error"]
    stored = json.loads((tmp_path / "qc" / "tiny.json").read_text())
    assert stored["passed"] is False and stored["on_failure"] == "exclude"
    assert stored["elastix_log"] == str(tmp_path / "qc" / "tiny.elastix.log")
    assert Path(stored["elastix_log"]).is_file()
    # every declared output exists, so the workflow goes on and the matched tiles leave the slide out
    record = json.loads((tmp_path / "transforms" / "tiny" / "registration.json").read_text())
    assert "elastix failed" in record["error"] and (tmp_path / "qc" / "tiny.png").stat().st_size > 0


def test_unreadable_moving_slide_is_named_and_excluded(slides, tmp_path):
    with pytest.raises(RegistrationError, match=r"PLISM slide 'broken' cannot be registered: .*broken\.tiff"):
        _register(slides, "broken", tmp_path, "error")
    qc = _register(slides, "broken", tmp_path, "exclude")
    assert qc["passed"] is False and "broken.tiff" in qc["error"] and qc["elastix_log"] is None


def test_cli_exclude_exits_cleanly_and_error_exits_2(slides, tmp_path):
    common = [str(slides["ref"]), str(slides["tiny"]), "--grid", str(slides["grid"]), "--iterations", "50"]
    assert main(["register", *common, "--out", str(tmp_path / "e")]) == 2
    assert (tmp_path / "e" / "qc.elastix.log").is_file()
    assert main(["register", *common, "--out", str(tmp_path / "x"), "--on-failure", "exclude"]) == 0
    qc = json.loads((tmp_path / "x" / "qc.json").read_text())
    assert qc["slide_id"] == "tiny" and qc["passed"] is False and "slide 'tiny'" in qc["error"]
