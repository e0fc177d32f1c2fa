import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import zarr

from histodistill.bench import BenchmarkError
from histodistill.bench.hest import (
    HestFold,
    HestSample,
    HestTask,
    fit_predict_ridge,
    load_task,
    pearson_per_gene,
    read_expression,
    read_patch_images,
    run,
    score_task,
    summarize,
    write_h5ad,
)
from histodistill.demo.tasks import make_demo_hest, tile_content_features
from histodistill.provenance import read_parquet
from histodistill.tilestore import INDEX_COLUMNS


def synthetic_tiles(n: int, seed: int = 0, size: int = 224) -> np.ndarray:
    """Flat pinkish tiles sprinkled with dark 'nuclei' at a density that varies from tile to tile."""
    rng = np.random.default_rng(seed)
    tiles = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        tiles[i] = rng.integers(150, 250, 3)
        nuclei = rng.random((size, size)) < rng.uniform(0.0, 0.4)
        tiles[i][nuclei] = rng.integers(20, 90, 3)
    return tiles


@pytest.fixture(scope="module")
def tiles():
    return synthetic_tiles(120)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory, tiles):
    return make_demo_hest(tmp_path_factory.mktemp("hest") / "DEMO_TASK", tiles, seed=3)


@pytest.fixture(scope="module")
def demo(demo_dir):
    return load_task(demo_dir)


def test_pearson_by_hand():
    y = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 3.0, 2.0, 4.0])
    # centred: [-1.5, -.5, .5, 1.5] and [-1.5, .5, -.5, 1.5] → Σxy = 4, Σx² = Σy² = 5 → r = 0.8
    np.testing.assert_allclose(pearson_per_gene(y, pred), [0.8])
    np.testing.assert_allclose(pearson_per_gene(np.c_[y, y], np.c_[pred, -pred]), [0.8, -0.8])


def test_constant_gene_scores_zero_with_a_warning():
    y = np.c_[[1.0, 2.0, 3.0, 4.0], [5.0, 5.0, 5.0, 5.0]]
    pred = np.c_[[1.0, 2.0, 3.0, 5.0], [1.0, 2.0, 3.0, 4.0]]
    with pytest.warns(RuntimeWarning, match="'B'"):
        r = pearson_per_gene(y, pred, genes=["A", "B"])
    assert r[1] == 0.0 and np.isfinite(r).all() and r[0] > 0.9


def test_ridge_recovers_a_linear_relation_and_not_noise():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 20))
    y = 3.0 + x @ rng.normal(size=(20, 50))  # offset: Ridge has no intercept, Pearson ignores it
    pred, info = fit_predict_ridge(x[:300], y[:300], x[300:])
    assert info == {"n_components": 20, "alpha": 100 / (20 * 50)}
    assert pearson_per_gene(y[300:], pred).min() > 0.999
    noise = rng.normal(size=(400, 20))
    pred, _ = fit_predict_ridge(noise[:300], y[:300], noise[300:])
    assert abs(pearson_per_gene(y[300:], pred).mean()) < 0.05


def test_alpha_uses_256_components_and_50_genes():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(300, 300)), rng.normal(size=(300, 50))
    _, info = fit_predict_ridge(x, y, x[:5])
    assert info == {"n_components": 256, "alpha": 100 / (256 * 50)}


def _write_task(root, counts, barcodes, obs_order, genes, sparse=True, drop=None):
    """A one-sample-per-fold task by hand: sample S0 trains, S1 tests."""
    (root / "patches").mkdir(parents=True)
    (root / "splits").mkdir()
    for s, sid in enumerate(("S0", "S1")):
        with h5py.File(root / "patches" / f"{sid}.h5", "w") as f:
            f["img"] = np.zeros((len(barcodes), 4, 4, 3), np.uint8)
            f["barcode"] = np.array(barcodes, dtype="S")  # flat [N], not [N, 1]
            f["coords"] = np.zeros((len(barcodes), 2), np.int64)
        obs = [barcodes[i] for i in obs_order if barcodes[i] != drop]
        rows = [i for i in obs_order if barcodes[i] != drop]
        write_h5ad(root / "adata" / f"{sid}.h5ad", counts[s][rows], obs, genes, sparse=sparse)
    for kind, sid in (("train", "S0"), ("test", "S1")):
        pd.DataFrame(
            {"sample_id": [sid], "patches_path": [f"patches/{sid}.h5"], "expr_path": [f"adata/{sid}.h5ad"]}
        ).to_csv(root / "splits" / f"{kind}_0.csv", index=False)
    (root / "var_50genes.json").write_text(json.dumps({"genes": genes[:3]}))
    return root


@pytest.fixture(scope="module")
def counts():
    rng = np.random.default_rng(5)
    return rng.poisson(3, size=(2, 40, 5))


BARCODES = [f"AAC{i:03d}-1" for i in range(40)]
GENES = ["G0", "G1", "G2", "G3", "G4"]


