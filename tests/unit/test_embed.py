import h5py
import numpy as np
import pytest
import torch
import zarr

from histodistill.demo.slides import make_demo_slide
from histodistill.embed import EmbeddingStore, extract_embeddings
from histodistill.errors import HistodistillError
from histodistill.export import export_h5, export_plismbench
from histodistill.models import load_model
from histodistill.models.transforms import ModelTransform
from histodistill.tilestore import TileStore
from tests.conftest import SMALL
from tests.helpers import make_tile_store, run_killed


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_slide):
    d = tmp_path_factory.mktemp("embed")
    other = make_demo_slide(d / "other.tiff", seed=21, spec=SMALL)
    return make_tile_store(d, {"a": demo_slide, "b": other})


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, store):
    out = tmp_path_factory.mktemp("emb") / "emb.zarr"
    extract_embeddings(
        "h0_mini_tiny", store, out, pooling="cls_mean", batch_size=4, num_workers=0, chunk_batches=2
    )
    return out


def test_embeddings_equal_a_direct_forward(store, embedded):
    emb = EmbeddingStore(embedded)
    tiles = TileStore(store)
    assert emb.embeddings.shape == (len(tiles), 128)
    loaded = load_model("h0_mini_tiny")
    transform = ModelTransform(loaded.spec.transform)
    x = torch.stack([transform(tiles[i]) for i in range(3)])
    with torch.inference_mode():
        tokens = loaded.model.forward_features(x)
    expected = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], 1).numpy()
    np.testing.assert_allclose(emb.embeddings[:3], expected, rtol=1e-5, atol=1e-6)


def test_provenance(embedded):
    prov = EmbeddingStore(embedded).attrs["provenance"]
    assert prov["model_id"] == "h0_mini_tiny" and prov["pooling"] == "cls_mean"
    assert prov["weights_digest"] == "random-init:0"
    assert prov["transform"]["mean"] == [0.707223, 0.578729, 0.703617]
    assert "torch" in prov["versions"] and prov["config_hash"]


def test_throughput_is_stored_with_the_load_it_was_measured_under(embedded):
    import os

    attrs = EmbeddingStore(embedded).attrs
    cond = attrs["throughput_conditions"]
    assert attrs["tiles_per_s"] > 0 and set(cond) == {
        "load_1min",
        "cpus",
        "torch_threads",
        "num_workers",
        "batch_size",
        "tiles_timed",
    }
    assert 1 <= cond["cpus"] <= os.cpu_count() and cond["torch_threads"] >= 1
    assert cond["load_1min"] >= 0 and cond["tiles_timed"] == len(EmbeddingStore(embedded).embeddings)


def test_kill_midway_then_resume_equals_uninterrupted(tmp_path, store, embedded):
    out = tmp_path / "killed.zarr"
    code = (
        "from histodistill.embed import extract_embeddings; "
        f"extract_embeddings('h0_mini_tiny', r'{store}', r'{out}', pooling='cls_mean', batch_size=4, "
        "num_workers=0, chunk_batches=2)"
    )
    result = run_killed(code, after_chunks=2)
    assert result.returncode == -9, result.stderr  # SIGKILL, as a scheduler would
    assert not out.exists()
    partial = zarr.open_group(tmp_path / "killed.zarr.partial", mode="r")
    assert partial.attrs["rows_done"] == 16 and partial.attrs["complete"] is False
    with pytest.raises(HistodistillError, match="not an embedding store"):
        EmbeddingStore(out)
    extract_embeddings(
        "h0_mini_tiny", store, out, pooling="cls_mean", batch_size=4, num_workers=0, chunk_batches=2
    )
    assert not (tmp_path / "killed.zarr.partial").exists()
    np.testing.assert_array_equal(EmbeddingStore(out).embeddings, EmbeddingStore(embedded).embeddings)


def test_patch_token_pooling_shape(tmp_path, store):
    out = tmp_path / "patch.zarr"
    extract_embeddings("uni_tiny", store, out, pooling="patch_tokens", batch_size=8, num_workers=0)
    assert EmbeddingStore(out).root["embeddings"].shape == (len(TileStore(store)), 196, 64)


def test_exporters(tmp_path, embedded, store):
    emb = EmbeddingStore(embedded)
    index = emb.index()
    files = export_plismbench(embedded, tmp_path / "plism")
    assert [f.parent.name for f in files] == ["a", "b"]
    table = np.load(files[0])
    rows = np.flatnonzero(index["slide_index"] == 0)
    assert table.shape == (len(rows), 3 + 128)
    assert (np.diff(table[:, 1]) >= 0).all()  # sorted by x …
    same_x = table[1:, 1] == table[:-1, 1]
    assert (np.diff(table[:, 2])[same_x] > 0).all()  # … then y
    first = rows[np.lexsort((index["y0"][rows], index["x0"][rows]))[0]]
    np.testing.assert_array_equal(table[0, 3:], emb.embeddings[first])
    assert table[0, 0] == 1  # read from pyramid level 1
    h5s = export_h5(embedded, tmp_path / "h5")
    with h5py.File(h5s[1], "r") as h5:
        assert h5["features"].shape == (int((index["slide_index"] == 1).sum()), 128)
        assert h5["coords"].shape[1] == 2 and h5["coords"].attrs["patch_size_level0"] == 448.0
