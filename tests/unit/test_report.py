"""The benchmark report: leaderboard numbers against hand computations, a self-contained escaped page."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import zarr
from PIL import Image

from histodistill.bench.plism import score_plism
from histodistill.models.registry import load_model
from histodistill.provenance import config_hash, provenance
from histodistill.report import ReportError, build_report, model_profile
from histodistill.report import run as run_report
from histodistill.report.figures import model_colors

ALPHA, BETA, GAMMA = "alpha", "<b>beta</b>", "gamma"  # BETA tests escaping; order = colour order
CONFIG = {"seed": 3, "tiling": {"mpp": 0.5, "tile_px": 224}, "benchmarks": {"models": [ALPHA, BETA, GAMMA]}}
MODELS = {
    ALPHA: {"params_m": 86.6, "gflops": 46.2, "tiles_per_s": 410.0, "device": "cuda:0 (H100)"},
    BETA: {"params_m": 22.1, "gflops": 12.5, "tiles_per_s": None, "device": "cpu"},
}
# HEST fold means: task → fold → value, per model (BETA has no HEST scores).
HEST = {
    ALPHA: {"t1": [0.30, 0.40], "t2": [0.10, 0.20, 0.60]},
    GAMMA: {"t1": [0.50, 0.70], "t2": [0.20, 0.20, 0.20]},
}
# Probe balanced accuracy: task → linear seeds; GAMMA lacks task "bach".
PROBE = {
    ALPHA: {"crc": [0.80, 0.82, 0.84], "bach": [0.60, 0.70, 0.65]},
    BETA: {"crc": [0.70, 0.71, 0.72], "bach": [0.50, 0.55, 0.60]},
    GAMMA: {"crc": [0.90, 0.91, 0.92]},
}


def write_tidy(frame: pd.DataFrame, path, **prov) -> str:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    meta = json.dumps(provenance({"test": True}, **prov)).encode()
    pq.write_table(table.replace_schema_metadata({b"histodistill": meta}), path)
    return str(path)


def hest_rows(folds: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for task, means in folds.items():
        for fold, m in enumerate(means):
            rows += [(task, fold, "GENE1", "pearson", m + 0.05), (task, fold, "GENE2", "pearson", m - 0.05)]
            rows.append((task, fold, "mean", "pearson", m))
    return pd.DataFrame(rows, columns=["task", "fold", "gene", "metric", "value"])


def probe_rows(tasks: dict[str, list[float]]) -> pd.DataFrame:
    rows = []
    for task, baccs in tasks.items():
        for seed, b in enumerate(baccs):
            rows += [(task, "linear", seed, "balanced_accuracy", b), (task, "linear", seed, "auroc", b + 0.1)]
            rows.append((task, "linear", seed, "f1_weighted", b - 0.1))
        rows += [(task, "knn", 0, "balanced_accuracy", baccs[0] - 0.05), (task, "knn", 0, "k", 7.0)]
    return pd.DataFrame(rows, columns=["task", "method", "seed", "metric", "value"])


def plism_slides() -> pd.DataFrame:
    rows = [(f"st{st}_sc{sc}", f"sc{sc}", f"st{st}") for st in range(2) for sc in range(3)]
    return pd.DataFrame(rows, columns=["slide_id", "scanner", "staining"])


class Tables(HTMLParser):
    """Every <table> of a page as rows of cell texts (entities decoded), header row first."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def find_table(page: str, header: str) -> pd.DataFrame:
    parser = Tables()
    parser.feed(page)
    for t in parser.tables:
        if header in t[0]:
            return pd.DataFrame(t[1:], columns=t[0])
    raise AssertionError(f"no table with column {header!r}")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    rng = np.random.default_rng(0)
    tissue = rng.normal(size=(30, 16))
    slides = plism_slides()
    scores: dict[str, dict[str, str]] = {"plism": {}, "hest": {}, "probe": {}}
    for name, noise in ((BETA, 0.5), (GAMMA, 1.5)):  # ALPHA has no PLISM scores
        feats = tissue[None] + noise * rng.normal(size=(len(slides), 30, 16))
        path = tmp / f"plism_{len(scores['plism'])}.parquet"
        score_plism(feats, slides, path, model=name)
        scores["plism"][name] = str(path)
    for i, (name, folds) in enumerate(HEST.items()):
        scores["hest"][name] = write_tidy(hest_rows(folds), tmp / f"hest_{i}.parquet", benchmark="hest")
    for i, (name, tasks) in enumerate(PROBE.items()):
        scores["probe"][name] = write_tidy(probe_rows(tasks), tmp / f"probe_{i}.parquet", benchmark="probe")
    out = tmp / "out"
    board = build_report(scores, out, models=MODELS, config=CONFIG, title="Bench <&> report")
    return board, out, scores


