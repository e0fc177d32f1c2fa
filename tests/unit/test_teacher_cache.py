import shutil

import numpy as np
import pytest
import torch
import zarr

from histodistill.augment import VIEW_FIELDS, AugmentConfig, normalize, render, view_digest
from histodistill.distill.data import DistillDataset
from histodistill.errors import HistodistillError
from histodistill.models import load_model
from histodistill.shards import ShardRowReader
from histodistill.teacher_cache import (
    CACHE_FORMAT,
    TeacherCache,
    cache_teacher,
    create_row_array,
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
    assert (
        tc.attrs["bytes_per_tile_raw"] == 2 * (64 + 256 * 64) * 2 + 2 * 24 * 8
    )  # 23 view fields + the digest
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


def test_hed_jitter_is_stored_per_view_and_followed_by_the_students_local_crops(tmp_path, demo_store):
    """`teacher.hed_jitter`: every cached view holds its HED draws, the stored parameters rebuild the view
    the teacher saw (digest), and DistillDataset draws the local crops with the cache's recorded setting."""
    out = tmp_path / "hed.zarr"
    augment = AugmentConfig(hed_jitter=0.05)
    cache_teacher(
        TEACHER, demo_store, tmp_path / "shard.zarr", views=2, batch_size=8, num_workers=0, augment=augment
    )
    gather_teacher_cache([tmp_path / "shard.zarr"], out)
    tc, tiles = TeacherCache(out), TileStore(demo_store)
    assert tc.attrs["provenance"]["params"]["augment"]["hed_jitter"] == 0.05
    hed = VIEW_FIELDS.index("hed")
    for row in (0, len(tc) - 1):
        entry = tc.get(row)
        assert (entry["params"][:, hed] == 1).all()
        assert 0 < np.abs(entry["params"][:, hed + 1 :]).max() <= 0.05
        assert [view_digest(render(tiles[row], p)) for p in entry["params"]] == entry["view_digest"].tolist()
    data = DistillDataset(demo_store, out, n_local=2, seed=0, cached=True, photometric=False)
    assert data.augment == augment
    assert (data[(0, 0)]["locals_params"][:, hed] == 1).all()


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


def _copy_cache(demo_cache, dest):
    """The demo cache's manifest and shards copied under `dest` (the manifest names its shards relatively)."""
    for name in ("cache.zarr", "shard-0.zarr", "shard-1.zarr"):
        shutil.copytree(demo_cache.parent / name, dest / name)
    return dest / "cache.zarr"


def test_layout_is_one_tile_per_inner_chunk_and_one_write_block_per_shard_file(demo_cache):
    """Cache format 2: every per-tile array has inner chunks of one row (all views) and shard files of
    `batch_size · chunk_batches` rows (4 in the fixture), uncompressed; the format is in the attrs."""
    tc = TeacherCache(demo_cache)
    assert tc.attrs["cache_format"] == CACHE_FORMAT == 3
    for shard in tc.shards:
        assert shard.attrs["cache_format"] == CACHE_FORMAT
        for name in ("params", "view_digest", "cls", "patch"):
            array = shard[name]
            assert array.chunks == (1, *array.shape[1:]), name
            assert array.shards == (4, *array.shape[1:]), name
            assert array.compressors == (), name
            assert ShardRowReader(array).fast, name


def test_direct_row_reads_equal_zarr_reads(demo_cache):
    tc = TeacherCache(demo_cache)
    for row in range(len(tc)):
        entry = tc.get(row)
        k = int(row >= tc.attrs["rows"][1][0])
        i = row - tc.attrs["rows"][k][0]
        for name, value in entry.items():
            expected = tc.shards[k][name][i]
            assert value.dtype == expected.dtype and value.shape == expected.shape
            np.testing.assert_array_equal(value, expected)
    ranges = tc.read(1, len(tc) - 1, fields=("view_digest", "patch"))  # across both shards' files
    for name, value in ranges.items():
        expected = np.concatenate([s[name][:] for s in tc.shards])[1:-1]
        np.testing.assert_array_equal(value, expected)
    with pytest.raises(HistodistillError, match="outside the cache"):
        tc.get(len(tc))


def test_other_layouts_are_read_through_zarr(tmp_path):
    """A gzip-compressed array is not on the direct path (zstd is: the tile store's codec); its rows
    still read correctly (zarr's decoder)."""
    root = zarr.open_group(tmp_path / "z.zarr", mode="w", zarr_format=3)
    data = np.arange(5 * 2 * 3, dtype=np.float16).reshape(5, 2, 3)
    root.create_array("x", data=data, chunks=(1, 2, 3), shards=(4, 2, 3), compressors=zarr.codecs.GzipCodec())
    plain = create_row_array(root, "y", (5, 2, 3), "float16", 4)
    plain[:4] = data[:4]  # row 4's shard is never written: the fill value
    compressed, direct = ShardRowReader(root["x"]), ShardRowReader(root["y"])
    assert not compressed.fast and direct.fast and not direct.compressed
    np.testing.assert_array_equal(direct.read(1, 5)[:3], data[1:4])
    for i in range(5):
        np.testing.assert_array_equal(compressed[i], data[i])
        np.testing.assert_array_equal(direct[i], data[i] if i < 4 else np.zeros((2, 3), np.float16))


def test_online_reads_no_token_arrays(tmp_path, demo_store, demo_cache):
    """With the token arrays deleted, the view parameters (online mode's only need) still read, and the
    online DistillDataset still serves views; the cached one fails (so the deletion is real)."""
    cache = _copy_cache(demo_cache, tmp_path)
    for k in (0, 1):
        for name in ("cls", "patch"):
            shutil.rmtree(tmp_path / f"shard-{k}.zarr" / name)
    tc, reference = TeacherCache(cache), TeacherCache(demo_cache)
    for row in (0, len(tc) - 1):
        entry = tc.get(row, ("params",))
        assert set(entry) == {"params"}
        np.testing.assert_array_equal(entry["params"], reference.get(row)["params"])
    online = DistillDataset(demo_store, cache, 0, 0, cached=False)
    item = online[(1, 0)]
    assert item["globals"].shape[0] == 2 and "teacher_cls" not in item
    with pytest.raises((KeyError, FileNotFoundError)):
        DistillDataset(demo_store, cache, 0, 0, cached=True)[(1, 0)]


@pytest.mark.parametrize("target", ["cache.zarr", "shard-0.zarr"])
def test_an_old_format_cache_says_to_rebuild(tmp_path, demo_cache, target):
    """Format 1 caches have no `cache_format` attr; manifest and shard alike are refused, naming the rule."""
    _copy_cache(demo_cache, tmp_path)
    group = zarr.open_group(tmp_path / target, mode="r+")
    group.attrs.put({k: v for k, v in group.attrs.asdict().items() if k != "cache_format"})
    with pytest.raises(
        HistodistillError, match=r"cache format 1; .* reads format 3 .*rebuild.*cache_teacher"
    ):
        TeacherCache(tmp_path / target)
    if target == "shard-0.zarr":
        with pytest.raises(HistodistillError, match="cache format 1"):
            gather_teacher_cache(
                [tmp_path / "shard-0.zarr", tmp_path / "shard-1.zarr"], tmp_path / "new.zarr"
            )
    else:
        assert TeacherCache(tmp_path / "shard-0.zarr").attrs["cache_format"] == 3
