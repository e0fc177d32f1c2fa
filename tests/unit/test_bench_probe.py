import math

import numpy as np
import pandas as pd
import pytest
import torch
import zarr
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from histodistill.bench import BenchmarkError
from histodistill.bench.chance import CHANCE_SE
from histodistill.bench.probe import (
    ABMIL,
    EVA_LINEAR,
    AbmilConfig,
    KnnConfig,
    LinearProbeConfig,
    at_chance,
    chance_metrics,
    classification_metrics,
    fit_logreg,
    fold_mean_chance_se,
    knn_proba,
    linear_config,
    load_manifest,
    probe_flags,
    run,
    run_abmil,
    run_probe,
    summarize,
    train_linear_probe,
    validate_split,
)
from histodistill.provenance import read_parquet

# First validation check at step 300: the head kept is then well past the first state that merely separates
# the validation tiles (EVA keeps the first best state; with 100 val tiles that can miss a test tile).
FAST = LinearProbeConfig(max_steps=600, eval_every=300, patience=None, seeds=(0, 1))


def blobs(n_per_split=(300, 100, 100), k=3, dim=16, spread=10.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, dim)) * spread
    n = sum(n_per_split)
    y = np.arange(n) % k
    x = centers[y] + rng.normal(size=(n, dim))
    split = np.repeat(["train", "val", "test"], n_per_split)
    return x, np.array(["tumour", "stroma", "normal"])[y], split


def test_separable_data_is_solved_by_every_probe():
    x, y, split = blobs()
    rows = run_probe(x, y, split, "sep", linear=FAST)
    bacc = rows[rows.metric == "balanced_accuracy"]
    assert set(bacc["method"]) == {"linear", "knn", "logreg"}
    assert (bacc["value"] == 1.0).all(), bacc
    assert (rows[rows.metric == "auroc"]["value"] == 1.0).all()
    assert list(rows.columns) == ["task", "method", "seed", "metric", "value"]
    assert sorted(rows[rows.method == "linear"]["seed"].unique()) == [0, 1]


def test_shuffled_labels_score_at_chance():
    x, y, split = blobs((600, 200, 400), spread=3.0, seed=1)
    y = np.random.default_rng(0).permutation(y)
    rows = run_probe(x, y, split, "shuf", linear=LinearProbeConfig(max_steps=200, eval_every=20, seeds=(0,)))
    for method, group in rows.groupby("method"):
        values = group.set_index("metric")["value"]
        assert abs(values["balanced_accuracy"] - 1 / 3) < 0.1, method
        assert abs(values["auroc"] - 0.5) < 0.1, method


def test_knn_by_hand():
    train = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0], [2.0, 0.2]])
    labels = np.array([0, 1, 1, 0, 0])
    query = np.array([[2.0, 1.0]])
    # cosine similarities to the query (2, 1)/√5, by hand:
    cos = np.array(
        [2 / math.sqrt(5), 1 / math.sqrt(5), 3 / math.sqrt(10), -2 / math.sqrt(5), 4.2 / math.sqrt(5 * 4.04)]
    )
    # nearest first: point 2 (class 1), 4 (class 0), 0 (class 0), 1 (class 1), 3 (class 0)
    w = np.exp(cos / 0.07)
    expected_class1 = {
        1: 1.0,
        2: w[2] / (w[2] + w[4]),
        3: w[2] / (w[2] + w[4] + w[0]),
        5: (w[2] + w[1]) / w.sum(),
    }
    got = knn_proba(train, labels, query, 2, ks=[1, 2, 3, 5, 9], block_size=2)
    for k, p1 in expected_class1.items():
        np.testing.assert_allclose(got[k][0], [1 - p1, p1], rtol=1e-5)
    assert [got[k][0].argmax() for k in (1, 2, 3)] == [1, 1, 0]
    np.testing.assert_allclose(got[9], got[5])  # k beyond the bank is clipped to it


