import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from histodistill.augment import normalize, render, view_digest
from histodistill.errors import HistodistillError
from histodistill.models import load_model
from histodistill.teacher_cache import (
    TeacherCache,
    cache_teacher,
    gather_teacher_cache,
    pool_patches,
    shard_range,
)
from histodistill.tilestore import TileStore, pack_tiles
from histodistill.tiling import TilingConfig, tile_slide

TEACHER = "h_optimus_0_tiny"


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_slide):
    d = tmp_path_factory.mktemp("tc")
    tile_slide(demo_slide, "a", d / "a.parquet", TilingConfig(min_tissue=0.0))
    pack_tiles([d / "a.parquet"], d / "store.zarr", chunk_tiles=8)
    return d / "store.zarr"


@pytest.fixture(scope="module")
def cache(store):
    d = store.parent
    shards = [d / f"shard-{k}.zarr" for k in range(2)]
    for k, path in enumerate(shards):
        cache_teacher(
            TEACHER, store, path, views=2, shard=k, num_shards=2, batch_size=4, num_workers=0, chunk_batches=1
        )
    gather_teacher_cache(shards, d / "cache.zarr")
    return d / "cache.zarr"


def test_views_rebuilt_from_stored_params_are_bitwise_what_the_teacher_saw(store, cache):
    """The digests were computed in the DataLoader process that fed the teacher; we rebuild here."""
    tc, tiles = TeacherCache(cache), TileStore(store)
    for row in range(len(tc)):
        entry = tc.get(row)
        rebuilt = [view_digest(render(tiles[row], p)) for p in entry["params"]]
        assert rebuilt == entry["view_digest"].tolist()


def test_cached_outputs_equal_a_fresh_forward_on_the_rebuilt_view(store, cache):
    """Tolerance: fp16 storage, |Δ| ≤ 2e-3 + 2e-3·|x| (fp16 has 11 bits of mantissa)."""
    tc, tiles = TeacherCache(cache), TileStore(store)
    teacher = load_model(TEACHER)
    mean, std = teacher.spec.transform.mean, teacher.spec.transform.std
    for row in (0, len(tc) // 2, len(tc) - 1):
        entry = tc.get(row)
        views = torch.stack([normalize(render(tiles[row], p), mean, std) for p in entry["params"]])
        with torch.inference_mode():
            tokens = teacher.model.forward_features(views)
        np.testing.assert_allclose(
            entry["cls"].astype(np.float32), tokens[:, 0].numpy(), rtol=2e-3, atol=2e-3
        )
        np.testing.assert_allclose(
            entry["patch"].astype(np.float32), tokens[:, 5:].numpy(), rtol=2e-3, atol=2e-3
        )


def test_manifest_and_sizes(store, cache):
    tc = TeacherCache(cache)
    n = len(TileStore(store))
    assert len(tc) == n and tc.attrs["rows"] == [[0, n // 2], [n // 2, n]]
    assert tc.get(n - 1)["patch"].shape == (2, 256, 64)
    assert tc.attrs["bytes_per_tile_raw"] == 2 * (64 + 256 * 64) * 2 + 2 * 17 * 8
    assert 0 < tc.attrs["bytes_per_tile_disk"] <= tc.attrs["bytes_per_tile_raw"] * 1.1


def test_shards_cover_the_store():
    assert [shard_range(10, k, 3) for k in range(3)] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(HistodistillError):
        shard_range(10, 3, 3)


def test_gather_rejects_gaps(store, cache):
    with pytest.raises(HistodistillError, match="do not tile"):
        gather_teacher_cache([store.parent / "shard-1.zarr"], store.parent / "bad.zarr")


def test_pool2_and_no_patch_modes(tmp_path, store):
    cache_teacher(
        TEACHER, store, tmp_path / "p.zarr", views=1, patch_tokens="pool2", batch_size=8, num_workers=0
    )
    cache_teacher(
        TEACHER, store, tmp_path / "n.zarr", views=1, patch_tokens="none", batch_size=8, num_workers=0
    )
    assert zarr.open_group(tmp_path / "p.zarr", mode="r")["patch"].shape[2] == 64
    assert "patch" not in zarr.open_group(tmp_path / "n.zarr", mode="r")
    x = torch.arange(16.0).reshape(1, 16, 1)  # a 4×4 grid
    assert pool_patches(x).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_kill_and_resume_equals_uninterrupted(tmp_path, store, cache):
    out = tmp_path / "shard-0.zarr"
    code = (
        "from histodistill.teacher_cache import cache_teacher; "
        f"cache_teacher('{TEACHER}', r'{store}', r'{out}', views=2, shard=0, num_shards=2, batch_size=4, "
        "num_workers=0, chunk_batches=1)"
    )
    env = {**os.environ, "HISTODISTILL_KILL_AFTER_CHUNKS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == -9 and not out.exists()
    cache_teacher(
        TEACHER, store, out, views=2, shard=0, num_shards=2, batch_size=4, num_workers=0, chunk_batches=1
    )
    reference = zarr.open_group(store.parent / "shard-0.zarr", mode="r")
    resumed = zarr.open_group(out, mode="r")
    for name in ("params", "view_digest", "cls", "patch"):
        np.testing.assert_array_equal(resumed[name][:], reference[name][:])
