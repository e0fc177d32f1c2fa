"""Direct reads of one row of a sharded Zarr v3 array: the one place that parses shard files by hand.

Both stores of the pipeline keep one row per inner chunk in sharded Zarr v3 arrays: the tile store
(`tilestore.py`: a zstd-compressed tile per inner chunk) and the teacher cache (`teacher_cache.py`: an
uncompressed row of view parameters or tokens). zarr-python 3.1 spends ~1–2 ms per single-row read in its
async machinery (more than the bytes and their decompression cost), so random-row readers (DataLoader
workers) read the shard files as the Zarr v3 sharding spec lays them out
(https://zarr-specs.readthedocs.io/en/latest/v3/codecs/sharding-indexed/v1.0.html): the index at the end
of the file, one (offset, nbytes) pair of little-endian uint64 per inner chunk, then a crc32c.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import zarr

from histodistill.errors import HistodistillError


class ShardRowReader:
    """Reads row i of a sharded Zarr v3 array with one row per inner chunk straight from its shard file.

    Per row: one 16-byte read of the shard index entry (offset, nbytes) and one read of the row's bytes
    (then, for a zstd inner codec, one decompression into the output, numcodecs' Zstd as zarr uses it),
    with no event loop and no index cache, so memory is flat in the array's size. Understood layouts: a
    local directory store, inner chunk (1, *row_shape), inner codecs `bytes` alone or `bytes` + `zstd`,
    index at the end with codecs `bytes` + `crc32c`. Any other layout (another codec, index at the start,
    an unsharded array, a store that is not a local directory) is read through zarr (`array[i]`); `fast`
    says which path is used. A chunk never written (absent from the index) or a shard file never
    written reads as the fill value, as in zarr. Deliberate deviation: the index checksum (crc32c) is
    not verified on this path (zarr verifies it); a row of the wrong size raises HistodistillError.
    """

    _EMPTY = 2**64 - 1

    def __init__(self, array: zarr.Array):
        from zarr.codecs import BytesCodec, ShardingCodec, ZstdCodec
        from zarr.storage import LocalStore

        self.array = array
        self.row_shape, self.dtype = tuple(array.shape[1:]), np.dtype(array.dtype).newbyteorder("<")
        codecs = array.metadata.codecs
        sharding = codecs[0] if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec) else None
        store = array.store_path.store
        inner = tuple(sharding.codecs) if sharding is not None else ()
        self.compressed = len(inner) == 2 and isinstance(inner[1], ZstdCodec)
        self.fast = (
            sharding is not None
            and isinstance(store, LocalStore)
            and tuple(sharding.chunk_shape) == (1, *self.row_shape)
            and len(inner) in (1, 2)
            and isinstance(inner[0], BytesCodec)
            and (len(inner) == 1 or self.compressed)
            and (self.dtype.itemsize == 1 or inner[0].endian is None or inner[0].endian.value == "little")
            and sharding.index_location.value == "end"
            and [type(c).__name__ for c in sharding.index_codecs] == ["BytesCodec", "Crc32cCodec"]
        )
        if self.fast:
            from numcodecs.zstd import Zstd

            self._zstd = Zstd() if self.compressed else None
            self.rows_per_shard = int(array.shards[0])
            self.root = Path(store.root) / array.store_path.path
            self.nbytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
            self.fill = np.full(self.row_shape, array.fill_value, self.dtype)

    def __getitem__(self, i: int) -> np.ndarray:
        """Row i [*row_shape] (a new array)."""
        if not self.fast:
            return self.array[int(i)]
        return self.read(int(i), int(i) + 1)[0]

    def read(self, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) [hi - lo, *row_shape]: per shard file, one read of the index entries, one per row."""
        if not self.fast:
            return self.array[lo:hi]
        out = np.empty((hi - lo, *self.row_shape), self.dtype)
        row = lo
        while row < hi:
            k, j = divmod(row, self.rows_per_shard)
            take = min(hi - row, self.rows_per_shard - j)
            self._read_shard(k, j, out[row - lo : row - lo + take])
            row += take
        return out

    def _read_shard(self, k: int, j: int, out: np.ndarray) -> None:
        """Rows j … j + len(out) of shard file k into `out`."""
        path = self.root / self.array.metadata.encode_chunk_key((k,) + (0,) * len(self.row_shape))
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            out[...] = self.fill  # a shard never written holds the fill value (Zarr semantics)
            return
        try:
            index_start = os.fstat(fd).st_size - 4 - 16 * self.rows_per_shard
            entries = np.frombuffer(os.pread(fd, 16 * len(out), index_start + 16 * j), "<u8").reshape(-1, 2)
            for r, (offset, nbytes) in enumerate(entries):
                if offset == self._EMPTY:
                    out[r] = self.fill
                    continue
                if self._zstd is not None:
                    raw = os.pread(fd, int(nbytes), int(offset))
                    if len(raw) != nbytes:
                        raise HistodistillError(f"{path}: short read of row {j + r}")
                    try:
                        self._zstd.decode(raw, out=memoryview(out[r]).cast("B"))
                    except RuntimeError as err:  # numcodecs: corrupt frame or a size other than the row's
                        raise HistodistillError(
                            f"{path}: row {j + r} does not decompress to {self.nbytes} bytes ({err})"
                        ) from err
                    continue
                if nbytes != self.nbytes:
                    raise HistodistillError(
                        f"{path}: row {j + r} holds {nbytes} bytes, expected {self.nbytes}"
                    )
                if os.preadv(fd, [memoryview(out[r]).cast("B")], int(offset)) != self.nbytes:
                    raise HistodistillError(f"{path}: short read of row {j + r}")
        finally:
            os.close(fd)
