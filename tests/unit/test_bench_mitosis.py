import ast
import dataclasses
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from skimage import measure

from histodistill.bench import BenchmarkError
from histodistill.bench import mitosis as M
from histodistill.bench.mitosis.data import slides_from_sheet, validate_annotations
from histodistill.bench.mitosis.linear import fit_logistic_regression, predict_linear, run_linear_protocol
from histodistill.bench.mitosis.lora import (
    SlidePatchSampler,
    _merge_lora,
    build_lora_classifier,
    predict_logits,
    run_lora_protocol,
    train_lora,
)
from histodistill.bench.mitosis.patches import PatchReader, iter_annotation_patches, pack_patch_store
from histodistill.bench.mitosis.protocol import protocol_splits, settings_params
from histodistill.bench.mitosis.results import prediction_frame, score_predictions
from histodistill.bench.mitosis.splits import (
    Split,
    _splits_frame,
    _splits_from_frame,
    annotation_seeded_splits,
    cross_domain_splits,
    scaling_splits,
)
from histodistill.config import read_sample_sheet
from histodistill.demo.mitosis import MitosisDemoConfig, make_mitosis_demo
from histodistill.demo.slides import write_pyramid_tiff
from histodistill.embed import EmbeddingStore, extract_embeddings
from histodistill.errors import SlideError
from histodistill.models import load_model
from histodistill.models.registry import LoadedModel
from histodistill.models.transforms import ModelTransform, transform_batch
from histodistill.report.mitosis_figures import plot_cross_domain, plot_scaling
from histodistill.tilestore import TileStore

SMALL_DEMO = MitosisDemoConfig(
    1024, 768, levels=3, n_mitotic_figures=8, n_hard_negatives=8, min_spacing_um=32
)


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models on a shared CPU: OpenMP thread wake-ups cost more than the work, so use one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Two domains × three slides (one case each) with mitotic figures and hard negatives."""
    out = tmp_path_factory.mktemp("mitosis_demo")
    sheet, annotations = make_mitosis_demo(out, seed=0, n_slides_per_domain=3, spec=SMALL_DEMO)
    paths, mpps = slides_from_sheet(read_sample_sheet(sheet))
    return {
        "paths": paths,
        "mpps": mpps,
        "annotations": M.read_annotations(annotations, list(paths)),
        "sheet": sheet,
        "csv": annotations,
    }


def extract_patches(slide_path, points, patch_px=224, mpp=0.25, slide_mpp=None) -> np.ndarray:
    """The centred patches of one slide's points, through a PatchReader of that slide alone."""
    with PatchReader({"slide": slide_path}, {"slide": slide_mpp}, patch_px, mpp) as reader:
        return reader.read("slide", points)