def test_barcode_alignment_does_not_depend_on_anndata_order(tmp_path, counts):
    ordered = load_task(_write_task(tmp_path / "a", counts, BARCODES, range(40), GENES))
    shuffled = load_task(
        _write_task(tmp_path / "b", counts, BARCODES, np.random.default_rng(0).permutation(40), GENES)
    )
    for sid in ("S0", "S1"):
        np.testing.assert_array_equal(ordered.samples[sid].expression, shuffled.samples[sid].expression)
        np.testing.assert_array_equal(ordered.samples[sid].expression, np.log1p(counts[int(sid[1])][:, :3]))
    emb = {sid: np.random.default_rng(2).normal(size=(40, 8)) for sid in ("S0", "S1")}
    pd.testing.assert_frame_equal(
        score_task(ordered, emb).drop(columns="task"), score_task(shuffled, emb).drop(columns="task")
    )


def test_csr_and_dense_read_identically(tmp_path, counts):
    genes = ["G4", "G0", "G2"]
    order = np.random.default_rng(1).permutation(40)
    write_h5ad(tmp_path / "csr.h5ad", counts[0][order], [BARCODES[i] for i in order], GENES, sparse=True)
    write_h5ad(tmp_path / "dense.h5ad", counts[0][order], [BARCODES[i] for i in order], GENES, sparse=False)
    with h5py.File(tmp_path / "csr.h5ad") as f:
        assert f["X"].attrs["encoding-type"] == "csr_matrix" and "indptr" in f["X"]
    a = read_expression(tmp_path / "csr.h5ad", BARCODES, genes)
    b = read_expression(tmp_path / "dense.h5ad", BARCODES, genes)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, np.log1p(counts[0][:, [4, 0, 2]].astype(float)))


def test_nullable_string_index(tmp_path, counts):
    """AnnData ≥ 0.11 may store the obs index as a nullable-string-array group (here of bytes)."""
    path = write_h5ad(tmp_path / "x.h5ad", counts[0], BARCODES, GENES, sparse=False)
    with h5py.File(path, "a") as f:
        del f["obs/_index"]
        g = f.create_group("obs/_index")
        g.attrs["encoding-type"] = "nullable-string-array"
        g["values"] = np.array(BARCODES, dtype="S")
        g["mask"] = np.zeros(40, bool)
    got = read_expression(path, BARCODES[::-1], ["G1"])
    np.testing.assert_array_equal(got[:, 0], np.log1p(counts[0][::-1, 1]))


def test_missing_barcode_names_the_sample_and_barcode(tmp_path, counts):
    root = _write_task(tmp_path / "t", counts, BARCODES, range(40), GENES, drop="AAC017-1")
    with pytest.raises(BenchmarkError, match=r"'S0'.*'AAC017-1'"):
        load_task(root)


def test_missing_gene_and_split_errors(tmp_path, counts):
    root = _write_task(tmp_path / "t", counts, BARCODES, range(40), GENES)
    (root / "var_50genes.json").write_text(json.dumps({"genes": ["G0", "NOPE"]}))
    with pytest.raises(BenchmarkError, match="'NOPE'"):
        load_task(root)
    (root / "var_50genes.json").write_text(json.dumps({"genes": ["G0"]}))
    (root / "splits" / "test_0.csv").unlink()
    with pytest.raises(BenchmarkError, match="test_0.csv"):
        load_task(root)


def test_embedding_shape_is_checked(demo):
    bad = {sid: np.zeros((len(s) - 1, 4)) for sid, s in demo.samples.items()}
    with pytest.raises(BenchmarkError, match="DEMO"):
        score_task(demo, bad)
    with pytest.raises(BenchmarkError, match="no embeddings given for sample 'DEMO1'"):
        score_task(demo, {"DEMO0": np.zeros((60, 4))})


def test_demo_layout_round_trips(demo_dir, demo, tiles):
    assert sorted(p.name for p in demo_dir.iterdir()) == [
        "adata",
        "patches",
        "provenance.json",
        "splits",
        "var_50genes.json",
    ]
    assert demo.name == "DEMO_TASK" and len(demo.genes) == 50
    assert demo.folds == (HestFold(("DEMO1",), ("DEMO0",)), HestFold(("DEMO0",), ("DEMO1",)))
    for sample in demo.samples.values():
        assert sample.expression.shape == (60, 50) and sample.coords.shape == (60, 2)
        images = read_patch_images(sample.patches_path)
        assert images.shape == (60, 224, 224, 3) and images.dtype == np.uint8
        assert all(any(np.array_equal(img, t) for t in tiles) for img in images[:3])
        with h5py.File(sample.patches_path) as f:
            assert f["barcode"].shape == (60, 1)
    assert json.loads((demo_dir / "provenance.json").read_text())["params"]["seed"] == 3


