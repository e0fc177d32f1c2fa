"""Multi-site demo slides (`demo.multisite_cohorts`, issue 12.4): a slide of such a cohort is rendered under
its own random staining and scanner, drawn from its generator seed within the demo's ranges; the rule
demo_slide renders exactly that slide, and other demo slides keep the generator's own staining."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml

from histodistill.demo.slides import (
    SITE_RANGES,
    DemoSlideConfig,
    draw_site,
    iter_rgb_bands,
    make_demo_slide,
    render_tissue,
    restain,
    scan,
    seed_for,
)
from histodistill.slides import open_slide, read_rgb
from tests.conftest import REPO
from tests.helpers import overlay_dry_run_jobs


def test_a_site_is_reproducible_from_its_seed_and_within_the_demo_ranges():
    sites = [draw_site(seed_for(f"demo_pretrain_{i:02d}", 0), 0.25) for i in range(40)]
    assert draw_site(seed_for("demo_pretrain_00", 0), 0.25) == sites[0]
    stainings, scanners = zip(*sites, strict=True)
    hema = np.array([s["hema"] for s in stainings])
    hue = np.array([s["hue_deg"] for s in stainings])
    gamma = np.array([s["gamma"] for s in scanners])
    jpeg = np.array([s["jpeg"] for s in scanners])
    gain = np.array([s["gain"] for s in scanners])
    assert SITE_RANGES.hema[0] <= hema.min() and hema.max() <= SITE_RANGES.hema[1]
    assert np.abs(hue).max() <= SITE_RANGES.hue_deg and np.abs(gain - 1).max() <= SITE_RANGES.gain
    assert SITE_RANGES.gamma[0] <= gamma.min() and gamma.max() <= SITE_RANGES.gamma[1]
    assert SITE_RANGES.jpeg[0] <= jpeg.min() and jpeg.max() <= SITE_RANGES.jpeg[1]
    # 40 sites spread over their ranges (not one staining repeated)
    assert len(set(hema.round(6))) == 40 and hema.max() - hema.min() > 0.4 and np.ptp(gamma) > 0.2
    assert all(s["mpp"] == 0.25 for s in scanners)


def test_a_multisite_slide_is_its_tissue_restained_and_scanned_band_by_band(tmp_path):
    spec = DemoSlideConfig(768, 512, mpp=0.25)
    seed = seed_for("demo_pretrain_03", 0)
    site = draw_site(seed, spec.mpp)
    own = make_demo_slide(tmp_path / "own.tiff", seed, spec)
    other = make_demo_slide(tmp_path / "site.tiff", seed, spec, site)
    with open_slide(own) as a, open_slide(other) as b:
        own_rgb, site_rgb = read_rgb(a, 0, 0, 0, 768, 512), read_rgb(b, 0, 0, 0, 768, 512)
    # the site never changes the tissue: without it, the generator's own staining, unscanned
    np.testing.assert_array_equal(own_rgb, render_tissue(spec, seed))
    expected = np.concatenate([scan(restain(band, site[0]), site[1]) for band in iter_rgb_bands(spec, seed)])
    np.testing.assert_array_equal(site_rgb, expected)
    assert np.abs(site_rgb.astype(int) - own_rgb).mean() > 2  # a visibly different staining


@pytest.fixture
def demo_workdir(tmp_path):
    """README's demo (small slides) in a scratch workdir, with a sheet of one demo-cohort slide and one slide
    of a multi-site cohort `sites`."""
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["demo"].update(width_px=512, height_px=512, multisite_cohorts=["sites"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    rows = ["slide_id\tpath\tcohort", *(f"{s}\tresults/demo/slides/{s}.tiff\t{c}" for s, c in SHEET.items())]
    (tmp_path / "configs" / "demo_samples.tsv").write_text("\n".join(rows) + "\n")
    return tmp_path


SHEET = {"demo_00": "demo", "sites_00": "sites"}


def _snakemake(workdir, *args):
    return subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), "--cores", "1"]
        + ["--configfile", str(workdir / "config.yaml"), "--", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"},
    )


def test_rule_demo_slide_renders_a_multisite_cohorts_slide_under_its_drawn_site(demo_workdir):
    made = [f"results/demo/slides/{s}.tiff" for s in SHEET]
    run = _snakemake(demo_workdir, *made)
    assert run.returncode == 0, run.stderr[-3000:]
    config = yaml.safe_load((demo_workdir / "config.yaml").read_text())
    spec = DemoSlideConfig(512, 512, mpp=config["demo"]["mpp"])
    for (name, cohort), path in zip(SHEET.items(), made, strict=True):
        seed = seed_for(name, config["seed"])
        with open_slide(demo_workdir / path) as written:
            rgb = read_rgb(written, 0, 0, 0, 512, 512)
        bands = list(iter_rgb_bands(spec, seed))
        if cohort == "sites":  # its drawn site; the demo cohort: the generator's own staining, unscanned
            staining, scanner = draw_site(seed, spec.mpp)
            bands = [scan(restain(band, staining), scanner) for band in bands]
        np.testing.assert_array_equal(rgb, np.concatenate(bands), err_msg=name)


def test_configs_demo_pretrain_distils_the_demo_students_on_the_multisite_cohort(tmp_path):
    jobs = overlay_dry_run_jobs(tmp_path, "demo_pretrain.yaml", ["all_benchmarks"])
    pretrain = [f"demo_pretrain_{i:02d}" for i in range(12)]
    slides = sorted(j["wildcards"] for j in jobs if j["rule"] == "demo_slide")
    assert slides == sorted(f"slide={s}" for s in ["demo_00", "demo_01", "demo_02", *pretrain])
    tiled = sorted(j["wildcards"] for j in jobs if j["rule"] == "tile_slide")
    assert [w for w in tiled if "demo_pretrain" in w] == [
        f"cohort=demo_pretrain, slide={s}" for s in pretrain
    ]
    # the teacher is cached, and its heads trained, on demo_pretrain only; the students distil from them
    assert sorted(j["wildcards"] for j in jobs if j["rule"] == "cache_teacher") == [
        "teacher=h_optimus_0_tiny, cohort=demo_pretrain"
    ]
    (heads,) = [j for j in jobs if j["rule"] == "train_teacher_heads"]
    assert heads["wildcards"] == "teacher=h_optimus_0_tiny, cohort=demo_pretrain"
    distill = {j["wildcards"]: j["input"].split(", ") for j in jobs if j["rule"] == "distill"}
    assert set(distill) == {"run=demo", "run=demo_feature"}
    for inputs in distill.values():
        assert "results/tilestore/demo_pretrain.zarr" in inputs
        assert "results/teacher/h_optimus_0_tiny/demo_pretrain.zarr" in inputs
        assert not any(p.endswith(("tilestore/demo.zarr", "h_optimus_0_tiny/demo.zarr")) for p in inputs)
    # the benchmarks keep the demo cohort: nothing embeds demo_pretrain
    embedded = {j["wildcards"] for j in jobs if j["rule"] == "embed"}
    assert "model=student-demo, dataset=demo" in embedded
    assert not any("demo_pretrain" in w for w in embedded)