@dataclasses.dataclass
class ArrayPatchSource:
    """In-memory patches drawn uniformly with replacement (a LoRA training source without slides)."""

    images: np.ndarray
    targets: np.ndarray

    def draw(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        idx = rng.integers(0, len(self.images), size=n)
        return self.images[idx], np.asarray(self.targets, np.float32)[idx]


def embed_store(model, store, out) -> np.ndarray:
    """Embeddings [N, D] of a patch store by the `embed` rule's library call (CPU, no workers)."""
    extract_embeddings(model, store, out, batch_size=4, num_workers=0, device="cpu")
    return EmbeddingStore(out).embeddings


def table(n_domains=3, cases_per_domain=6, seed=0):
    """An annotation table without slides: cases of different sizes, both labels in each case."""
    rng = np.random.default_rng(seed)
    rows = []
    for d in range(n_domains):
        for c in range(cases_per_domain):
            case = f"d{d}_c{c}"
            for i in range(int(rng.integers(4, 30))):
                label = M.MITOTIC_FIGURE if i % 3 == 0 else M.HARD_NEGATIVE
                rows.append((f"{case}_s{i % 2}", float(i), float(i), label, f"domain{d}", case))
    return validate_annotations(pd.DataFrame(rows, columns=list(M.ANNOTATION_COLUMNS)))


def cases(annotations, rows):
    return set(annotations["case"].to_numpy()[rows])


def tiny_model(name="h0_mini_tiny"):
    """A `_tiny` registry model with LayerScale at 1: at timm's init (1e-5) the blocks, and so any adapter
    in them, barely change the output, which would make the LoRA checks vacuous."""
    loaded = load_model(name, seed=0)
    for n, p in loaded.model.named_parameters():
        if n.endswith("gamma"):
            p.data.fill_(1.0)
    return loaded


# ----------------------------------------------------------------------------------------- annotations

HEADER = "slide_id,x,y,label,domain,case\n"


def test_labels_are_canonicalised(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text(
        HEADER
        + "s1,10,20,Mitotic Figure,d,c1\ns1,30,40,imposter,d,c1\ns2,5.5,6,1,d,c2\ns2,7,8,hard_negative,d,c2\n"
    )
    a = M.read_annotations(path, slide_ids=["s1", "s2"])
    assert a["label"].tolist() == [M.MITOTIC_FIGURE, M.HARD_NEGATIVE, M.MITOTIC_FIGURE, M.HARD_NEGATIVE]
    assert a["target"].tolist() == [1, 0, 1, 0]
    assert a["x"].tolist() == [10.0, 30.0, 5.5, 7.0]


@pytest.mark.parametrize(
    "body, slide_ids, message",
    [
        ("slide_id,x,y,label,domain\ns1,1,2,mitosis,d\n", None, "missing column(s) ['case']"),
        (HEADER, None, "no annotations"),
        (HEADER + "s1,1,2,mitosis,d,c\ns1,3,4,tumour,d,c\n", None, "line 3 (slide 's1') has label 'tumour'"),
        (HEADER + "s1,-1,2,mitosis,d,c\n", None, "line 2 (slide 's1') has x = '-1'"),
        (HEADER + "s1,1,abc,mitosis,d,c\n", None, "line 2 (slide 's1') has y = 'abc'"),
        (HEADER + "s1,1,2,mitosis,,c\n", None, "line 2 has an empty domain"),
        (HEADER + "s1,1,2,mitosis,d,c\ns9,1,2,mitosis,d,c\n", ["s1"], "line 3 refers to slide 's9'"),
        (
            HEADER + "s1,1,2,mitosis,d1,c\ns2,1,2,mitosis,d2,c\n",
            None,
            "case 'c' belongs to more than one domain",
        ),
        (
            HEADER + "s1,1,2,mitosis,d,c1\ns1,5,2,mitosis,d,c2\n",
            None,
            "slide_id 's1' belongs to more than one case",
        ),
        (HEADER + "s1,1,2,mitosis,d,c\ns1,3,3,mitosis,d,c\ns1,1,2,imposter,d,c\n", None, "line 2 and line 4"),
    ],
)
def test_annotation_errors_name_the_offending_row(tmp_path, body, slide_ids, message):
    path = tmp_path / "bad.csv"
    path.write_text(body)
    with pytest.raises(BenchmarkError) as err:
        M.read_annotations(path, slide_ids)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_annotation_file(tmp_path):
    with pytest.raises(BenchmarkError, match="does not exist"):
        M.read_annotations(tmp_path / "none.csv")


# ----------------------------------------------------------------------------------------- patches


@pytest.fixture(scope="module")
def marked_slide(tmp_path_factory):
    """White slide at 0.25 µm/px with one dark 9×9 px square centred on (601, 403)."""
    pixels = np.full((768, 1024, 3), 240, np.uint8)
    pixels[399:408, 597:606] = 20
    path = tmp_path_factory.mktemp("marked") / "marked.tiff"
    write_pyramid_tiff(pixels, path, mpp=0.25, levels=3)
    return path


@pytest.mark.parametrize("mpp", [0.25, 0.5, 0.4])  # level 0 as is, level 1 as is, level 0 resized
def test_patches_are_centered_on_the_point(marked_slide, mpp):
    patches = extract_patches(marked_slide, np.array([[601, 403], [100, 100]]), patch_px=64, mpp=mpp)
    assert patches.shape == (2, 64, 64, 3) and patches.dtype == np.uint8
    weight = 255.0 - patches[0].mean(-1)
    weight[weight < 60] = 0
    ys, xs = np.mgrid[0:64, 0:64]
    cy, cx = (weight * ys).sum() / weight.sum(), (weight * xs).sum() / weight.sum()
    assert abs(cx - 32) <= 1.0 and abs(cy - 32) <= 1.0, (cx, cy)
    side = 9 * 0.25 / mpp  # the square's size in patch pixels follows the physical scale
    assert abs((weight > 0).sum() ** 0.5 - side) <= 2.5
    assert patches[1].min() > 200  # the other point is on blank glass


def test_patch_errors(marked_slide):
    with pytest.raises(BenchmarkError, match=r"point \(2000, 5\) lies outside the slide"):
        extract_patches(marked_slide, np.array([[2000, 5]]), patch_px=32)
    with pytest.raises(SlideError, match="coarser than the benchmark's 0.1"):
        extract_patches(marked_slide, np.array([[10, 10]]), patch_px=32, mpp=0.1)
    # an explicit slide µm/px (sample-sheet override) changes the footprint: 0.5 µm/px → half as many px
    a = extract_patches(marked_slide, np.array([[601, 403]]), patch_px=64, mpp=0.5, slide_mpp=0.5)
    assert (a[0].mean(-1) < 100).sum() == 81  # the 9×9 square, read at level 0 without resizing


def test_demo_has_domains_labels_and_visible_figures(demo):
    a = demo["annotations"]
    assert sorted(a["domain"].unique()) == ["scanner_a", "scanner_b"]
    assert (a.groupby("slide_id")["label"].nunique() == 2).all()
    patches, order = [], []
    with PatchReader(demo["paths"], demo["mpps"], patch_px=128) as reader:
        for rows, p in iter_annotation_patches(reader, a, np.arange(len(a))):
            patches.append(p)
            order.append(rows)
    patches, order = np.concatenate(patches), np.concatenate(order)
    gray = patches.mean(-1)
    center, typical = gray[:, 56:72, 56:72].min((1, 2)), np.median(gray, axis=(1, 2))
    assert (center < typical - 60).mean() > 0.95  # a dark figure sits on (almost) every annotated point
    domain = a["domain"].to_numpy()[order]
    color = {d: patches[domain == d].reshape(-1, 3).mean(0) for d in ("scanner_a", "scanner_b")}
    assert np.abs(color["scanner_a"] - color["scanner_b"]).max() > 8  # visibly different domains


# ----------------------------------------------------------------------------------------- splits


def test_scaling_splits_never_leak_cases_and_keep_the_test_split_fixed():
    a = table()
    splits = scaling_splits(a, fractions=(1.0, 0.1, 0.01, 0.001), n_val_splits=5, seed=3)
    assert len(splits) == 5 * 4
    test = splits[0].tests[M.ALL]
    assert 0.12 < len(test) / len(a) < 0.35
    assert cases(a, test) and set(a["domain"].to_numpy()[test]) == set(a["domain"])  # every domain tested
    val_sets = set()
    for s in splits:
        np.testing.assert_array_equal(s.tests[M.ALL], test)
        tr, va = cases(a, s.train), cases(a, s.val)
        assert not tr & cases(a, test) and not va & cases(a, test) and not tr & va, (s.run, s.fraction)
        assert set(a["target"].to_numpy()[s.train]) == {0, 1}
        if s.fraction == 1.0:
            full = np.sort(np.concatenate([s.train, s.val, test]))
            np.testing.assert_array_equal(full, np.arange(len(a)))
            val_sets.add(tuple(s.val))
    assert len(val_sets) == 5  # five different Monte-Carlo validation splits
    for run in range(5):
        mine = sorted((s for s in splits if s.run == run), key=lambda s: s.fraction)
        assert [s.fraction for s in mine] == [0.001, 0.01, 0.1, 1.0]
        for small, large in zip(mine, mine[1:], strict=False):
            assert set(small.train) <= set(large.train) and set(small.val) <= set(large.val)
            assert len(small.train) <= len(large.train)
        assert len(mine[-1].train) > 4 * len(mine[1].train)


def test_scaling_splits_are_reproducible_and_round_trip():
    a = table(seed=1)
    one, two = scaling_splits(a, seed=7), scaling_splits(a, seed=7)
    other = scaling_splits(a, seed=8)
    frame = _splits_frame(one)
    pd.testing.assert_frame_equal(frame, _splits_frame(two))
    assert not frame.equals(_splits_frame(other))
    back = _splits_from_frame(frame)
    assert len(back) == len(one)
    for x, y in zip(one, back, strict=True):
        assert (x.protocol, x.run, x.fraction, x.train_domain) == (
            y.protocol,
            y.run,
            y.fraction,
            y.train_domain,
        )
        np.testing.assert_array_equal(x.train, y.train)
        np.testing.assert_array_equal(x.tests[M.ALL], y.tests[M.ALL])


def test_annotation_seeded_splits_are_the_authors_draws_and_leak_no_annotation():
    a = table(seed=2)
    n = len(a)
    splits = annotation_seeded_splits(a, fractions=(0.001, 0.01, 0.1, 1.0), seeds=(42, 43))
    # linear_probing.py, written out: one generator per seed; test, then per fraction a draw and its 80%
    want = []
    for seed in (42, 43):
        rng = np.random.default_rng(seed)
        test = rng.choice(n, size=int(np.floor(n * 0.2)), replace=False)
        pool = np.setdiff1d(np.arange(n), test)
        for fraction in (0.001, 0.01, 0.1, 1.0):
            size = int(np.floor(len(pool) * fraction))
            if size == 0:
                continue
            draw = rng.choice(pool, size=size, replace=False)
            keep = int(0.8 * size)
            fit = rng.choice(draw, size=keep, replace=False) if keep else draw
            want.append((seed, fraction, np.sort(test), np.sort(fit), np.setdiff1d(draw, fit)))
    kept = [w for w in want if len(set(a["target"].to_numpy()[w[3]])) == 2]
    assert len(kept) == len(splits) and len(splits) >= 4  # 0.1% draws nothing at this size
    tests = set()
    for s, (seed, fraction, test, fit, rest) in zip(splits, kept, strict=True):
        assert (s.run, s.fraction, s.fit_val) == ((42, 43).index(seed), fraction, False)
        np.testing.assert_array_equal(s.tests[M.ALL], test)
        np.testing.assert_array_equal(s.train, fit)
        np.testing.assert_array_equal(s.val, rest)
        # no annotation in two of train, validation, test
        assert not set(s.train) & set(s.tests[M.ALL]) and not set(s.val) & set(s.tests[M.ALL])
        assert not set(s.train) & set(s.val)
        if fraction == 1.0:
            assert len(s.train) == int(0.8 * (n - len(test)))
        tests.add(tuple(s.tests[M.ALL]))
    assert len(tests) == 2  # a test draw per seed
    assert cases(a, splits[-1].train) & cases(
        a, splits[-1].tests[M.ALL]
    )  # cases do cross: why it is not the default
    back = _splits_from_frame(_splits_frame(splits))
    assert [b.fit_val for b in back] == [False] * len(splits)


def test_annotation_seeded_linear_probe_fits_on_the_80_percent_only():
    a = table(seed=4)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(len(a), 8)) + a["target"].to_numpy()[:, None]
    split = annotation_seeded_splits(a, fractions=(1.0,), seeds=(42,))[0]
    pred = predict_linear(x, a, split, "m")
    assert set(pred["n_train"]) == {len(split.train)} and len(split.val) > 0
    case_split = scaling_splits(a, fractions=(1.0,), n_val_splits=1)[0]
    assert set(predict_linear(x, a, case_split, "m")["n_train"]) == {
        len(case_split.train) + len(case_split.val)
    }
    config = M.MitosisConfig.from_config(
        {"split": "annotation_seeded", "split_seeds": [1, 2], "cross_domain": False}
    )
    assert config.split_seeds == (1, 2)
    splits = protocol_splits(a, config)
    assert {s.run for s in splits} == {0, 1} and not any(s.fit_val for s in splits)
    assert all(s.fit_val for s in protocol_splits(a, M.MitosisConfig(cross_domain=False)))  # default: case
    with pytest.raises(BenchmarkError, match="split 'slide' is not one of"):
        M.MitosisConfig(split="slide")


def test_split_errors():
    a = table(n_domains=1, cases_per_domain=1)
    with pytest.raises(BenchmarkError, match="no domain has two cases"):
        scaling_splits(a)
    with pytest.raises(BenchmarkError, match="fractions must lie in"):
        scaling_splits(table(), fractions=(0.0, 1.0))
    with pytest.raises(BenchmarkError, match="needs ≥ 2 domains"):
        cross_domain_splits(table(n_domains=1))
    with pytest.raises(BenchmarkError, match="domain 'domain1' has 2 case"):
        small = table(n_domains=2)
        small = small[~small["case"].isin([f"d1_c{i}" for i in range(2, 6)])].reset_index(drop=True)
        cross_domain_splits(small)


def test_cross_domain_splits_hold_out_cases_and_give_an_n_by_n_matrix(tmp_path):
    a = table(n_domains=3)
    splits = cross_domain_splits(a, n_runs=2, seed=0)
    assert len(splits) == 2 * 3
    domain = a["domain"].to_numpy()
    for s in splits:
        assert set(domain[s.train]) == {s.train_domain} == set(domain[s.val])
        assert sorted(s.tests) == ["domain0", "domain1", "domain2"]
        holdout = s.tests[s.train_domain]
        assert not cases(a, holdout) & (cases(a, s.train) | cases(a, s.val)) and not cases(
            a, s.train
        ) & cases(a, s.val)
        for d, rows in s.tests.items():
            if d != s.train_domain:
                np.testing.assert_array_equal(rows, np.flatnonzero(domain == d))
    # fake predictions: the better the score, the closer train and test domain
    predictions = []
    rng = np.random.default_rng(0)
    for s in splits:
        for d, rows in s.tests.items():
            t = a["target"].to_numpy()[rows]
            noise = 0.3 if d == s.train_domain else 1.5
            p = 1 / (1 + np.exp(-(2 * t - 1) * 2 + rng.normal(0, noise, len(t))))
            predictions.append(prediction_frame("m", "lora", s, d, rows, t, p, len(s.train)))
    rows = score_predictions(pd.concat(predictions))
    matrix = M.cross_domain_matrix(rows, "m", "lora")
    assert matrix.shape == (3, 3) and not matrix.isna().any().any()
    assert list(matrix.index) == list(matrix.columns) == ["domain0", "domain1", "domain2"]
    assert (np.diag(matrix) > matrix.to_numpy()[~np.eye(3, dtype=bool)].reshape(3, 2).max(1)).all()
    summary = M.summarize(rows)
    assert summary.loc[summary.metric == "auroc", "n"].eq(2).all()
    plot_cross_domain(summary, tmp_path / "cross.png")
    assert (tmp_path / "cross.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------- metrics


def test_metrics_and_summary_on_a_hand_case():
    s = Split(M.SCALING, 0, np.arange(3), np.arange(0), {M.ALL: np.arange(5)}, 0.1)
    pred = prediction_frame(
        "m", "linear_probe", s, M.ALL, np.arange(5), [1, 1, 0, 0, 0], [0.9, 0.4, 0.6, 0.2, 0.1], 3
    )
    rows = score_predictions(pred)
    assert list(rows.columns) == M.ROW_COLUMNS
    got = dict(zip(rows["metric"], rows["value"], strict=True))
    # predictions at 0.5: [1, 0, 1, 0, 0]; recalls 1/2 and 2/3; F1 per class 0.5 (n=2) and 2/3 (n=3)
    assert got["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert got["f1_weighted"] == pytest.approx((2 * 0.5 + 3 * 2 / 3) / 5)
    assert got["auroc"] == pytest.approx(5 / 6)  # 5 of 6 positive/negative pairs ranked right
    assert got["n_train"] == 3
    two = pd.concat([rows, rows.assign(run=1, value=rows["value"] + 0.2)])
    summary = M.summarize(two).set_index("metric")
    assert summary.loc["auroc", "mean"] == pytest.approx(5 / 6 + 0.1)
    assert summary.loc["auroc", "std"] == pytest.approx(0.2 / 2**0.5)  # sample std, ddof = 1
    assert summary.loc["auroc", "n"] == 2


def test_logistic_regression_follows_the_published_objective():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (120, 64)).astype(np.float32)
    y = np.repeat([0, 1], 60)
    x[:, :8] += 0.5 * (2 * y[:, None] - 1)
    predict = fit_logistic_regression(x, y)
    assert predict.C == pytest.approx(64 * 2 / 100)
    assert ((predict(x)[:, 1] > 0.5) == y).mean() > 0.9

    def objective(w, b):  # mean cross-entropy + (1/C)·0.5·‖W‖₂ (UNI / Ammeling et al.)
        logits = torch.as_tensor(x) @ w.T + b
        return float(
            torch.nn.functional.cross_entropy(logits, torch.as_tensor(y)) + 0.5 / predict.C * w.norm()
        )

    w, b = predict.head.weight.detach(), predict.head.bias.detach()
    best = objective(w, b)
    for _ in range(20):
        assert best <= objective(w + 0.01 * torch.randn_like(w), b + 0.01 * torch.randn_like(b)) + 1e-6
    assert best < objective(torch.zeros_like(w), torch.zeros_like(b))
    sk = fit_logistic_regression(x, y, implementation="sklearn")
    assert ((sk(x)[:, 1] > 0.5) == y).mean() > 0.9
    with pytest.raises(BenchmarkError, match="K ≥ 2"):
        fit_logistic_regression(x, np.zeros(len(x), int))


_YY, _XX = np.mgrid[0:224, 0:224]
_RING = (np.hypot(_XX - 111.5, _YY - 111.5) > 12) & (np.hypot(_XX - 111.5, _YY - 111.5) < 36)  # 3–9 µm


def handcrafted(patches: np.ndarray) -> np.ndarray:
    """Features [N, 8] a mitosis model should learn: darkness, count and shape of the central dark objects,
    and the brightness and red–blue balance of the ring around them (a mitotic figure's cleared halo, a
    hard negative's hypereosinophilic cytoplasm; see histodistill.demo.mitosis)."""
    out = []
    for p in patches.astype(np.float32):
        gray = p.mean(-1)
        med = np.median(gray)
        center = gray[80:144, 80:144]
        dark = center < 0.55 * med
        labels = measure.label(dark)
        props = max(measure.regionprops(labels), key=lambda r: r.area, default=None)
        shape = [props.solidity, props.eccentricity, props.perimeter**2 / props.area] if props else [1, 0, 0]
        ring = [gray[_RING].mean() / med, (p[..., 0] - p[..., 2])[_RING].mean() / med]
        out.append([dark.mean(), center.min() / 255, *shape, labels.max(), *ring])
    return np.asarray(out, np.float32)


def test_informative_features_beat_random_features_on_the_demo(demo):
    a = demo["annotations"]
    with PatchReader(demo["paths"], demo["mpps"]) as reader:
        feats = np.zeros((len(a), 8), np.float32)
        for rows, patches in iter_annotation_patches(reader, a, np.arange(len(a))):
            feats[rows] = handcrafted(patches)
    # z-scored (label-free statistics), then ×10: the protocol's norm penalty 0.5/C = 50/(D·K) is set for
    # embeddings of D ≈ 10³; at unit variance its subgradient radius (3.1 for D = 8) exceeds the data term's
    # gradient at W = 0, so the optimum is W = 0 (AUROC 0.5); unscaled, only the wide perimeter²/area escapes it.
    feats = 10 * (feats - feats.mean(0)) / feats.std(0)
    noise = np.random.default_rng(0).normal(size=(len(a), 64)).astype(np.float32)
    splits = scaling_splits(a, fractions=(0.1, 1.0), n_val_splits=3, seed=0)
    scores = {}
    for name, x in (("informative", feats), ("random", noise)):
        summary = M.summarize(run_linear_protocol(x, a, splits, name))
        scores[name] = summary[(summary.metric == "auroc") & (summary.fraction == 1.0)]["mean"].item()
        bacc = summary[(summary.metric == "balanced_accuracy") & (summary.fraction == 1.0)]
        if name == "informative":
            assert bacc["mean"].item() > 0.8
            # train ∪ val is the whole pool: runs agree at 100% (up to the summary's float rounding)
            assert bacc["std"].item() == pytest.approx(0.0, abs=1e-9)
    # 31 test annotations: the AUROC's standard error is ~0.05, so the bar leaves it room (seeds 0–6: ≥ 0.88)
    assert scores["informative"] > 0.85 and scores["informative"] > scores["random"] + 0.25, scores
    matrix = M.cross_domain_matrix(
        run_linear_protocol(feats, a, cross_domain_splits(a, n_runs=1), "informative"),
        "informative",
        "linear_probe",
    )
    assert matrix.shape == (2, 2) and (matrix.to_numpy() > 0.75).all()


def test_embeddings_follow_the_registered_pooling(demo, tmp_path):
    a = demo["annotations"].iloc[:6].reset_index(drop=True)
    a.drop(columns="target").to_csv(tmp_path / "six.csv", index=False)
    pack_patch_store(demo["sheet"], tmp_path / "six.csv", tmp_path / "six.zarr")
    cls = embed_store("h0_mini_tiny", tmp_path / "six.zarr", tmp_path / "h0.zarr")
    both = embed_store("virchow2_tiny", tmp_path / "six.zarr", tmp_path / "v2.zarr")
    assert cls.shape == (6, 64) and both.shape == (6, 128)  # virchow2 registers CLS ⊕ mean patch token
    assert np.isfinite(cls).all() and np.abs(both[:, 64:]).sum() > 0


def test_run_scores_the_linear_probe_on_the_embedded_patch_store(demo, tmp_path):
    a = demo["annotations"]
    n = pack_patch_store(demo["sheet"], demo["csv"], tmp_path / "patches.zarr", patch_px=224, mpp=0.25)
    store = TileStore(tmp_path / "patches.zarr")
    assert n == len(store) == len(a) and store.attrs["tile_px"] == 224 and store.attrs["mpp"] == 0.25
    np.testing.assert_array_equal(store.index["tile_id"], np.arange(len(a)))  # row i = annotation i
    assert store.index["slide_id"].tolist() == a["slide_id"].tolist()
    with PatchReader(demo["paths"], demo["mpps"]) as reader:
        rows = np.array([0, len(a) // 2, len(a) - 1])
        for row, patch in zip(rows, store.tiles.oindex[rows], strict=True):
            x, y = a.loc[row, ["x", "y"]]
            np.testing.assert_array_equal(patch, reader.read(a.loc[row, "slide_id"], np.array([[x, y]]))[0])
    features = embed_store("h0_mini_tiny", tmp_path / "patches.zarr", tmp_path / "h0.zarr")
    config = M.MitosisConfig.from_config(
        {"enabled": True, "demo": True, "methods": ["linear"], "fractions": [1.0], "n_val_splits": 2}
    )
    assert config.cross_domain_runs == 5 and config.lora == M.LoraFinetuneConfig()
    out = tmp_path / "h0.parquet"
    rows = M.run(
        "h0_mini_tiny", demo["sheet"], demo["csv"], out, config, embeddings=tmp_path / "h0.zarr", seed=3
    )
    splits = protocol_splits(a, config, seed=3)
    assert {s.protocol for s in splits} == {M.SCALING, M.CROSS_DOMAIN}
    pd.testing.assert_frame_equal(rows, run_linear_protocol(features, a, splits, "h0_mini_tiny"))
    back, meta = M.read_results(out)
    pd.testing.assert_frame_equal(back, rows)
    assert meta["benchmark"] == "mitosis" and meta["seed"] == 3 and meta["params"]["methods"] == ["linear"]
    assert (
        meta["embeddings_config_hash"]
        == EmbeddingStore(tmp_path / "h0.zarr").attrs["provenance"]["config_hash"]
    )


def test_run_errors(demo, tmp_path):
    a = demo["annotations"]
    a.iloc[:6].drop(columns="target").to_csv(tmp_path / "six.csv", index=False)
    pack_patch_store(demo["sheet"], tmp_path / "six.csv", tmp_path / "six.zarr")
    embed_store("h0_mini_tiny", tmp_path / "six.zarr", tmp_path / "six_h0.zarr")
    linear = M.MitosisConfig(methods=("linear",), fractions=(1.0,), n_val_splits=1, cross_domain=False)
    with pytest.raises(BenchmarkError, match=f"hold 6 rows that are not the {len(a)} annotations in order"):
        M.run("m", demo["sheet"], demo["csv"], tmp_path / "r.parquet", linear, tmp_path / "six_h0.zarr")
    with pytest.raises(BenchmarkError, match="needs the embeddings of the mitosis patch store"):
        M.run("m", demo["sheet"], demo["csv"], tmp_path / "r.parquet", linear)
    lora = dataclasses.replace(linear, methods=("lora",))
    with pytest.raises(BenchmarkError, match="give the student's checkpoint"):
        M.run("student-demo", demo["sheet"], demo["csv"], tmp_path / "r.parquet", lora)
    with pytest.raises(BenchmarkError, match="non-empty subset"):
        M.run(
            "m", demo["sheet"], demo["csv"], tmp_path / "r.parquet", dataclasses.replace(linear, methods=())
        )
    with pytest.raises(BenchmarkError, match=r"unknown setting\(s\) \['epoch'\] for LoraFinetuneConfig"):
        M.MitosisConfig.from_config({"lora": {"epoch": 2}})
    assert not (tmp_path / "r.parquet").exists()


@pytest.mark.parametrize("name", ["h0_mini_tiny", "prov_gigapath_tiny"])  # plain; resize 256 → crop 224
def test_batched_transform_equals_the_models_own(name):
    transform = ModelTransform(load_model(name).spec.transform)
    patches = np.random.default_rng(0).integers(0, 256, (3, 200, 200, 3), dtype=np.uint8)
    torch.testing.assert_close(
        transform_batch(transform, patches), torch.stack([transform(p) for p in patches])
    )


# ----------------------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("name", ["h0_mini_tiny", "h_optimus_0_tiny"])  # SwiGLU-packed and plain MLP blocks
def test_lora_adapts_only_the_named_layers(name):
    loaded = load_model(name)
    classifier = build_lora_classifier(loaded, M.LoraFinetuneConfig(), seed=0)
    adapted = {
        n.removeprefix("base_model.model.").removesuffix(".lora_A")
        for n, _ in classifier.backbone.named_modules()
        if n.endswith("lora_A")
    }
    expected = {
        f"blocks.{i}.{layer}" for i in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    }
    assert adapted == expected
    trainable = {n for n, p in classifier.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"} | {
        f"backbone.base_model.model.{m}.lora_{ab}.default.weight" for m in expected for ab in "AB"
    }
    qkv = classifier.backbone.base_model.model.blocks[0].attn.qkv
    assert qkv.lora_A["default"].weight.shape == (16, 64) and qkv.scaling["default"] == 1.0  # r 16, alpha 16
    assert qkv.lora_dropout["default"].p == 0.1
    assert next(loaded.model.parameters()).requires_grad  # the registry's model is left untouched (a copy)


def test_merging_the_adapters_reproduces_the_adapted_outputs():
    loaded = tiny_model()
    classifier = build_lora_classifier(loaded, seed=0)
    torch.manual_seed(1)
    for n, p in classifier.named_parameters():
        if "lora_B" in n:  # B starts at 0 (a no-op adapter): give it weight so merging has work to do
            p.data.normal_(0, 0.05)
    classifier.eval()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        adapted = classifier(x)
        with classifier.backbone.disable_adapter():
            base = classifier(x)
        merged_model = _merge_lora(classifier).eval()
        merged = merged_model(x)
    assert (adapted - base).abs().max() > 0.05  # the adapters matter
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)  # fp32 merge W + B·A·(alpha/r)
    assert not any("lora" in n for n, _ in merged_model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(classifier(x), adapted)  # merging worked on a copy


def test_lora_training_lowers_the_loss_and_is_deterministic():
    # uni_tiny (dynamic image size) at 96 px: 36 patch tokens instead of 196, so the check runs in seconds
    loaded = tiny_model("uni_tiny")
    spec = dataclasses.replace(loaded.spec, transform=dataclasses.replace(loaded.spec.transform, size=96))
    loaded = LoadedModel(loaded.model, spec, loaded.weights, loaded.weights_digest)
    rng = np.random.default_rng(0)
    images = np.full((16, 96, 96, 3), 200, np.uint8) + rng.integers(0, 20, (16, 96, 96, 3), dtype=np.uint8)
    targets = np.arange(16) % 2
    images[targets == 1, 32:64, 32:64] = 30  # positives: a dark centre
    source = ArrayPatchSource(images, targets)

    def loss(classifier):  # eval-mode BCE over the whole set
        logits = predict_logits(classifier, images, torch.device("cpu"), None)
        return torch.nn.functional.binary_cross_entropy_with_logits(
            torch.as_tensor(logits), torch.as_tensor(targets, dtype=torch.float32)
        ).item()

    settings = M.LoraFinetuneConfig(
        max_lr=1e-2, batch_size=8, epochs=12, epoch_samples=16, device="cpu", threads=1
    )
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    classifier = build_lora_classifier(loaded, settings, 0)
    start = loss(classifier)
    fit = train_lora(classifier, source, images[:8], targets[:8], settings, 0)
    assert loss(fit.classifier) < 0.5 * start, (start, fit.history)
    history = fit.history
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    assert fit.best_val_loss == history["val_loss"].min() and fit.best_epoch == history["val_loss"].idxmin()
    assert history["lr"].iloc[-1] < 1e-3 * settings.max_lr  # one-cycle annealed to the end
    for n, p in loaded.model.named_parameters():
        torch.testing.assert_close(p, before[n])  # the backbone stays frozen
    short = dataclasses.replace(settings, epochs=1)
    runs = [
        train_lora(build_lora_classifier(loaded, short, 5), source, images[:4], targets[:4], short, 5)
        for _ in range(2)
    ]
    pd.testing.assert_frame_equal(runs[0].history, runs[1].history)


def test_sampler_draws_50_25_25_and_labels_by_content(demo):
    a = demo["annotations"]
    split = scaling_splits(a, fractions=(1.0,), n_val_splits=1)[0]
    # 112-px patches (28 µm): the 256 × 192 µm demo slides hold ~15 annotations each, and 224-px patches
    # around them (56 µm) leave ~1% of the tissue free for random patches (none on some slides).
    with PatchReader(demo["paths"], demo["mpps"], 112) as reader:
        sampler = SlidePatchSampler(a, split.train, reader)
        draws = sampler.draw_points(400, np.random.default_rng(0))
        share = draws["kind"].value_counts(normalize=True)
        assert abs(share[M.MITOTIC_FIGURE] - 0.5) < 0.07 and abs(share["random"] - 0.25) < 0.07
        assert (draws.loc[draws.kind == M.MITOTIC_FIGURE, "target"] == 1).all()
        assert (draws.loc[draws.kind == "random", "target"] == 0).all()
        half = reader.geometry(a["slide_id"].iloc[0]).footprint0 / 2
        train = a.iloc[split.train]
        for _, d in draws.iterrows():
            xy = train.loc[train.slide_id == d.slide_id, ["x", "y"]].to_numpy()
            nearest = np.abs(xy - [d.x, d.y]).max(1).min()
            assert (nearest > half) if d.kind == "random" else (nearest <= 0.1 * 2 * half + 1e-6)
        images, targets = sampler.draw(6, np.random.default_rng(1))
        assert images.shape == (6, 112, 112, 3) and set(targets) <= {0.0, 1.0}


def test_lora_protocol_end_to_end_on_the_demo(demo):
    a = demo["annotations"]
    full = scaling_splits(a, fractions=(1.0,), n_val_splits=1)[0]
    test = full.tests[M.ALL]
    few = np.concatenate([test[a["target"].to_numpy()[test] == t][:3] for t in (0, 1)])  # 3 of each label
    split = dataclasses.replace(full, tests={M.ALL: few})
    settings = M.LoraFinetuneConfig(
        batch_size=4, epochs=1, epoch_samples=4, val_samples=4, device="cpu", threads=1
    )
    with PatchReader(demo["paths"], demo["mpps"]) as reader:
        predictions = run_lora_protocol(
            tiny_model(), a, [split], reader, "h0_mini_tiny", settings, score=False
        )
    assert sorted(predictions["row"]) == sorted(split.tests[M.ALL])
    assert predictions["probability"].between(0, 1).all()
    rows = score_predictions(predictions)
    assert set(rows["metric"]) == {
        "balanced_accuracy",
        "f1_weighted",
        "auroc",
        "n_train",
        "chance_balanced_accuracy",
        "chance_balanced_accuracy_se",
    }
    assert set(rows["method"]) == {"lora"} and rows["value"].notna().all()


# ----------------------------------------------------------------------------------------- output


def test_results_round_trip_with_provenance_and_scaling_figure(tmp_path):
    a = table()
    x = np.random.default_rng(0).normal(size=(len(a), 4)) + a["target"].to_numpy()[:, None]
    rows = run_linear_protocol(x, a, scaling_splits(a, n_val_splits=2), "toy")
    meta = {"config_hash": "abc", "params": {"fractions": list(M.FRACTIONS)}}
    M.write_results(rows, tmp_path / "r.parquet", meta)
    back, got = M.read_results(tmp_path / "r.parquet")
    pd.testing.assert_frame_equal(back, rows)
    assert got == meta
    assert not list(tmp_path.glob(".*tmp*"))
    summary = M.summarize(rows)
    assert set(summary["fraction"]) == set(M.FRACTIONS)
    plot_scaling(summary, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    with pytest.raises(BenchmarkError, match="not a histodistill result file"):
        M.read_results(tmp_path / "plain.parquet")
    assert json.loads(json.dumps(settings_params(M.LoraFinetuneConfig())))["rank"] == 16


def test_a_linear_probe_at_chance_is_flagged_and_its_chance_rows_are_not_shown():
    """Random features carry nothing about mitotic figures: their linear probe is at chance and the report
    flags the model; informative features are not flagged. The chance rows stay out of the leaderboard."""
    from histodistill.bench.mitosis.report import BENCHMARK

    a = table()
    rng = np.random.default_rng(0)
    informative = rng.normal(size=(len(a), 64)) + a["target"].to_numpy()[:, None]  # C = D·K/100 = 1.28
    features = {"informative": informative, "random": rng.normal(size=(len(a), 64))}
    splits = scaling_splits(a, fractions=(1.0,), n_val_splits=1)
    summary = pd.concat(
        [
            BENCHMARK.summarize(run_linear_protocol(x, a, splits, m).drop(columns="model")).assign(model=m)
            for m, x in features.items()
        ],
        ignore_index=True,
    )
    flags = BENCHMARK.flags(summary, list(features))
    assert set(flags) == {"random"}, flags
    assert flags["random"].startswith("mitosis linear probe at chance (scaling: balanced accuracy")
    columns = BENCHMARK.headline(summary, list(features)).columns
    assert not [c for c in columns if "chance" in c] and any(c.endswith("balanced_accuracy") for c in columns)


def _top_level_imports(module: str) -> set[str]:
    """Modules imported at module level (not inside functions) by a histodistill module, transitively."""
    seen, todo, found = set(), [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        spec = importlib.util.find_spec(name)
        tree = ast.parse(Path(spec.origin).read_text())
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                found.add(n)
                if n.startswith("histodistill"):
                    todo.append(n)
    return found


def test_lora_side_needs_no_scikit_learn_at_import():
    """The GPU (torch) env pins peft but not scikit-learn: importing the module must not need it."""
    found = _top_level_imports("histodistill.bench.mitosis")
    assert not {n for n in found if n.split(".")[0] == "sklearn" or n == "histodistill.bench.probe"}
    assert "peft" not in found  # imported where LoRA is built (peft pulls transformers: seconds)
