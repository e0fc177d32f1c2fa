"""Benchmark report: the leaderboard table and one self-contained HTML page from the scorers' tidy files.

`build_report` reads each benchmark's per-model Parquet file and summarises it with the benchmark's own
summary function (so the report shows exactly the published protocol's numbers). It knows no benchmark by
name: it iterates over the registry (`histodistill.bench.registry.benchmarks()`), whose declarations give
each benchmark's columns, summary, leaderboard headline, figures and section. It writes `leaderboard.parquet`
(one row per model, provenance in the metadata), `figures/*.png` and `index.html`, all atomically and
`index.html` last. A benchmark or a model that is absent shows as NaN in the leaderboard and "–" in the
page. A mean over tasks is only given for a model that has every task of that benchmark: a mean over
fewer tasks would not be comparable with the others.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from histodistill import __version__
from histodistill.atomic import atomic_path
from histodistill.bench import BenchmarkError
from histodistill.bench.plism import N_BOOT
from histodistill.bench.registry import Benchmark, Figure, benchmarks
from histodistill.config import REPORT_CONFIG_KEYS
from histodistill.provenance import config_hash, library_versions, provenance, read_parquet, write_parquet
from histodistill.report import distillation, figures, paired
from histodistill.report import html as page
from histodistill.report.model_card import FLOP_CONVENTION, count_flops, model_profile

__all__ = [
    "ReportError",
    "build_report",
    "count_flops",
    "leaderboard",
    "model_profile",
    "read_tidy",
    "run",
    "summarize_benchmarks",
]

log = logging.getLogger(__name__)


BOOT_SEED = 0
MODEL_COLUMNS = ("params_m", "gflops", "tiles_per_s", "device", "status")
CONFIG_KEYS = REPORT_CONFIG_KEYS
LABELS = {
    "model": "model",
    "params_m": "params (M)",
    "gflops": "GFLOPs @224",
    "tiles_per_s": "tiles/s",
    "device": "device",
    "status": "status",
}


class ReportError(BenchmarkError):
    """A score file given to the report is missing, unreadable or lacks the benchmark's columns."""


# ----------------------------------------------------------------------------------------------- reading


def _benchmark(name: str) -> Benchmark:
    known = benchmarks()
    if name not in known:
        raise ReportError(f"unknown benchmark {name!r}; known: {list(known)}")
    return known[name]


def read_tidy(path: str | os.PathLike, benchmark: str, model: str) -> tuple[pd.DataFrame, dict | None]:
    """One model's tidy score file and its provenance (None when the file carries none).

    Raises ReportError when the file is missing, unreadable, or lacks the benchmark's columns.
    """
    path = Path(path)
    who = f"{benchmark} scores of model {model!r}"
    bench = _benchmark(benchmark)
    if not path.is_file():
        raise ReportError(f"{who}: {path} does not exist (run the {bench.rule} rule first)")
    frame, prov = read_parquet(path, who, ReportError, required=False)
    if missing := bench.columns - set(frame.columns):
        raise ReportError(f"{who}: {path} lacks column(s) {sorted(missing)}; is it a {benchmark} score file?")
    return frame, prov


# ----------------------------------------------------------------------------------------------- summaries


def summarize_benchmarks(
    scores: Mapping[str, Mapping[str, str | os.PathLike]], n_boot: int = N_BOOT
) -> tuple[dict[str, pd.DataFrame], list[dict[str, Any]]]:
    """Per benchmark, the concatenated per-model summaries (a `model` column first), and the inputs read.

    `n_boot` is the number of cluster-bootstrap replicates of the PLISM CIs (0: no CIs, NaN bounds).
    An empty score file counts as the model being absent from that benchmark (with a warning).
    """
    known = benchmarks()
    if unknown := sorted(set(scores) - set(known)):
        raise ReportError(f"unknown benchmark(s) {unknown} in the report's scores; known: {list(known)}")
    settings = {"plism": {"n_boot": n_boot, "boot_seed": BOOT_SEED}}
    summaries: dict[str, pd.DataFrame] = {}
    inputs: list[dict[str, Any]] = []
    for name, bench in known.items():
        if name not in scores or bench.derive is not None:
            continue
        parts = []
        for model, path in scores[name].items():
            model = str(model)
            frame, prov = read_tidy(path, name, model)
            try:
                if bench.model_rows is not None:
                    frame = bench.model_rows(frame, model, Path(path))
            except BenchmarkError as exc:
                raise ReportError(str(exc)) from exc
            prov = prov or {}
            inputs.append(
                {
                    "benchmark": name,
                    "model": model,
                    "file": Path(path).name,
                    "rows": len(frame),
                    "config_hash": prov.get("config_hash"),
                    "histodistill_version": prov.get("histodistill_version"),
                }
            )
            if frame.empty:
                log.warning("%s scores of model %r (%s) are empty; shown as missing", name, model, path)
                continue
            try:
                summary = bench.summarize(frame, **settings.get(name, {}))
            except BenchmarkError as exc:
                raise ReportError(f"{name} scores of model {model!r} ({path}): {exc}") from exc
            parts.append(summary.assign(model=model))
        if parts:
            frame = pd.concat(parts, ignore_index=True)
            summaries[name] = frame[["model", *[c for c in frame.columns if c != "model"]]]
        else:
            summaries[name] = pd.DataFrame(columns=["model"])
    for name, bench in known.items():  # derived benchmarks (the EVA average): from the others' summaries
        if bench.derive is not None and len(derived := bench.derive(summaries)):
            summaries[name] = derived
    return summaries, inputs