def test_leaderboard_matches_hand_computation(report):
    board, out, scores = report
    assert board["model"].tolist() == [ALPHA, BETA, GAMMA]  # `models` order, then new names from scores
    row = board.set_index("model")
    for name in (BETA, GAMMA):
        raw = pd.read_parquet(scores["plism"][name])

        def median(group, metric, raw=raw):
            hit = raw[raw["metric"] == metric]
            return float((hit if group == "all" else hit[hit["group"] == group])["value"].median())

        medians = [median("all", "cosine")]
        medians += [
            median(g, "top_10") for g in ("inter_scanner", "inter_staining", "inter_scanner_staining")
        ]
        assert row.loc[name, "plism_leaderboard"] == pytest.approx(np.mean(medians), abs=1e-12)
        assert row.loc[name, "plism_cosine_median"] == pytest.approx(medians[0], abs=1e-12)
        assert row.loc[name, "plism_top10_inter_staining"] == pytest.approx(medians[2], abs=1e-12)
    assert row.loc[BETA, "plism_leaderboard"] > row.loc[GAMMA, "plism_leaderboard"]  # less noise, more robust
    # HEST: mean over tasks of the mean over folds.
    assert row.loc[ALPHA, "hest_pearson_mean"] == pytest.approx((0.35 + 0.3) / 2)
    assert row.loc[GAMMA, "hest_pearson_mean"] == pytest.approx((0.6 + 0.2) / 2)
    # Probe: mean over tasks of the mean over seeds, one column per method.
    assert row.loc[ALPHA, "probe_balanced_accuracy_linear"] == pytest.approx((0.82 + 0.65) / 2)
    assert row.loc[BETA, "probe_balanced_accuracy_knn"] == pytest.approx((0.65 + 0.45) / 2)
    # Size columns pass through; None becomes NaN.
    assert row.loc[ALPHA, "params_m"] == 86.6 and row.loc[ALPHA, "device"] == "cuda:0 (H100)"
    assert np.isnan(row.loc[BETA, "tiles_per_s"]) and np.isnan(row.loc[GAMMA, "gflops"])


def test_missing_scores_are_nan_and_dash(report):
    board, out, _ = report
    row = board.set_index("model")
    assert np.isnan(row.loc[ALPHA, "plism_leaderboard"])  # no PLISM file
    assert np.isnan(row.loc[BETA, "hest_pearson_mean"])  # no HEST file
    assert np.isnan(row.loc[GAMMA, "probe_balanced_accuracy_linear"])  # a task missing: no mean
    page = (out / "index.html").read_text()
    lead = find_table(page, "HEST Pearson r (mean over tasks)").set_index("model")
    assert lead.loc[ALPHA, "PLISM leaderboard"] == "\u2013"
    assert lead.loc[BETA, "HEST Pearson r (mean over tasks)"] == "\u2013"
    assert lead.loc[GAMMA, "HEST Pearson r (mean over tasks)"] == "0.400"
    hest = find_table(page, "task").set_index("task")  # per-task HEST table: BETA is a column of dashes
    assert hest.loc["t1", ALPHA] == "0.350 ± 0.050" and set(hest[BETA]) == {"\u2013"}
    probe = find_table(page, "method")
    bach = probe[(probe["task"] == "bach") & (probe["method"] == "linear")].iloc[0]
    assert bach[GAMMA] == "\u2013" and bach[ALPHA] == "0.650 ± 0.050"


def test_page_is_self_contained_and_escaped(report):
    _, out, _ = report
    page = (out / "index.html").read_text()
    for name in (ALPHA, BETA, GAMMA):
        assert (name.replace("<", "&lt;").replace(">", "&gt;")) in page
    assert "<b>beta</b>" not in page and "&lt;b&gt;beta&lt;/b&gt;" in page
    assert "<title>Bench &lt;&amp;&gt; report</title>" in page
    assert re.search(r"https?:", page) is None and "<script" not in page and "<link" not in page
    srcs = re.findall(r'src="([^"]*)"', page)
    pngs = sorted(p.name for p in (out / "figures").iterdir())
    assert pngs == [
        "hest_pearson.png",
        "plism_scanner_vs_staining.png",
        "plism_topk_vs_cosine.png",
        "probe_balanced_accuracy.png",
    ]
    assert len(srcs) == len(pngs) and all(s.startswith("data:image/png;base64,") for s in srcs)
    embedded = {base64.b64decode(s.split(",", 1)[1]) for s in srcs}
    assert embedded == {(out / "figures" / p).read_bytes() for p in pngs}
    assert config_hash(CONFIG) in page and "config: tiling.mpp" in page  # provenance: hash, a chosen key