def test_content_features_beat_random_features(demo):
    content = {
        sid: tile_content_features(read_patch_images(s.patches_path)) for sid, s in demo.samples.items()
    }
    rng = np.random.default_rng(0)
    random = {sid: rng.normal(size=(len(s), 32)) for sid, s in demo.samples.items()}
    good = summarize(score_task(demo, content))
    bad = summarize(score_task(demo, random))
    good_r = good.query("task == 'DEMO_TASK' and metric == 'pearson_mean'")["value"].item()
    bad_r = bad.query("task == 'DEMO_TASK' and metric == 'pearson_mean'")["value"].item()
    assert good_r > 0.5 and abs(bad_r) < 0.2 and good_r > bad_r + 0.4


def test_rows_and_summary_by_hand():
    rows = pd.DataFrame(
        [
            ("A", 0, "mean", "pearson", 0.2),
            ("A", 1, "mean", "pearson", 0.4),
            ("A", 0, "g", "pearson", 0.9),
            ("B", 0, "mean", "pearson", 0.6),
        ],
        columns=["task", "fold", "gene", "metric", "value"],
    )
    out = summarize(rows).set_index(["task", "metric"])["value"]
    assert out["A", "pearson_mean"] == pytest.approx(0.3)
    assert out["A", "pearson_std"] == pytest.approx(0.1)  # population std, as HEST's np.std
    assert out["mean", "pearson_mean"] == pytest.approx(0.45)


def test_score_task_rows_shape():
    rng = np.random.default_rng(0)
    x = {s: rng.normal(size=(30, 6)) for s in ("a", "b", "c")}
    w = rng.normal(size=(2, 3))
    samples = {
        s: HestSample(s, np.array([f"{i}" for i in range(30)]), np.zeros((30, 2)), x[s][:, :2] @ w) for s in x
    }
    task = HestTask(
        "T", ("g0", "g1", "g2"), samples, (HestFold(("a", "b"), ("c",)), HestFold(("b", "c"), ("a",)))
    )
    rows = score_task(task, x)
    assert list(rows.columns) == ["task", "fold", "gene", "metric", "value"]
    assert len(rows) == 2 * 4 and set(rows["gene"]) == {"g0", "g1", "g2", "mean"}
    assert (rows["value"] > 0.99).all()


def test_demo_write_is_atomic(tmp_path, tiles):
    out = make_demo_hest(tmp_path / "task", tiles[:10], seed=0, spots_per_sample=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task"]
    again = make_demo_hest(tmp_path / "task", tiles[:10], seed=0, spots_per_sample=8)
    assert again == out and len(load_task(out).samples["DEMO0"]) == 8
    shutil.rmtree(out)
    with pytest.raises(BenchmarkError, match="uint8"):
        make_demo_hest(tmp_path / "bad", tiles[:4].astype(np.float32))
    assert not (tmp_path / "bad").exists()


def _embedding_store(path, by_sample: dict[str, np.ndarray], config_hash: str):
    """A finished embedding store as `embed` writes it for a HEST tile store: one slide per sample."""
    root = zarr.open_group(path, mode="w", zarr_format=3)
    root.create_array("embeddings", data=np.concatenate(list(by_sample.values())).astype(np.float32))
    slide_index = np.concatenate([np.full(len(x), i, np.int32) for i, x in enumerate(by_sample.values())])
    for name in INDEX_COLUMNS:
        root.create_array(name, data=slide_index if name == "slide_index" else np.zeros(len(slide_index)))
    slides = [{"slide_id": sid} for sid in by_sample]
    root.attrs.update({"complete": True, "provenance": {"config_hash": config_hash, "slides": slides}})
    return path


def test_run_scores_every_task_and_writes_provenance(tmp_path, demo_dir, demo):
    content = {
        sid: tile_content_features(read_patch_images(s.patches_path)).astype(np.float32)
        for sid, s in demo.samples.items()
    }  # float32, as the store holds them
    store = _embedding_store(tmp_path / "emb.zarr", content, "abc")
    rows = run([demo_dir], [store], tmp_path / "hest.parquet", model="m", latent_dim=8, seed=1)
    expected = score_task(demo, content, latent_dim=8, seed=1)
    pd.testing.assert_frame_equal(rows, expected)
    written, meta = read_parquet(tmp_path / "hest.parquet", "HEST scores", BenchmarkError)
    pd.testing.assert_frame_equal(written, expected)
    assert meta["benchmark"] == "hest" and meta["model"] == "m"
    assert meta["params"] == {"tasks": ["DEMO_TASK"], "latent_dim": 8, "seed": 1}
    assert meta["embeddings_config_hash"] == {"DEMO_TASK": "abc"}
    assert meta["summary"] == summarize(expected).to_dict("records")
    with pytest.raises(BenchmarkError, match="1 HEST task"):
        run([demo_dir], [], tmp_path / "x.parquet", model="m")
    assert not (tmp_path / "x.parquet").exists()
