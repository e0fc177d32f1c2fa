"""Resumable Zarr outputs: rows written chunk by chunk into `OUT.partial`, renamed to OUT when complete.

The partial store records `rows_done` after each chunk is on disk, and its settings' hash: a rerun with
the same settings resumes at `rows_done`; other settings start over. OUT itself is never partial.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr

from histodistill.atomic import atomic_path, replace_path

log = logging.getLogger(__name__)
KILL_HOOK = "HISTODISTILL_KILL_AFTER_CHUNKS"  # tests: SIGKILL this process after writing N chunks


class ResumableStore:
    def __init__(self, out: str | Path, meta: dict, create: Callable[[zarr.Group], None]):
        """Open `OUT.partial` (resuming when its config hash equals `meta['config_hash']`) or create it.

        `create(group)` makes the arrays of a new store; `meta` goes to attrs['provenance'].
        """
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self._kill_after = int(os.environ.get(KILL_HOOK, "0"))
        self._chunks = 0
        if (self.partial / "zarr.json").exists():
            root = zarr.open_group(self.partial, mode="r+")
            if root.attrs.get("provenance", {}).get("config_hash") == meta["config_hash"]:
                self.root = root
                log.info("resuming %s at row %d", self.partial, self.rows_done)
                return
            log.info("discarding %s (written with other settings)", self.partial)
            shutil.rmtree(self.partial)
        with atomic_path(self.partial) as tmp:  # the partial store appears complete-or-not-at-all
            group = zarr.open_group(tmp, mode="w", zarr_format=3)
            create(group)
            group.attrs.update({"provenance": meta, "rows_done": 0, "complete": False})
        self.root = zarr.open_group(self.partial, mode="r+")

    @property
    def rows_done(self) -> int:
        return int(self.root.attrs["rows_done"])

    def write(self, arrays: dict[str, np.ndarray]) -> int:
        """Write the next block of rows of each named array; then record them as done."""
        start = self.rows_done
        sizes = {len(a) for a in arrays.values()}
        assert len(sizes) == 1, sizes
        (n,) = sizes
        for name, block in arrays.items():
            self.root[name][start : start + n] = block
        self.root.attrs["rows_done"] = start + n
        self._chunks += 1
        if self._kill_after and self._chunks >= self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return start + n

    def finish(self, **attrs) -> Path:
        self.root.attrs.update({**attrs, "complete": True})
        replace_path(self.partial, self.out)  # OUT is absent or complete, even if killed here
        return self.out