# ----------------------------------------------------------------------------------------------- leaderboard


def leaderboard(
    summaries: Mapping[str, pd.DataFrame],
    models: Mapping[str, Mapping[str, Any]] | None,
    order: list[str],
) -> pd.DataFrame:
    """One row per model: size columns, `status`, then each present benchmark's headline numbers (NaN if absent).

    `status` is "ok", or "collapsed / uninformative: <reasons>" when a benchmark's `flags` name the model.
    A benchmark whose flags name every model it scored (two or more) judges its task, not the models: a task
    at chance for every model, e.g. a demo task none of them can read, flags none of them; such benchmarks
    are listed in `board.attrs["uninformative"]` ({name: one model's reason}) and named in the report.
    """
    models = models or {}
    board = pd.DataFrame({"model": pd.Series(order, dtype="str")})
    for col in MODEL_COLUMNS[:3]:
        board[col] = [_as_float(models.get(m, {}).get(col)) for m in order]
    board["device"] = pd.Series([_as_str(models.get(m, {}).get("device")) for m in order], dtype="str")
    flags: dict[str, list[str]] = {}
    uninformative: dict[str, str] = {}
    for name, bench in benchmarks().items():
        if name in summaries and bench.flags is not None:
            named = bench.flags(summaries[name], order)
            scored = set(summaries[name]["model"]) & set(order) if "model" in summaries[name] else set()
            if len(scored) >= 2 and scored <= set(named):
                uninformative[name] = next(iter(named.values()))
                continue
            for model, reason in named.items():
                flags.setdefault(model, []).append(reason)
    board["status"] = pd.Series(
        ["collapsed / uninformative: " + "; ".join(flags[m]) if m in flags else "ok" for m in order],
        dtype="str",
    )
    for name, bench in benchmarks().items():
        if name in summaries:
            headline = bench.headline(summaries[name], order)
            if stray := [c for c in headline.columns if not c.startswith(name + "_")]:
                raise ReportError(
                    f"benchmark {name!r}: leaderboard column(s) {stray} must start with '{name}_'"
                )
            for col in headline.columns:
                board[col] = headline[col].to_numpy()
    board.attrs["uninformative"] = uninformative
    return board


def error_board(summaries: Mapping[str, pd.DataFrame], order: list[str]) -> pd.DataFrame:
    """The standard errors of the leaderboard's numbers, in its layout: a `model` column (`order`), then each
    present benchmark's `errors` columns (`Benchmark.errors`; a benchmark without one adds none: its
    numbers are not judged)."""
    out = pd.DataFrame({"model": pd.Series(order, dtype="str")})
    for name, bench in benchmarks().items():
        if name in summaries and bench.errors is not None:
            errors = bench.errors(summaries[name], order)
            for col in errors.columns:
                out[col] = errors[col].to_numpy(dtype=float)
    return out


def _as_float(value: Any) -> float:
    try:
        return float(value) if value is not None else np.nan
    except (TypeError, ValueError):
        return np.nan


def _as_str(value: Any) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def _model_order(scores: Mapping[str, Mapping[str, Any]], models: Mapping[str, Any] | None) -> list[str]:
    order = [str(m) for m in (models or {})]
    for name in benchmarks():
        order += [str(m) for m in scores.get(name, {})]
    return list(dict.fromkeys(order))


# ----------------------------------------------------------------------------------------------- sections