def test_knn_blockwise_equals_dense():
    rng = np.random.default_rng(3)
    train, query = rng.normal(size=(37, 5)), rng.normal(size=(23, 5))
    labels = rng.integers(0, 3, 37)
    small = knn_proba(train, labels, query, 3, ks=[1, 4, 10], block_size=4)
    large = knn_proba(train, labels, query, 3, ks=[1, 4, 10], block_size=1000)
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = qn @ tn.T
    for k in (1, 4, 10):
        np.testing.assert_allclose(small[k], large[k], atol=1e-6)
        nearest = np.argsort(-sim, axis=1)[:, :k]
        votes = np.zeros((23, 3))
        for i in range(23):
            for j in nearest[i]:
                votes[i, labels[j]] += np.exp(sim[i, j] / 0.07)
        np.testing.assert_allclose(small[k], votes / votes.sum(1, keepdims=True), atol=1e-5)


def test_metrics_by_hand_and_against_sklearn():
    codes = np.array([0, 0, 1, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.8, 0.9])  # predictions 0, 1, 0, 1, 1
    m = classification_metrics(codes, np.c_[1 - p1, p1])
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["f1_weighted"] == pytest.approx((2 * 0.5 + 3 * 2 / 3) / 5)
    assert m["auroc"] == pytest.approx(5 / 6)  # 5 of 6 (positive, negative) pairs ranked right

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 4, 50)
    proba = rng.dirichlet(np.ones(4), 50)
    m = classification_metrics(codes, proba)
    pred = proba.argmax(1)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(codes, pred))
    assert m["f1_weighted"] == pytest.approx(f1_score(codes, pred, average="weighted"))
    assert m["auroc"] == pytest.approx(roc_auc_score(codes, proba, multi_class="ovr", average="macro"))


def test_logreg_uses_unis_cost():
    x, y, split = blobs((60, 0, 0), k=3, dim=16)
    enc = validate_split(y, split)
    predict = fit_logreg(x, enc.codes)
    assert predict.C == pytest.approx(16 * 3 / 100)  # C = 1/λ, λ = 100 / (D · K)
    assert predict.classifier.solver == "lbfgs" and predict.classifier.max_iter == 1000