def test_outputs_are_complete_and_leave_no_temp_files(report):
    board, out, _ = report
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert not [n for n in names if any(part.startswith(".") for part in n.split("/"))]
    assert {"index.html", "leaderboard.parquet", "figures"} <= set(names)
    table = pq.read_table(out / "leaderboard.parquet")
    pd.testing.assert_frame_equal(table.to_pandas(), board)
    meta = json.loads(table.schema.metadata[b"histodistill"])
    assert meta["params"]["config_hash"] == config_hash(CONFIG)
    assert meta["params"]["inputs"]["hest"][ALPHA] is not None  # the input's own config hash


def _color_present(png: bytes, hex_color: str) -> bool:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    want = np.array([int(hex_color[i : i + 2], 16) for i in (1, 3, 5)])
    return bool((np.abs(rgb - want).max(axis=-1) <= 2).sum() >= 10)


def test_each_model_keeps_its_color_across_figures(report):
    _, out, _ = report
    colors = model_colors([ALPHA, BETA, GAMMA])
    assert len(set(colors.values())) == 3
    figs = {p.stem: p.read_bytes() for p in (out / "figures").iterdir()}
    present = {  # ALPHA is absent from PLISM, BETA from HEST: a later model must not take their colour
        "plism_topk_vs_cosine": (BETA, GAMMA),
        "hest_pearson": (ALPHA, GAMMA),
        "probe_balanced_accuracy": (ALPHA, BETA, GAMMA),
    }
    for fig, shown in present.items():
        for model in (ALPHA, BETA, GAMMA):
            assert _color_present(figs[fig], colors[model]) == (model in shown), (fig, model)


def test_n_boot_sets_the_plism_bootstrap(report, tmp_path, monkeypatch):
    """benchmarks.plism.n_boot reaches the PLISM CIs: the replicates drawn, the CIs, the provenance."""
    import histodistill.bench.plism as plism_bench
    from histodistill.report import summarize_benchmarks

    drawn = []

    def spy(n_slides, n_boot, seed):
        drawn.append(n_boot)
        return resamples(n_slides, n_boot, seed)

    resamples = plism_bench.slide_resamples
    monkeypatch.setattr(plism_bench, "slide_resamples", spy)
    _, _, scores = report
    plism = {"plism": scores["plism"]}
    few = summarize_benchmarks(plism, n_boot=20)[0]["plism"]
    assert drawn == [20, 20]  # one draw per model, of n_boot replicates
    many = summarize_benchmarks(plism, n_boot=plism_bench.N_BOOT)[0]["plism"]
    assert drawn[2:] == [plism_bench.N_BOOT] * 2
    assert not np.allclose(few["median_ci_low"], many["median_ci_low"])
    none = summarize_benchmarks(plism, n_boot=0)[0]["plism"]
    assert none["median_ci_low"].isna().all() and len(drawn) == 4
    build_report(plism, tmp_path, n_boot=20)
    meta = json.loads(pq.read_schema(tmp_path / "leaderboard.parquet").metadata[b"histodistill"])
    assert meta["params"]["n_boot"] == 20 and drawn[4:] == [20, 20]


