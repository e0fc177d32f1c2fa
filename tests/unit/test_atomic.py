"""Atomic writes: nothing at the target until complete, and files readable as the umask says."""

import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from histodistill.atomic import atomic_path


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_safetensors_file_takes_the_umask_not_its_writers_0600(tmp_path, umask_022):
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    assert _mode(bare) == 0o600  # what the writer does on its own: colleagues could not read it
    out = tmp_path / "student.safetensors"
    with atomic_path(out) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert _mode(out) == 0o644


def test_the_mode_follows_the_process_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "a.txt") == 0o640


def test_a_failed_write_leaves_no_target_and_no_temporary(tmp_path):
    out = tmp_path / "out.txt"
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


KILLED_WHILE_DELETING = """
import os, shutil, signal, sys
from pathlib import Path
from histodistill.atomic import atomic_path

def rmtree_then_die(path, *args, **kwargs):  # a job killed while deleting the old directory
    first = sorted(Path(path).iterdir())[0]
    first.unlink()
    os.kill(os.getpid(), signal.SIGKILL)

shutil.rmtree = rmtree_then_die
with atomic_path(sys.argv[1]) as tmp:
    tmp.mkdir()
    for name in ("a", "b", "c"):
        (tmp / name).write_text("new")
"""


def test_a_kill_while_replacing_a_directory_never_leaves_it_half_deleted(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "store.zarr"
    out.mkdir()
    for name in ("a", "b", "c"):
        (out / name).write_text("old")
    proc = subprocess.run([sys.executable, "-c", KILLED_WHILE_DELETING, str(out)], check=False)
    assert proc.returncode == -9  # it did die inside the deletion
    contents = {p.name: p.read_text() for p in out.iterdir()} if out.exists() else None
    # Absent or complete, never the old directory with a file missing.
    assert contents in (None, dict.fromkeys("abc", "new"), dict.fromkeys("abc", "old"))