def test_seeds_differ_and_each_is_reproducible():
    x, y, split = blobs(spread=1.0)
    enc = validate_split(y, split)
    tr, va, te = (enc.masks[s] for s in ("train", "val", "test"))
    cfg = LinearProbeConfig(max_steps=50, eval_every=10)
    state = torch.random.get_rng_state()

    def proba(seed):
        fit = train_linear_probe(x[tr], enc.codes[tr], x[va], enc.codes[va], 3, seed, cfg)
        return fit.predict_proba(x[te])

    first, again, other = proba(0), proba(0), proba(1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone


# kaiko-ai/eva 0.4.5+1 (commit 73b61a79): configs/vision/pathology/offline/classification/*.yaml
EVA_TABLE = {  # task: (patience, max_steps, monitor)
    "bach": (1250, 12_500, "balanced_accuracy"),  # val/MulticlassAccuracy, macro-averaged
    "crc": (7, 12_500, "balanced_accuracy"),
    "mhist": (278, 12_500, "balanced_accuracy"),  # val/BinaryBalancedAccuracy
    "pcam": (3, 12_500, "balanced_accuracy"),
}


@pytest.mark.parametrize("task", sorted(EVA_TABLE))
def test_eva_per_task_settings_are_pinned(task):
    cfg = EVA_LINEAR[task]
    assert (cfg.patience, cfg.max_steps, cfg.monitor) == EVA_TABLE[task]
    assert (cfg.batch_size, cfg.lr, cfg.eval_every) == (256, 3e-4, None)
    assert (cfg.low_lr_factor, cfg.low_lr_epochs) == (1 / 3, 5)  # torch ConstantLR's defaults, per epoch
    assert (cfg.seeding, cfg.seed, len(cfg.seeds)) == ("once", 42, 5)
    assert set(EVA_LINEAR) == set(EVA_TABLE)


def test_task_settings_take_eva_then_overrides():
    assert linear_config({"patience": 2}, "bach").patience == 1250  # EVA's replace the global section
    assert linear_config({"patience": 2}, "bach", {"max_steps": 10}).max_steps == 10
    assert linear_config({"patience": 2, "seeds": [3]}).seeds == (3,)
    with pytest.raises(BenchmarkError, match="unknown EVA task 'camelyon'"):
        linear_config(None, "camelyon")
    with pytest.raises(BenchmarkError, match="unknown setting 'patient'"):
        linear_config({"patient": 3})
    with pytest.raises(BenchmarkError, match="seeding 'twice'"):
        LinearProbeConfig(seeding="twice")


def test_learning_rate_is_a_third_for_the_first_five_epochs():
    x, y, split = blobs((40, 10, 0))
    enc = validate_split(y, split)
    tr, va = enc.masks["train"], enc.masks["val"]
    cfg = LinearProbeConfig(max_steps=16, batch_size=20, lr=3e-4, patience=None)  # 2 steps an epoch
    fit = train_linear_probe(x[tr], enc.codes[tr], x[va], enc.codes[va], 3, 0, cfg)
    assert fit.lrs == pytest.approx([1e-4] * 5 + [3e-4] * 3)
    flat = train_linear_probe(
        x[tr],
        enc.codes[tr],
        x[va],
        enc.codes[va],
        3,
        0,
        LinearProbeConfig(max_steps=16, batch_size=20, low_lr_epochs=0),
    )
    assert flat.lrs == pytest.approx([3e-4] * 8)


def test_seeding_once_continues_one_stream_over_the_runs():
    x, y, split = blobs(spread=1.0, seed=2)
    enc = validate_split(y, split)
    tr, va, te = (enc.masks[s] for s in ("train", "val", "test"))
    base = dict(max_steps=30, eval_every=10, seeds=(0, 1))

    def by_hand(**gen):
        stream = torch.Generator().manual_seed(42)
        fits = []
        for seed in (0, 1):
            g = {"generator": stream} if gen else {}
            fits.append(
                train_linear_probe(
                    x[tr], enc.codes[tr], x[va], enc.codes[va], 3, seed, LinearProbeConfig(**base), **g
                )
            )
        return [classification_metrics(enc.codes[te], f.predict_proba(x[te]))["auroc"] for f in fits], fits

    once = run_probe(x, y, split, "t", methods=("linear",), linear=LinearProbeConfig(**base))
    per_run = run_probe(
        x, y, split, "t", methods=("linear",), linear=LinearProbeConfig(**base, seeding="per_run")
    )
    want_once, fits_once = by_hand(generator=True)
    want_per_run, fits_per_run = by_hand()
    got = lambda rows: rows.query("metric == 'auroc'").sort_values("seed")["value"].tolist()  # noqa: E731
    assert got(once) == pytest.approx(want_once, abs=0)
    assert got(per_run) == pytest.approx(want_per_run, abs=0)
    # run 0 of the session starts from seed 42, run 1 continues the stream: neither is a reseeded run
    w = lambda f: f.head.weight.detach()  # noqa: E731
    assert not torch.equal(w(fits_once[0]), w(fits_once[1]))
    assert not torch.equal(w(fits_once[1]), w(fits_per_run[1]))


def test_early_stopping_keeps_the_best_state():
    x, y, split = blobs(spread=1.0, seed=4)
    enc = validate_split(y, split)
    tr, va = enc.masks["train"], enc.masks["val"]
    cfg = LinearProbeConfig(max_steps=400, eval_every=5, patience=3)
    fit = train_linear_probe(x[tr], enc.codes[tr], x[va], enc.codes[va], 3, 0, cfg)
    assert fit.steps_run < 400 and fit.best_step <= fit.steps_run - 3 * 5
    val_bacc = balanced_accuracy_score(enc.codes[va], fit.predict_proba(x[va]).argmax(1))
    assert val_bacc == pytest.approx(fit.best_val)


def test_binary_task_uses_one_logit():
    x, y, split = blobs(k=2)
    enc = validate_split(y, split)
    fit = train_linear_probe(x[enc.masks["train"]], enc.codes[enc.masks["train"]], None, None, 2, 0, FAST)
    assert fit.head.out_features == 1
    proba = fit.predict_proba(x[:5])
    np.testing.assert_allclose(proba.sum(1), 1.0)


def test_no_test_split_reports_validation_and_all_k():
    x, y, split = blobs((90, 30, 0))
    rows = run_probe(x, y, split, "crc", methods=("knn",), knn=KnnConfig(ks=(1, 3, 5), report_all_k=True))
    assert set(rows["method"]) == {"knn", "knn_k1", "knn_k3", "knn_k5"}
    assert rows.query("method == 'knn' and metric == 'k'")["value"].item() == 1  # ties → smallest k


def test_summary_uses_sample_std():
    rows = pd.DataFrame(
        [("t", "linear", s, "auroc", v) for s, v in enumerate([0.8, 0.9, 1.0])]
        + [("t", "knn", 0, "auroc", 0.7)],
        columns=["task", "method", "seed", "metric", "value"],
    )
    out = summarize(rows).set_index("method")
    assert out.loc["linear", "mean"] == pytest.approx(0.9) and out.loc["linear", "std"] == pytest.approx(0.1)
    assert out.loc["knn", "std"] == 0.0 and out.loc["knn", "n"] == 1


def _toy_bags(n_bags, seed, first=0):
    """Bags of 8-16 noise instances; a positive bag holds one marked instance (feature 0 raised by 8)."""
    rng = np.random.default_rng(seed)
    x, y, slides = [], [], []
    for b in range(n_bags):
        bag = rng.normal(size=(int(rng.integers(8, 17)), 16))
        label = b % 2
        if label:
            bag[rng.integers(len(bag)), 0] += 8.0
        x.append(bag)
        y += [label] * len(bag)
        slides += [f"slide{first + b}"] * len(bag)
    return np.concatenate(x), y, slides


def test_abmil_learns_the_bag_rule():
    parts = [_toy_bags(80, 1, 0), _toy_bags(20, 2, 100), _toy_bags(40, 3, 200)]
    x = np.concatenate([p[0] for p in parts])
    y = sum((p[1] for p in parts), [])
    slides = sum((p[2] for p in parts), [])
    split = sum(([["train", "val", "test"][i]] * len(p[1]) for i, p in enumerate(parts)), [])
    rows = run_abmil(
        x, y, split, slides, "toy", AbmilConfig(max_epochs=40, batch_size=8, patience=5, seeds=(0, 1))
    )
    bacc = rows[rows.metric == "balanced_accuracy"]["value"]
    assert len(bacc) == 2 and bacc.min() >= 0.95, rows


def test_abmil_ignores_padding():
    torch.manual_seed(0)
    model = ABMIL(6, 3, projected_dim=8, hidden_attention=8, hidden_mlp=(8,)).eval()
    bag = torch.randn(1, 5, 6)
    padded = torch.cat([bag, torch.randn(1, 3, 6) * 100], 1)
    mask = torch.tensor([[True] * 5 + [False] * 3])
    with torch.no_grad():
        out, attention = model(padded, mask, return_attention=True)
        torch.testing.assert_close(out, model(bag, torch.ones(1, 5, dtype=torch.bool)))
    assert attention[0, 5:].abs().max() == 0 and attention.sum().item() == pytest.approx(1.0)


def test_slide_with_mixed_labels_is_an_error():
    x = np.zeros((4, 3))
    with pytest.raises(BenchmarkError, match="slide 'S1'.*different labels"):
        run_abmil(x, [0, 1, 0, 0], ["train"] * 4, ["S1", "S1", "S2", "S2"], "t")
    with pytest.raises(BenchmarkError, match="slide 'S2'.*different splits"):
        run_abmil(x, [0, 0, 1, 1], ["train", "train", "train", "test"], ["S1", "S1", "S2", "S2"], "t")


def _manifest(tmp_path, rows, header="tile_index,label,split"):
    path = tmp_path / "manifest.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_manifest_loads_and_selects(tmp_path):
    path = _manifest(
        tmp_path,
        ["4,TUM,train,s1", "0,STR,train,s2", "2,TUM,val,s3", "3,STR,test,s4"],
        "tile_index,label,split,slide_id",
    )
    m = load_manifest(path, n_tiles=5)
    emb = np.arange(10.0).reshape(5, 2)
    np.testing.assert_array_equal(m.select(emb), emb[[4, 0, 2, 3]])
    assert list(m.label) == ["TUM", "STR", "TUM", "STR"] and list(m.slide_id) == ["s1", "s2", "s3", "s4"]
    with pytest.raises(BenchmarkError, match="tile_index 4.*3 rows"):
        m.select(emb[:3])


@pytest.mark.parametrize(
    ("rows", "classes", "match"),
    [
        (["0,a,train", "1,b,train", "2,a,dev"], None, r"line 4 has unknown split 'dev'"),
        (["0,a,train", "1,b,train", "2,c,test"], None, r"line 4 in test has label 'c'.*no training row"),
        (["0,a,train", "1,b,train", "2,c,val"], None, r"line 4 in val has label 'c'"),
        (["0,a,train", "1,b,train", "2,c,test"], ["a", "b", "c"], r"class 'c' has no training rows"),
        (["0,a,train", "1,a,train", "2,a,test"], None, r"single class"),
        (["0,a,train", "1,,train", "2,b,train"], None, r"line 3 has no label"),
        (["0,a,train", "0,b,train"], None, r"line 3 repeats tile_index 0"),
        (["0,a,train", "x,b,train"], None, r"line 3 has tile_index 'x'"),
        (["0,a,val", "1,b,test"], None, r"no training rows"),
    ],
)
def test_manifest_errors_name_the_item(tmp_path, rows, classes, match):
    with pytest.raises(BenchmarkError, match=match):
        load_manifest(_manifest(tmp_path, rows), classes=classes)


def test_manifest_structure_errors(tmp_path):
    with pytest.raises(BenchmarkError, match="lacks column 'split'"):
        load_manifest(_manifest(tmp_path, ["0,a"], "tile_index,label"))
    with pytest.raises(BenchmarkError, match="tile_index 7 but there are 5 tiles"):
        load_manifest(_manifest(tmp_path, ["0,a,train", "7,b,train"]), n_tiles=5)
    with pytest.raises(BenchmarkError, match="does not exist"):
        load_manifest(tmp_path / "nope.csv")


def test_run_scores_every_task_and_writes_provenance(tmp_path):
    x, y, split = blobs()
    order = np.random.default_rng(0).permutation(len(x))  # manifest rows point anywhere into the store
    store = tmp_path / "emb.zarr"
    root = zarr.open_group(store, mode="w", zarr_format=3)
    emb = np.empty_like(x, dtype=np.float32)
    emb[order] = x
    root.create_array("embeddings", data=emb)
    root.attrs.update({"complete": True, "provenance": {"config_hash": "abc"}})
    rows = [f"{order[i]},{y[i]},{split[i]}" for i in range(len(x))]
    manifest = _manifest(tmp_path, rows)
    tasks = {"blobs": {"dataset": "d", "manifest": str(manifest), "level": "tile"}}
    got = run(tasks, [store], tmp_path / "probe.parquet", model="m", methods=["knn", "logreg"], knn_ks=[1, 5])
    expected = run_probe(x.astype(np.float32), y, split, "blobs", ["knn", "logreg"], knn=KnnConfig(ks=(1, 5)))
    pd.testing.assert_frame_equal(got, expected)
    written, meta = read_parquet(tmp_path / "probe.parquet", "probe scores", BenchmarkError)
    pd.testing.assert_frame_equal(written, expected)
    assert meta["benchmark"] == "probe" and meta["model"] == "m"
    assert meta["params"]["tasks"] == tasks and meta["params"]["knn_ks"] == [1, 5]
    slide_task = {"s": {"dataset": "d", "manifest": str(manifest), "level": "slide"}}
    with pytest.raises(BenchmarkError, match="probe task s: level slide needs a slide_id column"):
        run(slide_task, [store], tmp_path / "x.parquet", model="m")
    with pytest.raises(BenchmarkError, match="1 probe task"):
        run(tasks, [], tmp_path / "x.parquet", model="m")
    assert not (tmp_path / "x.parquet").exists()


def test_run_scores_each_cross_validation_fold_and_the_summary_is_their_mean(tmp_path):
    x, y, split = blobs()
    store = tmp_path / "emb.zarr"
    root = zarr.open_group(store, mode="w", zarr_format=3)
    root.create_array("embeddings", data=x.astype(np.float32))
    root.attrs.update({"complete": True, "provenance": {"config_hash": "abc"}})
    # fold 1 swaps the roles of val and test
    other = np.array([{"val": "test", "test": "val"}.get(s, s) for s in split], dtype=object)
    rows = [f"{i},{y[i]},{s},{f}" for f, sp in enumerate((split, other)) for i, s in enumerate(sp)]
    manifest = _manifest(tmp_path, rows, "tile_index,label,split,fold")
    tasks = {"blobs": {"dataset": "d", "manifest": str(manifest), "level": "tile"}}
    got = run(tasks, [store], tmp_path / "probe.parquet", model="m", methods=["knn", "logreg"], knn_ks=[1, 5])
    knn = KnnConfig(ks=(1, 5))
    x32 = x.astype(np.float32)
    folds = [run_probe(x32, y, sp, "blobs", ["knn", "logreg"], knn=knn) for sp in (split, other)]
    pd.testing.assert_frame_equal(got, fold_mean_chance_se(folds))
    # the null standard error recorded is that of the mean over the two disjoint test folds
    se0, se1 = (f.loc[f["metric"] == CHANCE_SE, "value"].iloc[0] for f in folds)
    assert np.allclose(got.loc[got["metric"] == CHANCE_SE, "value"], np.hypot(se0, se1) / 2)
    other_rows = got["metric"] != CHANCE_SE
    pd.testing.assert_frame_equal(got[other_rows], pd.concat(folds, ignore_index=True)[other_rows])
    summary = summarize(got).set_index(["method", "metric"])
    for method in ("knn", "logreg"):
        per_fold = [f[(f.method == method) & (f.metric == "balanced_accuracy")].value.item() for f in folds]
        assert summary.loc[(method, "balanced_accuracy"), "mean"] == pytest.approx(np.mean(per_fold))
        assert summary.loc[(method, "balanced_accuracy"), "n"] == 2


def test_manifest_folds_are_validated_one_by_one(tmp_path):
    header = "tile_index,label,split,fold"
    m = load_manifest(
        _manifest(tmp_path, ["0,a,train,0", "1,b,train,0", "0,b,train,1", "1,a,train,1"], header)
    )
    assert [(f, part.label.tolist()) for f, part in m.folds()] == [(0, ["a", "b"]), (1, ["b", "a"])]
    assert load_manifest(_manifest(tmp_path, ["0,a,train", "1,b,train"])).folds()[0][0] is None
    with pytest.raises(BenchmarkError, match="line 4 repeats tile_index 0 in fold 1"):
        load_manifest(_manifest(tmp_path, ["0,a,train,1", "1,b,train,1", "0,b,train,1"], header))
    with pytest.raises(BenchmarkError, match="line 3 has fold 'x', not an integer"):
        load_manifest(_manifest(tmp_path, ["0,a,train,0", "1,b,train,x"], header))
    with pytest.raises(BenchmarkError, match="fold 1: the training split has a single class"):
        load_manifest(
            _manifest(tmp_path, ["0,a,train,0", "1,b,train,0", "0,a,train,1", "1,a,train,1"], header)
        )


# ----------------------------------------------------------------------------------------- at chance


def test_chance_metrics_by_hand_and_by_simulation():
    codes = np.repeat([0, 1, 2], [10, 20, 70])
    m = chance_metrics(codes)
    k = 3
    se = math.sqrt(sum((1 / k) * (1 - 1 / k) / n for n in (10, 20, 70))) / k
    assert m["chance_balanced_accuracy"] == pytest.approx(1 / 3)
    assert m["chance_balanced_accuracy_se"] == pytest.approx(se)
    # the null: predictions drawn uniformly at random, independent of the labels
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (20000, len(codes)))
    sims = np.mean([(pred[:, codes == c] == c).mean(1) for c in range(3)], axis=0)  # balanced accuracy
    assert sims[0] == pytest.approx(balanced_accuracy_score(codes, pred[0]))
    assert np.mean(sims) == pytest.approx(1 / 3, abs=0.005)
    assert np.std(sims) == pytest.approx(se, rel=0.03)
    assert math.isnan(chance_metrics(np.array([], int))["chance_balanced_accuracy"])