def _size_section(board: pd.DataFrame, models: Mapping[str, Mapping[str, Any]] | None) -> str:
    conventions = {str(v.get("flop_convention")) for v in (models or {}).values() if v.get("flop_convention")}
    rows = [
        [
            r.model,
            page.fmt(r.params_m, 1),
            page.fmt(r.gflops, 2),
            page.fmt(r.tiles_per_s, 1),
            page.fmt(r.device),
        ]
        for r in board.itertuples(index=False)
    ]
    for row, model in zip(rows, board["model"], strict=True):
        row.append(
            page.fmt(throughput_conditions((models or {}).get(model, {}).get("throughput_conditions")))
        )
    body = page.table(["model", "params (M)", "GFLOPs @224", "tiles/s", "device", "measured under"], rows)
    body += page.note(
        "GFLOPs of one 224 × 224 forward pass: "
        + ("; ".join(sorted(conventions)) if conventions else FLOP_CONVENTION)
        + ". Throughput (tiles/s) is that of the model's embedding run, on the device shown and under the "
        "load shown (the machine's 1-minute load average against the CPUs the run could use; BUSY when the "
        "load exceeded them, so other work shared the machine): it is a measurement of that run, not a "
        "property of the model, and compares across models only under like conditions; – where not measured."
    )
    return body


def throughput_conditions(conditions: Mapping[str, Any] | None) -> str | None:
    """One line for the load a throughput was measured under (`histodistill.embed`'s
    `throughput_conditions`), e.g. "load 3.1 on 2 CPUs (BUSY), 2 torch threads, batch 32, 0 workers,
    120 tiles"; None when not recorded."""
    if not conditions:
        return None
    parts = []
    load, cpus = conditions.get("load_1min"), conditions.get("cpus")
    if load is not None and cpus:
        parts.append(
            f"load {float(load):.1f} on {int(cpus)} CPUs"
            + (" (BUSY)" if distillation.busy(conditions) else "")
        )
    for key, label in (
        ("torch_threads", "torch threads"),
        ("batch_size", "batch"),
        ("num_workers", "workers"),
    ):
        if conditions.get(key) is not None:
            parts.append(f"{conditions[key]} {label}" if key != "batch_size" else f"batch {conditions[key]}")
    if conditions.get("tiles_timed") is not None:
        parts.append(f"{conditions['tiles_timed']} tiles")
    return ", ".join(parts) or None


def _provenance_block(
    config: Mapping[str, Any] | None,
    inputs: list[dict[str, Any]],
    run_hash: str | None,
    created: str,
    skipped_slides: Sequence[Mapping[str, str]] = (),
) -> str:
    versions = {**library_versions(), **_versions("pandas", "matplotlib", "scikit-learn")}
    items: list[tuple[str, Any]] = [
        ("created (UTC)", created),
        ("config hash (of the settings below)", run_hash or "\u2013"),
        ("histodistill", __version__),
        ("libraries", ", ".join(f"{k} {v}" for k, v in versions.items())),
    ]
    for key in CONFIG_KEYS:
        found, value = _lookup(config or {}, key)
        if found:
            items.append((f"config: {key}", value))
    body = ""
    if skipped_slides:
        body += page.note(
            f"{len(skipped_slides)} slide(s) of the sample sheet were skipped: their file does not exist "
            "(on_missing_slide: skip)."
        )
        body += page.table(["slide", "path"], [[s["slide_id"], s["path"]] for s in skipped_slides], n_keys=2)
    body += page.key_values(items)
    if inputs:
        rows = [
            [
                i["benchmark"],
                i["model"],
                i["file"],
                str(i["rows"]),
                i["config_hash"] or "\u2013",
                i["histodistill_version"] or "\u2013",
            ]
            for i in inputs
        ]
        body += page.details(
            f"score files ({len(inputs)})",
            page.table(["benchmark", "model", "file", "rows", "config hash", "histodistill"], rows, n_keys=3),
        )
    if config:
        body += page.details(
            "report settings (each score file carries its own config hash)",
            page.pre(json.dumps(config, indent=1, sort_keys=True, default=str)),
        )
    return body