def test_mitosis_and_partial_inputs(tmp_path):
    # bench.mitosis's layout: settings (fraction, domains) beside method/protocol, replicates in `run`.
    rows = []
    for model, base in (("m1", 0.6), ("m2", 0.7)):
        for run in range(3):
            for fraction in (0.1, 1.0):
                rows.append(
                    (model, "lora", "scaling", fraction, "all", "all", run, "f1", base + fraction * run / 10)
                )
            rows.append((model, "frozen", "scaling", 1.0, "all", "all", run, "f1", base - 0.1))
            rows.append((model, "lora", "cross_domain", 1.0, "dogs", "cats", run, "f1", 0.2))
    columns = [
        "model",
        "method",
        "protocol",
        "fraction",
        "train_domain",
        "test_domain",
        "run",
        "metric",
        "value",
    ]
    both = write_tidy(pd.DataFrame(rows, columns=columns), tmp_path / "mitosis.parquet")  # one file, 2 models
    board = build_report({"mitosis": {"m1": both, "m2": both}}, tmp_path / "out", models={"m3": {}})
    row = board.set_index("model")
    # Headline = all the data (fraction 1.0), pooled domains: runs 0.6, 0.7, 0.8 for m1.
    assert row.loc["m1", "mitosis_lora_scaling_f1"] == pytest.approx(0.7)
    assert row.loc["m2", "mitosis_frozen_scaling_f1"] == pytest.approx(0.6)
    assert np.isnan(row.loc["m3", "mitosis_lora_scaling_f1"])
    assert not [c for c in board.columns if "cross_domain" in c]  # not a headline setting
    assert "plism_leaderboard" not in board.columns  # absent benchmarks add no columns
    page = (tmp_path / "out" / "index.html").read_text()
    headline = find_table(page, "protocol")
    lora = headline[(headline["method"] == "lora") & (headline["protocol"] == "scaling")].iloc[0]
    assert lora["m1"] == "0.700 ± 0.100" and lora["m3"] == "\u2013"
    full = find_table(page, "fraction")  # the breakdown by every setting
    small = full[(full["method"] == "lora") & (full["fraction"] == "0.1")].iloc[0]
    assert small["m1"] == "0.610 ± 0.010" and small["train_domain"] == "all"
    # the only figures are the mitosis benchmark's own (no PLISM, HEST or probe data here)
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").iterdir())
    assert figures and all(name.startswith("mitosis_") for name in figures)
    assert page.count("data:image/png") == len(figures)


