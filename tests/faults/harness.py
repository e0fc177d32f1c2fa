"""Fault injection: run a stage's job in a child process, SIGKILL it at seeded random points, rerun it, and
compare every artifact with an uninterrupted run's.

A stage is a few lines of Python run in a fresh interpreter (a CLI call or the one library call its workflow
script makes). The child writes a marker file once its imports are done; a kill comes a seeded random delay
after the marker, uniform over the uninterrupted run's working time (so imports, which write nothing, do not
eat the kills), or, for stages that honour `HISTODISTILL_KILL_AFTER_CHUNKS`, after a seeded random number of
chunks. After every kill each declared output must be absent or complete (equal to the uninterrupted run's):
nothing half-written may sit at a final path, where a rerun or Snakemake would take it as done.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from histodistill.resumable import KILL_HOOK

# Metadata that legitimately differs between two runs of the same job: wall-clock times and speeds.
VOLATILE_KEYS = frozenset({"created", "tiles_per_s", "samples_per_s"})
VOLATILE_COLUMNS = frozenset({"samples_per_s"})
TIMESTAMP = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[+-]\d{2}:\d{2}|Z)?")
# Single-threaded children: the same job gives the same floats (thread counts change reduction orders).
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
    "PYTHONHASHSEED": "0",
}


@dataclass(frozen=True)
class Stage:
    """One job: `code` (Python, run after `preload`'s imports) writes `outputs` (paths relative to the run's
    folder, which the code reads as `OUT`; its inputs as `INPUTS`). `chunk_kills`: the job writes through
    `ResumableStore`, so kills also land at chunk boundaries."""

    name: str
    preload: str
    code: str
    outputs: tuple[str, ...]
    chunk_kills: bool = False
    chunks: int = 0  # chunks an uninterrupted run writes (for the chunk kills)


@dataclass
class KillRecord:
    how: str  # "time 1.23 s" or "chunk 2"
    killed: bool  # False when the job finished before the kill point
    present: list[str] = field(default_factory=list)  # outputs present (and complete) after the kill


@dataclass
class StageResult:
    stage: str
    kills: list[KillRecord]
    identical: bool
    reference_s: float
    seconds: float
    stray: list[str]  # leftovers beside the outputs after the final rerun (temp names, .partial stores)
    detail: str = ""

    @property
    def landed(self) -> int:
        return sum(k.killed for k in self.kills)


# --------------------------------------------------------------------------------------------- running


def _script(stage: Stage, inputs: Path, out: Path) -> str:
    return "\n".join(
        [
            "import sys",
            "from pathlib import Path",
            f"INPUTS = Path({str(inputs)!r})",
            f"OUT = Path({str(out)!r})",
            textwrap.dedent(stage.preload),
            "Path(sys.argv[1]).write_text('ready')",
            textwrap.dedent(stage.code),
        ]
    )


def start(stage: Stage, inputs: Path, out: Path, env: dict[str, str] | None = None) -> tuple:
    """Start the job in its own process group; returns (process, marker path, log file)."""
    out.mkdir(parents=True, exist_ok=True)
    script = out.parent / f"{out.name}.job.py"
    script.write_text(_script(stage, inputs, out))
    marker = out.parent / f"{out.name}.ready"
    marker.unlink(missing_ok=True)
    log = open(out.parent / f"{out.name}.log", "ab")  # noqa: SIM115 (closed by the caller)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(marker)],
        env={**os.environ, **CHILD_ENV, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return proc, marker, log


def _wait_ready(proc: subprocess.Popen, marker: Path, timeout: float = 120.0) -> float:
    t0 = time.perf_counter()
    while not marker.exists():
        if proc.poll() is not None:
            break
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"{marker}: the job did not finish its imports in {timeout} s")
        time.sleep(0.005)
    return time.perf_counter()


def run_to_end(stage: Stage, inputs: Path, out: Path) -> float:
    """Run the job uninterrupted; returns its working time (after imports) in seconds."""
    proc, marker, log = start(stage, inputs, out)
    try:
        ready = _wait_ready(proc, marker)
        rc = proc.wait(timeout=600)
        work = time.perf_counter() - ready
    finally:
        log.close()
    if rc != 0:
        tail = (out.parent / f"{out.name}.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"stage {stage.name}: the job exited with {rc}\n{tail}")
    return work


def run_killed_at(
    stage: Stage, inputs: Path, out: Path, delay: float | None, chunk: int | None
) -> tuple[bool, float]:
    """Run the job and SIGKILL its process group `delay` s after its imports (or let the chunk hook kill it
    after `chunk` chunks); returns (True when it died by SIGKILL, False when it finished first; its working
    time in seconds)."""
    env = {KILL_HOOK: str(chunk)} if chunk else {}
    proc, marker, log = start(stage, inputs, out, env)
    try:
        ready = _wait_ready(proc, marker)
        if delay is not None:
            remaining = delay - (time.perf_counter() - ready)
            try:
                proc.wait(timeout=max(remaining, 0.0))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=600)
        work = time.perf_counter() - ready
    finally:
        log.close()
    if rc not in (0, -signal.SIGKILL):
        tail = (out.parent / f"{out.name}.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"stage {stage.name}: a rerun after a kill exited with {rc}\n{tail}")
    return rc == -signal.SIGKILL, work


def inject(
    stage: Stage, inputs: Path, work: Path, seed: int, kills: int = 4, max_tries: int = 10
) -> StageResult:
    """The reference run, then kills at seeded random points in one run folder (each start after the
    first resumes or redoes the killed one's work), then an uninterrupted rerun; compares every output.

    Stops trying after `kills` landed kills or `max_tries` starts (a start can finish before its kill
    point, e.g. a resumed job with little left to do)."""
    t_start = time.perf_counter()
    ref, run = work / "reference", work / "killed"
    reference_s = run_to_end(stage, inputs, ref)
    for name in stage.outputs:
        assert (ref / name).exists(), f"stage {stage.name}: the reference run wrote no {name}"
    rng = np.random.default_rng(seed)
    records: list[KillRecord] = []
    span = reference_s  # kill delays are drawn in [0, span); a start that finishes first narrows it
    for attempt in range(max_tries):
        if sum(r.killed for r in records) >= kills:
            break
        if stage.chunk_kills and stage.chunks > 1 and attempt % 2 == 1:
            chunk = int(rng.integers(1, stage.chunks))
            killed, _ = run_killed_at(stage, inputs, run, None, chunk)
            how = f"after chunk {chunk}"
        else:
            delay = float(rng.uniform(0.0, span))
            killed, took = run_killed_at(stage, inputs, run, delay, None)
            if not killed:  # the machine was slower during the reference run (or this start resumed)
                span = min(span, took)
            how = f"at {delay:.2f} s"
        present = []
        for name in stage.outputs:  # absent, or complete: never half-written at its final path
            if (run / name).exists():
                try:
                    assert_same(ref / name, run / name)
                except AssertionError as exc:
                    raise AssertionError(
                        f"stage {stage.name}: after a kill {how}, {name} exists but is not the complete "
                        f"artifact: {exc}"
                    ) from exc
                present.append(name)
        for name in stage.outputs:  # a resumable store's rows marked done are the finished rows
            if (run / f"{name}.partial" / "zarr.json").exists():
                _same_done_rows(ref / name, run / f"{name}.partial", f"{stage.name}, after a kill {how}")
        records.append(KillRecord(how, killed, present))
    run_to_end(stage, inputs, run)
    identical, detail = True, ""
    for name in stage.outputs:
        try:
            assert_same(ref / name, run / name)
        except AssertionError as exc:
            identical, detail = False, f"{name}: {exc}"
            break
    stray = sorted(str(p.relative_to(run)) for p in _stray(run))
    return StageResult(
        stage.name, records, identical, reference_s, time.perf_counter() - t_start, stray, detail
    )


def _stray(folder: Path) -> Iterable[Path]:
    """Temporary siblings (atomic_path's `.NAME.tmp-*`, Zarr's `*.HEX.partial`) and `.partial` stores."""
    for p in folder.rglob("*"):
        if re.match(r"^\..+\.tmp-\d+-[0-9a-f]+$", p.name) or p.name.endswith(".partial"):
            yield p


# ------------------------------------------------------------------------------------------- comparing


def _drop_volatile(value):
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if k not in VOLATILE_KEYS}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def _same_meta(a, b, what: str) -> None:
    a, b = _drop_volatile(a), _drop_volatile(b)
    assert a == b, f"{what} differs: {a!r} != {b!r}"


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_same(ref: Path, got: Path) -> None:
    """AssertionError unless `got` is the same artifact as `ref`: Zarr stores array by array (and the same
    files, so no stray temporary is inside), Parquet frames and their metadata, PNG pixels, JSON values,
    safetensors tensors, HTML text; timestamps and speeds (VOLATILE_KEYS, TIMESTAMP) excepted."""
    assert got.exists(), f"{got} does not exist"
    if ref.is_dir():
        assert got.is_dir(), f"{got} is not a folder"
        assert _files(ref) == _files(got), f"files differ: {_files(ref)} != {_files(got)}"
        if ref.suffix == ".zarr" or (ref / "zarr.json").exists():
            _same_zarr(ref, got)
        else:
            for name in _files(ref):
                assert_same(ref / name, got / name)
        return
    suffix = ref.suffix
    if suffix == ".parquet":
        _same_parquet(ref, got)
    elif suffix == ".png":
        from PIL import Image

        with Image.open(ref) as a, Image.open(got) as b:
            assert a.size == b.size and a.mode == b.mode, f"{got}: {b.size} {b.mode} != {a.size} {a.mode}"
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"{got}: pixels differ"
    elif suffix == ".json":
        _same_meta(json.loads(ref.read_text()), json.loads(got.read_text()), str(got))
    elif suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(ref, "np") as a, safe_open(got, "np") as b:
            assert sorted(a.keys()) == sorted(b.keys()), f"{got}: tensor names differ"
            for k in a.keys():  # noqa: SIM118 (safe_open is not a mapping)
                assert np.array_equal(a.get_tensor(k), b.get_tensor(k)), f"{got}: tensor {k} differs"
            _same_meta(a.metadata(), b.metadata(), f"{got} metadata")
    elif suffix == ".html":
        a = TIMESTAMP.sub("<time>", ref.read_text(encoding="utf-8"))
        b = TIMESTAMP.sub("<time>", got.read_text(encoding="utf-8"))
        assert a == b, f"{got}: the page differs (beyond timestamps)"
    else:
        assert ref.read_bytes() == got.read_bytes(), f"{got}: bytes differ"


def _same_parquet(ref: Path, got: Path) -> None:
    import pyarrow.parquet as pq

    try:
        b_table = pq.read_table(got)
    except Exception as exc:  # a truncated file: pyarrow's errors vary (ArrowInvalid, OSError)
        raise AssertionError(f"{got} is not readable Parquet: {exc}") from exc
    a_table = pq.read_table(ref)
    a, b = a_table.to_pandas(), b_table.to_pandas()
    drop = [c for c in a.columns if c in VOLATILE_COLUMNS]
    pd.testing.assert_frame_equal(a.drop(columns=drop), b.drop(columns=drop, errors="ignore"))
    meta_a = (a_table.schema.metadata or {}).get(b"histodistill")
    meta_b = (b_table.schema.metadata or {}).get(b"histodistill")
    _same_meta(
        json.loads(meta_a) if meta_a else None, json.loads(meta_b) if meta_b else None, f"{got} provenance"
    )


def _same_zarr(ref: Path, got: Path) -> None:
    import zarr

    a, b = zarr.open_group(ref, mode="r"), zarr.open_group(got, mode="r")
    _same_meta(dict(a.attrs), dict(b.attrs), f"{got} attributes")
    names_a = sorted(name for name, _ in a.arrays())
    assert names_a == sorted(name for name, _ in b.arrays()), f"{got}: arrays differ"
    for name in names_a:
        x, y = a[name][...], b[name][...]
        assert x.dtype == y.dtype and x.shape == y.shape, (
            f"{got}/{name}: {y.dtype}{y.shape} != {x.dtype}{x.shape}"
        )
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f"{got}/{name}: values differ"
        _same_meta(dict(a[name].attrs), dict(b[name].attrs), f"{got}/{name} attributes")
    for name, _ in a.groups():
        _same_zarr(ref / name, got / name)


def _same_done_rows(ref: Path, partial: Path, where: str) -> None:
    """AssertionError unless the rows a partial store records as done (`rows_done`) equal the finished
    store's: a resume starts after them, so a half-written row counted as done would survive into the result."""
    import zarr

    a, b = zarr.open_group(ref, mode="r"), zarr.open_group(partial, mode="r")
    done = int(b.attrs["rows_done"])
    for name, array in b.arrays():
        if array.ndim and array.shape[0] == a[name].shape[0]:
            x, y = a[name][:done], array[:done]
            assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), (
                f"{where}: {partial}/{name} rows 0–{done} are marked done but differ from the finished store's"
            )


# -------------------------------------------------------------------------------------------- the table


def table(results: list[StageResult]) -> str:
    """The kill table: stage, kills landed (of starts), identical, outputs seen complete after kills, time."""
    rows = [
        "| stage | kills | identical | complete outputs seen after a kill | stray files | reference s | total s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        seen = sum(len(k.present) for k in r.kills if k.killed)
        rows.append(
            f"| {r.stage} | {r.landed} (of {len(r.kills)} starts) | {'yes' if r.identical else 'no'} | {seen} "
            f"| {len(r.stray)} | {r.reference_s:.1f} | {r.seconds:.1f} |"
        )
    return "\n".join(rows)
