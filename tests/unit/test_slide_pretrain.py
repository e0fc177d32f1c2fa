"""SLPD region pretraining on the distillation engine: streamed region store, exact resume, DDP (gloo)."""

import os
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

from histodistill.distill.heads import ProjectionHead
from histodistill.errors import HistodistillError
from histodistill.slide.pretrain import (
    RegionTrainConfig,
    _Net,
    build_encoder,
    embed_regions,
    epoch_prototypes,
    load_region_encoder,
    pretrain_regions,
)
from histodistill.slide.prototypes import slide_prototypes
from histodistill.slide.regions import COLUMNS, RegionStore, write_region_arrays


def _store(path, rng, n_slides=6, per_slide=6, g=4, d=6):
    """A region store of `n_slides` slides (one with only 3 regions: too few to cluster with M = 2,
    min_regions 4), tokens of three noisy styles, 20 % missing tiles."""
    styles = rng.normal(size=(3, d)).astype(np.float32)
    counts = [per_slide] * (n_slides - 1) + [3]
    slide = np.repeat(np.arange(n_slides), counts).astype(np.int32)
    kind = rng.integers(0, 3, size=(len(slide), g, g))
    tokens = styles[kind] + 0.1 * rng.normal(size=(len(slide), g, g, d)).astype(np.float32)
    mask = rng.random((len(slide), g, g)) > 0.2
    arrays = {"tokens": tokens, "mask": mask, "slide_index": slide,
              **{c: np.zeros(len(slide), np.int32) for c in COLUMNS if c != "slide_index"}}  # fmt: skip
    write_region_arrays(path, arrays, [f"s{i}" for i in range(n_slides)], {"seed": 0})
    return arrays


TINY = RegionTrainConfig(
    embed_dim=16, depth=1, num_heads=2, drop_path=0.0, global_crop=3, local_crop=2, n_local_crops=2,
    head_prototypes=32, head_hidden=32, head_bottleneck=8, batch_size=12, epochs=3, warmup_epochs=1,
    warm_epochs=1, n_prototypes=2, neighbors=1, min_regions=4, kmeans_n_init=1, threads=1, preload_mib=0,
)  # fmt: skip


def _weights(path):
    return torch.load(path, weights_only=True)


def test_region_store_streams_rows_in_any_order(tmp_path):
    arrays = _store(tmp_path / "r.zarr", np.random.default_rng(0))
    store = RegionStore(tmp_path / "r.zarr")
    for rows in ([3, 4, 5], [7, 1, 30, 1], []):
        tokens, mask = store.read(np.array(rows, dtype=np.int64))
        np.testing.assert_array_equal(tokens, arrays["tokens"][rows])
        np.testing.assert_array_equal(mask, arrays["mask"][rows])
    assert store.root["tokens"].chunks[0] == 1  # one region per chunk: a read touches only its regions
    assert [r.tolist() for r in store.slide_rows()][-1] == [30, 31, 32]
    with pytest.raises(IndexError, match="outside"):
        store.read(np.array([len(store)]))


def test_epoch_prototypes_from_per_slide_reads_equal_the_whole_store_computation(tmp_path):
    arrays = _store(tmp_path / "r.zarr", np.random.default_rng(1))
    store = RegionStore(tmp_path / "r.zarr")
    torch.manual_seed(0)
    net = _Net(build_encoder(TINY, 6, 4), ProjectionHead(16, 32, 32, 8)).eval()
    got = epoch_prototypes(net, store, store.slide_rows(), TINY, epoch=2)
    with torch.no_grad():
        feats = embed_regions(net.backbone, arrays["tokens"], arrays["mask"], crop=TINY.global_crop)
        codes = net.head.bottleneck(torch.as_tensor(feats)).numpy()
    want = slide_prototypes(codes, arrays["slide_index"], 6, 2, TINY.seed + 2, 1, TINY.kmeans_max_iter, 4)
    np.testing.assert_array_equal(got.valid, want.valid)
    assert got.valid.tolist() == [True] * 5 + [False]  # the 3-region slide is not clustered
    np.testing.assert_array_equal(got.assignment, want.assignment)
    np.testing.assert_allclose(got.centroids, want.centroids, rtol=1e-5, atol=1e-6)