def test_at_chance_uses_the_z_test_and_the_margin():
    assert at_chance(0.58, 0.5, 0.05)  # 0.5 + 1.645 × 0.05 = 0.582
    assert not at_chance(0.59, 0.5, 0.05)
    assert at_chance(0.515, 0.5, 0.001) and not at_chance(0.53, 0.5, 0.001)  # margin 0.02 on a huge test set
    assert not at_chance(float("nan"), 0.5, 0.05)  # not judged


def _flags_of(rows_by_model):
    summary = pd.concat([summarize(r).assign(model=m) for m, r in rows_by_model.items()], ignore_index=True)
    return probe_flags(summary, list(rows_by_model))


def test_random_embeddings_are_flagged_at_chance_and_informative_ones_are_not():
    """The constructed case of issue 20: embeddings that carry no information about the label (random, or
    collapsed to one vector) are flagged; embeddings that separate the classes are not."""
    x, y, split = blobs((300, 100, 400), spread=3.0, seed=2)
    random = np.random.default_rng(3).normal(size=x.shape)
    collapsed = np.ones_like(x) + 1e-6 * np.random.default_rng(4).normal(size=x.shape)
    cfg = LinearProbeConfig(max_steps=200, eval_every=50, seeds=(0,))
    rows = {
        name: run_probe(feats, y, split, "toy", linear=cfg)
        for name, feats in (("informative", x), ("random", random), ("collapsed", collapsed))
    }
    assert {"chance_balanced_accuracy", "chance_balanced_accuracy_se"} <= set(rows["random"]["metric"])
    flags = _flags_of(rows)
    assert set(flags) == {"random", "collapsed"}, flags
    assert flags["random"].startswith("probes at chance on all 1 task(s) (e.g. toy: best balanced accuracy")


def test_a_model_above_chance_on_one_task_is_not_flagged():
    x, y, split = blobs((300, 100, 400), spread=3.0, seed=2)
    random = np.random.default_rng(3).normal(size=x.shape)
    cfg = LinearProbeConfig(max_steps=200, eval_every=50, seeds=(0,))
    mixed = pd.concat(
        [run_probe(random, y, split, "noise", ("knn",), linear=cfg), run_probe(x, y, split, "sep", ("knn",))]
    )
    assert _flags_of({"mixed": mixed}) == {}
    old = mixed[~mixed["metric"].str.startswith("chance_")]  # scored before the chance rows existed
    assert _flags_of({"old": old[old["task"] == "noise"]}) == {}  # not judged
