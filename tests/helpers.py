"""Builders the tests share: tile stores from slides, teacher caches from stores, and killed runs.

Fixtures in `tests/conftest.py` build the common ones once per session; a test that needs other settings
calls these directly.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from histodistill.teacher_cache import cache_teacher, gather_teacher_cache
from histodistill.tilestore import pack_tiles
from histodistill.tiling import TilingConfig, tile_slide

TEACHER = "h_optimus_0_tiny"
ALL_TILES = TilingConfig(min_tissue=0.0)  # every grid tile, so a small slide gives enough rows


def make_tile_store(
    out_dir: Path, slides: Mapping[str, Path], tiling: TilingConfig = ALL_TILES, chunk_tiles: int = 8
) -> Path:
    """Tile each slide (`{slide_id: path}`) into `out_dir/<slide_id>.parquet` and pack them into
    `out_dir/store.zarr`; returns the store's path."""
    tables = []
    for slide_id, path in slides.items():
        tile_slide(path, slide_id, out_dir / f"{slide_id}.parquet", tiling)
        tables.append(out_dir / f"{slide_id}.parquet")
    pack_tiles(tables, out_dir / "store.zarr", chunk_tiles=chunk_tiles)
    return out_dir / "store.zarr"


def make_teacher_cache(
    store: Path, out_dir: Path, *, views: int = 2, num_shards: int = 1, teacher: str = TEACHER, **kwargs
) -> Path:
    """The teacher cache of `store`: shards `out_dir/shard-<k>.zarr` gathered into `out_dir/cache.zarr`.

    `kwargs` go to `cache_teacher` (batch_size, chunk_batches, patch_tokens, …); workers are 0."""
    shards = [out_dir / f"shard-{k}.zarr" for k in range(num_shards)]
    for k, path in enumerate(shards):
        cache_teacher(
            teacher, store, path, views=views, shard=k, num_shards=num_shards, num_workers=0, **kwargs
        )
    gather_teacher_cache(shards, out_dir / "cache.zarr")
    return out_dir / "cache.zarr"


def run_killed(code: str, after_chunks: int) -> subprocess.CompletedProcess:
    """Run Python `code` in a fresh process that SIGKILLs itself after writing `after_chunks` chunks
    (`HISTODISTILL_KILL_AFTER_CHUNKS`, honoured by the resumable writers), as a scheduler would kill a job."""
    env = {**os.environ, "HISTODISTILL_KILL_AFTER_CHUNKS": str(after_chunks)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)


def overlay_dry_run_jobs(workdir: Path, overlay: str, targets: list[str]) -> list[dict[str, str]]:
    """`snakemake -n TARGETS` in `workdir` (a fresh directory, given the repository's config.yaml and
    configs/) with config.yaml plus configs/`overlay`; its jobs (`dry_run_jobs`). Fails the test, with the
    end of Snakemake's output, if the dry run fails."""
    repo = Path(__file__).resolve().parents[1]
    shutil.copytree(repo / "configs", workdir / "configs")
    shutil.copy(repo / "config.yaml", workdir / "config.yaml")
    configfiles = [str(workdir / "config.yaml"), str(workdir / "configs" / overlay)]
    run = subprocess.run(
        [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(workdir), "-n"]
        + ["--cores", "1", "--configfile", *configfiles, "--", *targets],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(repo / "src")},
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return dry_run_jobs(run.stdout)


def dry_run_jobs(stdout: str) -> list[dict[str, str]]:
    """The jobs of a `snakemake -n` listing: {"rule": name, "input": ..., "wildcards": ...} per job (a job
    is a `rule <name>:` line and the indented `key: value` lines under it)."""
    jobs: list[dict[str, str]] = []
    for line in stdout.splitlines():
        if line.startswith(("rule ", "localrule ")):
            jobs.append({"rule": line.split()[-1].rstrip(":")})
        elif jobs and line.startswith("    ") and ": " in line:
            key, value = line.strip().split(": ", 1)
            jobs[-1].setdefault(key, value)
    return jobs