def test_pretraining_runs_all_terms_and_resumes_to_the_same_weights(tmp_path):
    _store(tmp_path / "r.zarr", np.random.default_rng(0))
    full = pretrain_regions(tmp_path / "r.zarr", tmp_path / "a", TINY)["epochs"]
    assert [r["epoch"] for r in full] == [1, 2, 3]
    assert "intra" not in full[0] and {"intra", "inter"} <= set(full[1]) & set(full[2])
    assert all(np.isfinite(r["loss"]) for r in full)
    # stopped after 1 epoch (a killed job: the checkpoint stays), then rerun: resumes, ends where (a) did
    assert len(pretrain_regions(tmp_path / "r.zarr", tmp_path / "b", TINY, stop_after=1)["epochs"]) == 1
    assert not (tmp_path / "b" / "region_encoder.pt").exists()
    resumed = pretrain_regions(tmp_path / "r.zarr", tmp_path / "b", TINY)["epochs"]
    assert resumed == full
    a, b = _weights(tmp_path / "a" / "region_encoder.pt"), _weights(tmp_path / "b" / "region_encoder.pt")
    assert all(torch.equal(a["backbone"][k], b["backbone"][k]) for k in a["backbone"])
    ckpt_a, ckpt_b = _weights(tmp_path / "a" / "checkpoint.pt"), _weights(tmp_path / "b" / "checkpoint.pt")
    for part in ("student", "teacher", "center", "proto_center"):
        assert all(torch.equal(ckpt_a[part][k], ckpt_b[part][k]) for k in ckpt_a[part])
    # a store read into memory first (preload_mib, the demo's case) trains the same weights
    assert RegionStore(tmp_path / "r.zarr").preload(1) and not RegionStore(tmp_path / "r.zarr").preload(0)
    pretrain_regions(tmp_path / "r.zarr", tmp_path / "c", replace(TINY, preload_mib=1))
    c = _weights(tmp_path / "c" / "region_encoder.pt")
    assert all(torch.equal(a["backbone"][k], c["backbone"][k]) for k in a["backbone"])
    model = load_region_encoder(tmp_path / "b" / "region_encoder.pt")
    assert embed_regions(model, *RegionStore(tmp_path / "r.zarr").read(np.arange(4))).shape == (4, 16)
    # other settings: the checkpoint is not resumed (a fresh run of 1 epoch ends at epoch 1, not 4)
    other = replace(TINY, epochs=4)
    assert len(pretrain_regions(tmp_path / "r.zarr", tmp_path / "b", other, stop_after=1)["epochs"]) == 1


def test_batch_not_divisible_by_processes_is_refused_by_name(tmp_path, monkeypatch):
    _store(tmp_path / "r.zarr", np.random.default_rng(0))
    monkeypatch.setattr(
        "histodistill.slide.pretrain.init_process", lambda device: (0, 0, 5, torch.device("cpu"))
    )
    with pytest.raises(HistodistillError, match="batch_size 12 .* not divisible by 5 processes"):
        pretrain_regions(tmp_path / "r.zarr", tmp_path / "x", TINY)


@pytest.mark.slow  # ~1 min on 2 shared cores (torchrun and 3 interpreters start); passed 2026-11-30
def test_two_process_gloo_equals_one_process(tmp_path):
    """torchrun, 2 processes (gloo, CPU), 6 regions each vs 1 process with the global batch of 12: the same
    losses and weights (k-means sharded by slide, matching on rank 0 and broadcast). Tolerance: relative
    1e-4 (the gradient all-reduce sums in another order)."""
    from histodistill.slide.pretrain import pretrain_variants

    _store(tmp_path / "r.zarr", np.random.default_rng(0))
    settings = {k: v for k, v in asdict(TINY).items() if k != "threads"}
    one = pretrain_variants(tmp_path / "r.zarr", {"slpd": tmp_path / "one.pt"}, tmp_path / "w1", settings, 1)
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        two = pretrain_variants(tmp_path / "r.zarr", {"slpd": tmp_path / "two.pt"}, tmp_path / "w2", settings,
                                1, nproc_per_node=2, log_path=tmp_path / "two.log")  # fmt: skip
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    assert "rank 1 of 2" in (tmp_path / "two.log").read_text()
    assert {"intra", "inter"} <= set(two["slpd"]["epochs"][-1])  # the prototype terms ran under DDP
    for a, b in zip(one["slpd"]["epochs"], two["slpd"]["epochs"], strict=True):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], rtol=1e-4)
    wa, wb = _weights(tmp_path / "one.pt")["backbone"], _weights(tmp_path / "two.pt")["backbone"]
    for k in wa:
        np.testing.assert_allclose(wb[k].numpy(), wa[k].numpy(), rtol=1e-3, atol=1e-5)
