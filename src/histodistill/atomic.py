"""Atomic writes: every artifact is written under a temporary name beside its target and renamed.

A crash (or a killed job) therefore never leaves a half-written file or directory at the final path,
so a rerun never trusts a partial artifact. A file lands with the mode the process umask gives a new file
(0644 under the usual 022), whatever its writer chose: some writers (safetensors) create files 0600, which
colleagues sharing a results folder could not read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def replace_path(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move `src` onto `target`, a file or a directory, so that `target` is never partial.

    `os.replace` is atomic for a file, but cannot replace a non-empty directory; deleting the old directory
    first would leave a half-deleted one at `target` if the process is killed meanwhile. So an existing
    directory is first renamed aside (one atomic rename), then `src` takes its place, then the old one is
    deleted: a kill in between leaves `target` absent or complete (and the old copy under a temporary name).
    """
    src, target = Path(src), Path(target)
    if target.is_dir() and not target.is_symlink():
        old = _temp_sibling(target)
        os.replace(target, old)
        os.replace(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, target)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it onto `path`, on failure delete it.

    Works for files and for directories (e.g. a Zarr store). An existing target is replaced.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target)
    try:
        yield tmp
        if tmp.is_file() and not tmp.is_symlink():
            os.chmod(tmp, 0o666 & ~_umask())
        replace_path(tmp, target)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise
