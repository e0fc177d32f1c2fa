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
from histodistill.tilestore import TileStore
from tests.helpers import TEACHER, run_killed


def test_views_rebuilt_from_stored_params_are_bitwise_what_the_teacher_saw(demo_store, demo_cache):
    """The digests were computed in the DataLoader process that fed the teacher; we rebuild here."""
    tc, tiles = TeacherCache(demo_cache), TileStore(demo_store)
    for row in range(len(tc)):
        entry = tc.get(row)
        rebuilt = [view_digest(render(tiles[row], p)) for p in entry["params"]]
        assert rebuilt == entry["view_digest"].tolist()


def test_cached_outputs_equal_a_fresh_forward_on_the_rebuilt_view(demo_store, demo_cache):
    """Tolerance: fp16 storage, |Δ| ≤ 2e-3 + 2e-3·|x| (fp16 has 11 bits of mantissa)."""
    tc, tiles = TeacherCache(demo_cache), TileStore(demo_store)
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


def test_manifest_and_sizes(demo_store, demo_cache):
    tc = TeacherCache(demo_cache)
    n = len(TileStore(demo_store))
    assert len(tc) == n and tc.attrs["rows"] == [[0, n // 2], [n // 2, n]]
    assert tc.get(n - 1)["patch"].shape == (2, 256, 64)
    assert tc.attrs["bytes_per_tile_raw"] == 2 * (64 + 256 * 64) * 2 + 2 * 17 * 8
    assert 0 < tc.attrs["bytes_per_tile_disk"] <= tc.attrs["bytes_per_tile_raw"] * 1.1


def test_shards_cover_the_store():
    assert [shard_range(10, k, 3) for k in range(3)] == [(0, 3), (3, 6), (6, 10)]
    with pytest.raises(HistodistillError):
        shard_range(10, 3, 3)


def test_gather_rejects_gaps(demo_store, demo_cache):
    with pytest.raises(HistodistillError, match="do not tile"):
        gather_teacher_cache([demo_store.parent / "shard-1.zarr"], demo_store.parent / "bad.zarr")


def test_pool2_and_no_patch_modes(tmp_path, demo_store):
    cache_teacher(
        TEACHER, demo_store, tmp_path / "p.zarr", views=1, patch_tokens="pool2", batch_size=8, num_workers=0
    )
    cache_teacher(
        TEACHER, demo_store, tmp_path / "n.zarr", views=1, patch_tokens="none", batch_size=8, num_workers=0
    )
    assert zarr.open_group(tmp_path / "p.zarr", mode="r")["patch"].shape[2] == 64
    assert "patch" not in zarr.open_group(tmp_path / "n.zarr", mode="r")
    x = torch.arange(16.0).reshape(1, 16, 1)  # a 4×4 grid
    assert pool_patches(x).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]


def test_kill_and_resume_equals_uninterrupted(tmp_path, demo_store, demo_cache):
    out = tmp_path / "shard-0.zarr"
    code = (
        "from histodistill.teacher_cache import cache_teacher; "
        f"cache_teacher('{TEACHER}', r'{demo_store}', r'{out}', views=2, shard=0, num_shards=2, batch_size=4, "
        "num_workers=0, chunk_batches=1)"
    )
    result = run_killed(code, after_chunks=1)
    assert result.returncode == -9 and not out.exists()
    cache_teacher(
        TEACHER, demo_store, out, views=2, shard=0, num_shards=2, batch_size=4, num_workers=0, chunk_batches=1
    )
    reference = zarr.open_group(demo_store.parent / "shard-0.zarr", mode="r")
    resumed = zarr.open_group(out, mode="r")
    for name in ("params", "view_digest", "cls", "patch"):
        np.testing.assert_array_equal(resumed[name][:], reference[name][:])
