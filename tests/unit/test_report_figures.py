"""Report figures that tell the truth: degenerate plots say so, scales fit the data, legends and labels sit
where they cover nothing (issue 20). The PNGs were also inspected by eye when these were written."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from histodistill.bench import plism as P
from histodistill.registration import _label_halves, checkerboard
from histodistill.report.figures import model_colors, plism_scatter
from histodistill.report.mitosis_figures import color_range, plot_cross_domain, plot_scaling

MODELS = ["teacher", "student", "baseline"]


def _png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def _has_color(rgb: np.ndarray, hex_color: str) -> bool:
    want = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(rgb - want).max(axis=-1) <= 2).sum() >= 10)


def _plism_summary(values: dict[str, tuple[float, float]]) -> pd.DataFrame:
    rows = []
    for model, (scanner, staining) in values.items():
        for group, v in ((P.INTER_SCANNER, scanner), (P.INTER_STAINING, staining)):
            rows.append({"model": model, "group": group, "metric": "top_1", "median": v})
    return pd.DataFrame(rows).assign(median_ci_low=np.nan, median_ci_high=np.nan)


def test_a_degenerate_scatter_says_so_instead_of_drawing(tmp_path):
    """Every model at (0, 0) (the demo's top-1 accuracies): a sentence, not overprinted labels on axes."""
    colors = model_colors(MODELS)
    summary = _plism_summary(dict.fromkeys(MODELS, (0.0, 0.0)))
    rgb = _png(plism_scatter(P.plot_scanner_vs_staining, summary, tmp_path / "sv.png", colors, k=1))
    assert rgb.shape[0] < 200 and rgb.shape[1] > 3 * rgb.shape[0]  # one line of text, no axes
    assert not any(_has_color(rgb, c) for c in colors.values())  # no model drawn


def test_a_scatter_keeps_every_model_in_its_colour_and_axes_in_range(tmp_path):
    colors = model_colors(MODELS)
    summary = _plism_summary({"teacher": (0.30, 0.10), "student": (0.31, 0.11), "baseline": (0.5, 0.2)})
    rgb = _png(plism_scatter(P.plot_scanner_vs_staining, summary, tmp_path / "sv.png", colors, k=1))
    assert rgb.shape[0] > 300 and all(_has_color(rgb, c) for c in colors.values())
    assert P._limits(np.array([0.0, 0.02])) == (0.0, pytest.approx(0.03))  # never below 0
    assert P._limits(np.array([0.9, 1.0]))[1] == 1.0  # never above 1
    assert P._limits(np.array([-0.2, 0.5]))[0] < -0.2  # a negative value stays visible


def _mitosis_summary() -> pd.DataFrame:
    rows = []
    domains = ["human_breast", "canine_lymphoma", "canine_cutaneous_mct"]
    rng = np.random.default_rng(0)
    for i, model in enumerate(MODELS):
        for f in (0.01, 0.1, 1.0):
            rows.append((model, "linear_probe", "scaling", f, "all", "all", "auroc", 0.4 + 0.1 * i + f / 10))
        for a in domains:
            for b in domains:
                rows.append(
                    (model, "linear_probe", "cross_domain", 1.0, a, b, "auroc", rng.uniform(0.3, 0.45))
                )
    columns = ["model", "method", "protocol", "fraction", "train_domain", "test_domain", "metric", "mean"]
    return pd.DataFrame(rows, columns=columns).assign(std=0.01, n=3)


def test_heat_map_scale_fits_the_data():
    """AUROCs of 0.30–0.45 (below the old fixed 0.5 floor, where every cell was one colour)."""
    assert color_range(np.array([0.31, 0.44, np.nan])) == (0.31, 0.44)
    lo, hi = color_range(np.array([0.70, 0.70]))
    assert hi - lo == pytest.approx(0.05) and lo < 0.70 < hi
    with pytest.raises(ValueError):
        color_range(np.array([np.nan]))


def test_mitosis_figures_use_the_report_colours(tmp_path):
    colors = model_colors(MODELS)
    summary = _mitosis_summary()
    scaling = _png(plot_scaling(summary, tmp_path / "s.png", colors=colors))
    assert all(_has_color(scaling, c) for c in colors.values())
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    cross = plot_cross_domain(summary, tmp_path / "c.png", colors=colors)
    assert cross == (tmp_path / "c.png").read_bytes()


def test_checkerboard_halves_are_labelled():
    a = np.zeros((64, 80, 3), np.uint8)
    a[:, :, 0] = 200
    panel = Image.fromarray(np.concatenate([checkerboard(a, a), checkerboard(a, a)], axis=1))
    out = np.asarray(_label_halves(panel, ("before registration", "after registration"))).astype(int)
    strip = out.shape[0] - panel.height
    assert strip > 10 and (out[strip:] == np.asarray(panel)).all()
    dark = out[:strip].sum(axis=2) < 200  # black text on the white strip
    half = panel.width // 2
    assert dark[:, :half].any() and dark[:, half:].any()