def test_bad_inputs_name_the_item(tmp_path):
    with pytest.raises(ReportError, match=r"hest scores of model 'x'.*does not exist"):
        build_report({"hest": {"x": tmp_path / "nope.parquet"}}, tmp_path / "out")
    with pytest.raises(ReportError, match="unknown benchmark"):
        build_report({"plsm": {}}, tmp_path / "out")
    bad = write_tidy(pd.DataFrame({"task": ["a"], "value": [1.0]}), tmp_path / "bad.parquet")
    with pytest.raises(ReportError, match=r"probe scores of model 'y'.*lacks column"):
        build_report({"probe": {"y": bad}}, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_model_profile_counts_params_and_flops():
    tiny = model_profile("h0_mini_tiny")
    model = load_model("h0_mini_tiny", random_init=True).model
    assert tiny["params"] == sum(p.numel() for p in model.parameters())
    assert tiny["params_m"] == pytest.approx(tiny["params"] / 1e6) and tiny["gflops"] > 0
    small = model_profile("vit_s14_reg4")
    # By hand: 261 tokens (256 patches + CLS + 4 registers), width 384, 12 blocks; 2 FLOPs per multiply-add.
    t, d = 261, 384
    block = 2 * t * d * (3 * d + d + 4 * d + 4 * d) + 2 * (2 * t * t * d)  # qkv, proj, fc1, fc2; QKᵀ, AV
    patch_embed = 2 * 256 * d * (3 * 14 * 14)
    assert small["flops"] == 12 * block + patch_embed  # attention counted even on CPU (fused SDPA)
    assert small["gflops"] == pytest.approx(small["flops"] / 1e9)
    assert 21 < small["params_m"] < 23 and small["gflops"] > 50 * tiny["gflops"]
    assert torch.is_grad_enabled()  # counting left autograd as it was


def test_run_profiles_models_and_reads_throughput(tmp_path):
    stores = []
    busy = {
        "load_1min": 3.14,
        "cpus": 2,
        "torch_threads": 2,
        "num_workers": 0,
        "batch_size": 32,
        "tiles_timed": 96,
    }
    for model, rate in (("h0_mini_tiny", 120.0), ("student-r1", 900.0)):
        store = tmp_path / "emb" / model / "cohort.zarr"
        zarr.open_group(store, mode="w", zarr_format=3).attrs.update(
            {"complete": True, "tiles_per_s": rate, "throughput_device": "cpu"}
            | ({"throughput_conditions": busy} if model == "h0_mini_tiny" else {})
        )
        stores.append(store)
    (tmp_path / "hest").mkdir()
    files = [
        write_tidy(hest_rows(HEST[ALPHA]), tmp_path / "hest" / "h0_mini_tiny.parquet", benchmark="hest"),
        write_tidy(hest_rows(HEST[GAMMA]), tmp_path / "hest" / "student-r1.parquet", benchmark="hest"),
    ]
    models = ["h0_mini_tiny", "student-r1"]
    board = run_report(
        files,
        stores,
        tmp_path / "report",
        benchmarks=["hest", "probe"],
        models=models,
        students={"r1": "h0_mini_tiny"},
    ).set_index("model")
    size = model_profile("h0_mini_tiny")  # the student is profiled as its run's architecture
    assert board["params_m"].tolist() == pytest.approx([size["params_m"]] * 2)
    assert board["tiles_per_s"].tolist() == [120.0, 900.0] and board["device"].tolist() == ["cpu", "cpu"]
    assert board.loc["student-r1", "hest_pearson_mean"] == pytest.approx(np.mean([0.6, 0.2]))
    size_section = (tmp_path / "report" / "index.html").read_text().split('id="size"')[1]
    # the speed is shown with the load it was measured under; the other store recorded none
    assert "load 3.1 on 2 CPUs (BUSY), 2 torch threads, batch 32, 0 workers, 96 tiles" in size_section
    assert "measured under" in size_section
    with pytest.raises(ReportError, match="benchmark 'hest' is not one of"):
        run_report(files, stores, tmp_path / "r2", benchmarks=["probe"], models=models)
    with pytest.raises(ReportError, match="2 model"):
        run_report(files, stores[:1], tmp_path / "r2", benchmarks=["hest"], models=models)


def test_unmatched_cosine_by_hand():
    from histodistill.bench.plism import unmatched_cosine

    eye = np.eye(4, dtype=np.float32)  # four orthonormal tiles, identical in both slides
    assert unmatched_cosine(eye, eye, (0, 1)) == 0.0  # different tiles: orthogonal
    same = np.tile(np.array([[0.6, 0.8]], np.float32), (5, 1))  # every tile embedded alike
    assert unmatched_cosine(same, same, (0, 1)) == pytest.approx(1.0)
    with pytest.raises(Exception, match="at least 2 tiles"):
        unmatched_cosine(eye[:1], eye[:1], (0, 1))


def test_a_collapsed_model_is_flagged_and_never_bold(tmp_path):
    """A model that embeds every tile alike has the best matched cosine on PLISM, for the wrong reason."""
    rng = np.random.default_rng(0)
    slides = plism_slides()
    n, dim = 40, 16
    tissue = rng.normal(size=(n, dim))
    good = np.stack([tissue + 0.3 * rng.normal(size=(n, dim)) for _ in range(len(slides))])
    noisy = np.stack([tissue + 0.8 * rng.normal(size=(n, dim)) for _ in range(len(slides))])
    collapsed = np.ones((len(slides), n, dim)) + 0.01 * rng.normal(size=(len(slides), n, dim))
    scores = {}
    for name, feats in (("good", good), ("noisy", noisy), ("collapsed", collapsed)):
        scores[name] = tmp_path / f"{name}.parquet"
        score_plism(feats.astype(np.float32), slides, scores[name], model=name, top_k=(1, 10), unmatched=True)
    board = build_report({"plism": scores}, tmp_path / "report", n_boot=0).set_index("model")
    assert board.loc["collapsed", "plism_cosine_median"] > board.loc["good", "plism_cosine_median"]
    assert board.loc["collapsed", "plism_cosine_unmatched_median"] > 0.99
    assert board.loc["good", "plism_cosine_unmatched_median"] < 0.2
    assert board.loc["good", "status"] == board.loc["noisy", "status"] == "ok"
    assert board.loc["collapsed", "status"].startswith("collapsed / uninformative: PLISM")
    page = (tmp_path / "report" / "index.html").read_text()
    leaderboard = page.split('id="leaderboard"')[1].split("</table>")[0]
    rows = dict(re.findall(r'<tr><td class="key">([^<]*)</td>(.*?)</tr>', leaderboard))
    header = re.findall(r"<th[^>]*>([^<]*)</th>", leaderboard)
    column = header.index("PLISM cosine (median, all)") - 1  # cells after the model's
    cells = {m: re.findall(r"<td( class=\"best\")?>", row) for m, row in rows.items()}
    assert "best" not in " ".join(cells["collapsed"])  # never bold, in any column
    assert cells["good"][column] == ' class="best"'  # the best cosine among the unflagged models
    unmatched = header.index("PLISM cosine of different tiles (median, all)") - 1
    assert all(c[unmatched] == "" for c in cells.values())  # a diagnostic (lower is better): never bold


def test_a_model_whose_probes_are_at_chance_is_flagged_and_never_bold(tmp_path):
    """A probe at chance (its balanced accuracy within the null's reach of 1/K) marks the model collapsed /
    uninformative, even where it scores best in one column (here the linear probe)."""

    def rows(linear: float, knn: float) -> pd.DataFrame:
        out = [("crc", "linear", 0, "balanced_accuracy", linear), ("crc", "knn", 0, "balanced_accuracy", knn)]
        for method in ("linear", "knn"):  # two classes, null SE 0.05: at chance up to 0.5 + 0.082
            out += [("crc", method, 0, "chance_balanced_accuracy", 0.5)]
            out += [("crc", method, 0, "chance_balanced_accuracy_se", 0.05)]
        return pd.DataFrame(out, columns=["task", "method", "seed", "metric", "value"])

    scores = {
        "lucky": write_tidy(rows(0.58, 0.55), tmp_path / "lucky.parquet"),
        "informative": write_tidy(rows(0.57, 0.90), tmp_path / "informative.parquet"),
        "weaker": write_tidy(rows(0.56, 0.85), tmp_path / "weaker.parquet"),  # bold needs 2 counted models
    }
    board = build_report({"probe": scores}, tmp_path / "report", n_boot=0).set_index("model")
    assert board.loc["informative", "status"] == board.loc["weaker", "status"] == "ok"
    assert board.loc["lucky", "status"].startswith("collapsed / uninformative: probes at chance")
    assert (
        board.loc["lucky", "probe_balanced_accuracy_linear"]
        > board.loc["informative", "probe_balanced_accuracy_linear"]
    )
    page = (tmp_path / "report" / "index.html").read_text()
    leaderboard = page.split('id="leaderboard"')[1].split("</table>")[0]
    cells = {
        m: re.findall(r"<td( class=\"best\")?>", row)
        for m, row in re.findall(r'<tr><td class="key">([^<]*)</td>(.*?)</tr>', leaderboard)
    }
    assert "best" not in " ".join(cells["lucky"])
    assert cells["informative"].count(' class="best"') == 2  # both probe columns


def test_skipped_slides_are_listed_on_the_page_and_in_the_provenance(tmp_path):
    path = tmp_path / "a.parquet"
    write_tidy(hest_rows({"t1": [0.3, 0.4]}), path)
    skipped = [{"slide_id": "gone", "path": "/data/gone.svs"}]
    build_report({"hest": {ALPHA: path}}, tmp_path / "report", skipped_slides=skipped)
    page = (tmp_path / "report" / "index.html").read_text()
    assert "1 slide(s) of the sample sheet were skipped" in page
    assert find_table(page, "slide").set_index("slide").loc["gone", "path"] == "/data/gone.svs"
    board = pq.read_table(tmp_path / "report" / "leaderboard.parquet")
    assert json.loads(board.schema.metadata[b"histodistill"])["params"]["skipped_slides"] == skipped


def test_a_task_at_chance_for_every_model_flags_none_and_is_named(tmp_path):
    """When a probe task is at chance for every model scored (a task none of them can read), the task is
    uninformative, not the models: no model is flagged, and the leaderboard names the task."""

    def rows(linear: float) -> pd.DataFrame:
        out = [("crc", "linear", 0, "balanced_accuracy", linear)]
        out += [("crc", "linear", 0, "chance_balanced_accuracy", 0.5)]
        out += [("crc", "linear", 0, "chance_balanced_accuracy_se", 0.05)]  # at chance up to 0.582
        return pd.DataFrame(out, columns=["task", "method", "seed", "metric", "value"])

    scores = {m: write_tidy(rows(v), tmp_path / f"{m}.parquet") for m, v in (("a", 0.52), ("b", 0.55))}
    board = build_report({"probe": scores}, tmp_path / "report", n_boot=0).set_index("model")
    assert board["status"].tolist() == ["ok", "ok"]
    leaderboard = (tmp_path / "report" / "index.html").read_text().split('id="leaderboard"')[1]
    assert "Task uninformative, no model flagged by" in leaderboard.split("</section>")[0]
    # one model above chance makes the task informative again: the other is flagged
    scores["c"] = write_tidy(rows(0.80), tmp_path / "c.parquet")
    board = build_report({"probe": scores}, tmp_path / "report2", n_boot=0).set_index("model")
    assert board.loc["c", "status"] == "ok"
    assert board.loc["a", "status"].startswith("collapsed / uninformative: probes at chance")
    assert board.loc["b", "status"].startswith("collapsed / uninformative: probes at chance")