def _lookup(config: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _leaderboard_labels(board: pd.DataFrame) -> dict[str, str]:
    labels = dict(LABELS)
    for name, bench in benchmarks().items():
        labels |= {col: bench.label(col) for col in board.columns if col.startswith(name + "_")}
    return {col: labels.get(col, col) for col in board.columns}


# ----------------------------------------------------------------------------------------------- entry point


def build_report(
    scores: dict[str, dict[str, str | Path]],
    out_dir: str | Path,
    models: dict[str, dict] | None = None,
    config: dict | None = None,
    title: str = "histodistill benchmarks",
    n_boot: int = N_BOOT,
    skipped_slides: Sequence[Mapping[str, str]] = (),
    roles: distillation.DistillationRoles | None = None,
    paired_runs: Mapping[str, Mapping[str, Any]] | None = None,
    plism_reference: str | None = None,
    tissue_holdout: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Write `out_dir/leaderboard.parquet`, `out_dir/figures/*.png` and `out_dir/index.html`; return the board.

    `roles` (teacher, students and their random-init baselines; `distillation.roles`) writes
    `out_dir/distillation.parquet` (one row per student and score column: the three values and the
    recovery, `distillation.recovery_table`; no rows without a reported teacher and student) and, when
    both are reported, adds the distillation section.

    `paired_runs` {student model: its run's `pairing`, `teacher_mode`, `objective`, `seed`} adds the paired-view
    section (`report.paired`: the seed paper's Tables 1–2, linear probe and held-out PLISM top-1) when a run
    is paired; `plism_reference` (plism.reference) tells the unpaired control (student side = reference);
    `tissue_holdout` (plism.tissue_holdout) describes the held-out tissues there.

    `skipped_slides` (`slide_id`, `path`): sample-sheet slides left out because their file was missing
    (`on_missing_slide: skip`); the page lists them first, so no result hides a missing slide.

    `scores[benchmark][model]` is that model's tidy score file; `models[model]` holds params_m, gflops,
    tiles_per_s and device (see `model_profile`); `config` is the run's config, hashed into the provenance;
    `n_boot` is the number of cluster-bootstrap replicates of the PLISM CIs (benchmarks.plism.n_boot).
    """
    out_dir = Path(out_dir)
    scores = {str(b): dict(v) for b, v in (scores or {}).items()}
    order = _model_order(scores, models)
    colors = figures.model_colors(order)
    summaries, inputs = summarize_benchmarks(scores, n_boot)
    board = leaderboard(summaries, models, order)
    run_hash = config_hash(config) if config is not None else None
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")

    known = benchmarks()
    figs: dict[str, list[Figure]] = {name: [] for name in known}
    with atomic_path(out_dir / "figures") as fig_dir:
        fig_dir.mkdir(parents=True)
        for name, bench in known.items():
            summary = summaries.get(name)
            if bench.figures is not None and summary is not None and len(summary):
                figs[name] = bench.figures(summary, fig_dir, colors)

    params = {
        "config_hash": run_hash,
        "inputs": {
            b: {
                m: next((i["config_hash"] for i in inputs if i["benchmark"] == b and i["model"] == m), None)
                for m in v
            }
            for b, v in scores.items()
        },
        "models": models or {},
        "n_boot": n_boot,
        "boot_seed": BOOT_SEED,
        "skipped_slides": list(skipped_slides),
    }
    meta = provenance(params, artifact="leaderboard", created=created)
    write_parquet(board, out_dir / "leaderboard.parquet", meta)

    labels = _leaderboard_labels(board)
    shown = board.drop(columns=["gflops", "tiles_per_s", "device"])
    unranked = {
        c for name, b in known.items() for c in shown.columns if c.startswith(name + "_") and b.unranked(c)
    }
    higher_better = {c for c in shown.columns if c not in ("model", *MODEL_COLUMNS)} - unranked
    flagged = board.loc[board["status"] != "ok", "model"].tolist()
    lead = page.model_legend(colors) + page.leaderboard_table(shown, labels, higher_better, flagged)
    lead += page.note(
        "Bold: best per column among the models not flagged. –: no scores (for a mean over tasks: at least "
        "one task missing). status: a model is flagged collapsed / uninformative when a benchmark's own "
        "numbers say its embeddings cannot tell inputs apart (PLISM: different tiles embedded almost "
        "alike; probes and the mitosis linear probe: balanced accuracy at chance, i.e. at most 1/K + "
        "max(1.645 × its null standard error, 0.02), on every task); its numbers are shown but never bold. "
        "A benchmark that would flag every model it scored judges its task, not the models, and flags none."
    )
    for name, reason in board.attrs.get("uninformative", {}).items():
        lead += page.note(
            f"Task uninformative, no model flagged by {known[name].title if name in known else name}: every "
            f"model scored is at its chance level (e.g. {reason})."
        )
    sections = [
        ("provenance", "Run provenance", _provenance_block(config, inputs, run_hash, created, skipped_slides))
    ]
    sections.append(("leaderboard", "Leaderboard", lead))
    for name, bench in known.items():
        if name in summaries:
            sections.append((name, bench.title, bench.section(summaries[name], order, figs[name])))
    if roles is not None:
        ranked = [c for c in shown.columns if c in higher_better]
        recoveries = distillation.recovery_table(board, ranked, roles, error_board(summaries, order))
        write_parquet(recoveries, out_dir / "distillation.parquet", meta | {"artifact": "distillation"})
        if roles.enabled:
            conditions = {m: (v or {}).get("throughput_conditions") for m, v in (models or {}).items()}
            costs = distillation.cost_table(board, roles, conditions)
            body = distillation.section(recoveries, costs, roles, labels)
            sections.append(("distillation", "Distillation: recovery of the teacher", body))
    runs = paired.paired_runs(paired_runs or {}, plism_reference)
    if len(runs):
        twins = {roles.students.get(m) for m in runs["model"]} - {None} if roles else set()
        body = paired.section(
            runs,
            board,
            summaries.get("plism"),
            roles.teacher if roles else None,
            twins.pop() if len(twins) == 1 else None,  # the random-init baseline, when they share one
            tissue_holdout,
        )
        sections.append(("paired", "Paired-view distillation (seed-style tables)", body))
    sections.append(("size", "Model size", _size_section(board, models)))
    document = page.page(title, sections)
    with atomic_path(out_dir / "index.html") as tmp:
        tmp.write_text(document, encoding="utf-8")
    log.info("report: %d models, benchmarks %s → %s", len(order), sorted(summaries), out_dir / "index.html")
    return board


def run(
    score_files: list[str | Path],
    embedding_stores: list[str | Path],
    out_dir: str | Path,
    *,
    benchmarks: list[str],
    models: list[str],
    students: Mapping[str, str | None] | None = None,
    teacher: str | None = None,
    config: dict | None = None,
    n_boot: int = N_BOOT,
    skipped_slides: Sequence[Mapping[str, str]] = (),
    paired_runs: Mapping[str, Mapping[str, Any]] | None = None,
    plism_reference: str | None = None,
    tissue_holdout: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """The report of a workflow run: `build_report` with each model's size and measured throughput, and
    the distillation section when `teacher` and a student `student-<run>` of `students` are reported.

    `score_files`: `<benchmark>/<model>.parquet` paths (the directory names the benchmark, the stem the
    model); `benchmarks`: every enabled benchmark (one with no file shows as absent); `models[i]` and
    `embedding_stores[i]`: a model and one of its embedding stores, whose attributes give `tiles_per_s`,
    `throughput_device` and `throughput_conditions` (the load it was measured under, shown beside it). A distilled student `student-<run>` is profiled as its run's architecture
    (`students[run]`); `n_boot`: replicates of the PLISM CIs; `paired_runs`, `plism_reference`,
    `tissue_holdout`: the paired-view section's runs and held-out tissues (`build_report`). Writes `out_dir/{leaderboard.parquet,figures/,index.html}`; returns the leaderboard.
    Raises ReportError when a score file's directory is not one of `benchmarks` or the two model lists
    differ in length.
    """
    from histodistill.embed import EmbeddingStore
    from histodistill.models.ref import ModelRef

    if len(models) != len(embedding_stores):
        raise ReportError(f"{len(models)} model(s) but {len(embedding_stores)} embedding store(s)")
    scores: dict[str, dict[str, Path]] = {b: {} for b in benchmarks}
    for path in map(Path, score_files):
        if path.parent.name not in scores:
            raise ReportError(f"score file {path}: benchmark {path.parent.name!r} is not one of {benchmarks}")
        scores[path.parent.name][path.stem] = path
    students = students or {}
    profiles, random_init = {}, {}
    for model, emb_path in zip(models, embedding_stores, strict=True):
        # a distilled student has its run's architecture; its size is that of the architecture
        ref = ModelRef.parse(model)
        arch = students.get(ref.run, model) if ref.is_student else model
        attrs = EmbeddingStore(emb_path).attrs
        # a random-init baseline: a model whose embeddings came from seeded random weights (their provenance)
        digest = str(attrs.get("provenance", {}).get("weights_digest", ""))
        random_init[model] = digest.startswith("random-init")
        profiles[model] = {
            **model_profile(arch),
            "tiles_per_s": attrs.get("tiles_per_s"),
            "device": attrs.get("throughput_device"),
            "throughput_conditions": attrs.get("throughput_conditions"),
        }
    who = distillation.roles(teacher, students, models, random_init)
    return build_report(
        scores,
        out_dir,
        models=profiles,
        config=config,
        n_boot=n_boot,
        skipped_slides=skipped_slides,
        roles=who,
        paired_runs=paired_runs,
        plism_reference=plism_reference,
        tissue_holdout=tissue_holdout,
    )
