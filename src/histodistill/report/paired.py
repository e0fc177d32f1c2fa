"""The report's paired-view section: the seed paper's Tables 1–2 for the paired distillation runs.

Farndale et al., "More From Less: Self-Supervised Knowledge Distillation for Routine Histopathology Data",
report each pairing of inputs (rows) under symmetric and asymmetric pairs with shared and separate weights
(columns), scored by linear probing. Here each table has one row per (pairing, objective) and one column per
(symmetry, weights) of the runs configured (`distill.runs.<run>`: `pairing.source`, `pairing.symmetric`,
`teacher_mode`, `objective`), and one table per score:

- Table 1: the linear probe's balanced accuracy (the report's `probe_balanced_accuracy_linear` column: the
  mean over the probe tasks, tissue classification on the demo), as the seed's tables;
- Table 2: PLISM robustness on the held-out tissues: the median over slide pairs of top-1 retrieval
  accuracy (`bench.plism`, group `all`), the H0-mini paper's robustness measure restricted by
  `plism.tissue_holdout` to the tissues no paired student trained on.

Deliberate deviations from the seed's layout: a frozen-teacher run (`teacher_mode` cached or online,
asymmetric distillation from the teacher, e.g. the `feature` objective) gets a weights column of its own,
"frozen teacher", since neither shared nor separate applies; a registered run whose student side is the
reference slide only (`pairing.slides: [<reference>]`) is the row "none (unpaired control)"; runs that
differ only by seed share a cell, shown as mean ± standard deviation over seeds (n seeds). A combination that
no run configures reads "n/a"; a configured run without a score reads "–".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from histodistill.report import html as page

# DistillConfig's defaults (histodistill.distill.trainer, which imports torch; a unit test keeps them equal)
DEFAULT_OBJECTIVE = "dino_ibot"
DEFAULT_TEACHER_MODE = "cached"
WEIGHTS = {"cotrained_separate": "separate", "cotrained_shared": "shared"}  # else: frozen teacher
FROZEN = "frozen teacher"
SYMMETRY_ORDER = ("asymmetric", "symmetric")
WEIGHTS_ORDER = ("separate", "shared", FROZEN)
UNPAIRED = "none (unpaired control)"
PAIRING_ORDER = ("registered", UNPAIRED, "context", "downsample", "mask")
NOT_RUN = "n/a"
RUN_COLUMNS = ("model", "pairing", "objective", "symmetry", "weights", "seed")
PROBE_COLUMN = "probe_balanced_accuracy_linear"


def paired_runs(runs: Mapping[str, Mapping[str, Any]], reference: str | None = None) -> pd.DataFrame:
    """One row per paired distillation run (`RUN_COLUMNS`), from {student model: its run settings}.

    `runs[model]` holds the run's `pairing` mapping and optionally `teacher_mode`, `objective` and `seed`
    (unset: DistillConfig's defaults, seed None). Every run given is a row; a run with `source: none` (or
    no pairing), and a registered run whose student side is the reference slide only (`pairing.slides` =
    [`pairing.reference` or `reference`, the PLISM reference]), is the row "none (unpaired control)".
    Returns an empty frame with the columns when no run is paired (all are unpaired controls, or none).
    """
    rows = []
    for model, run in runs.items():
        pairing = dict(run.get("pairing") or {})
        source = pairing.get("source", "none")
        ref = pairing.get("reference") or reference
        slides = tuple(pairing.get("slides") or ())
        if source == "none" or (source == "registered" and ref is not None and slides == (ref,)):
            source = UNPAIRED
        mode = run.get("teacher_mode") or DEFAULT_TEACHER_MODE
        rows.append(
            {
                "model": str(model),
                "pairing": source,
                "objective": run.get("objective") or DEFAULT_OBJECTIVE,
                "symmetry": "symmetric" if pairing.get("symmetric") else "asymmetric",
                "weights": WEIGHTS.get(mode, FROZEN),
                "seed": run.get("seed"),
            }
        )
    frame = pd.DataFrame(rows, columns=list(RUN_COLUMNS))
    if not (frame["pairing"] != UNPAIRED).any():
        return frame.iloc[0:0]
    return frame.reset_index(drop=True)


def _cell(values: list[float], digits: int) -> str:
    finite = [v for v in values if np.isfinite(v)]
    if not values:
        return NOT_RUN
    if not finite:
        return page.MISSING
    if len(values) == 1:
        return page.fmt(finite[0], digits)
    mean = float(np.mean(finite))
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else np.nan
    return f"{page.fmt_pm(mean, std, digits)} (n={len(finite)}" + (
        f" of {len(values)})" if len(finite) < len(values) else ")"
    )


def seed_table(runs: pd.DataFrame, scores: Mapping[str, float], digits: int = 3) -> pd.DataFrame:
    """The seed-style table of one score: index (pairing, objective), columns "<symmetry> · <weights>".

    `runs`: `paired_runs`' frame; `scores[model]`: the model's score (absent or NaN: not scored). Columns are
    every (symmetry, weights) in SYMMETRY_ORDER × WEIGHTS_ORDER with the frozen-teacher ones only when a
    run uses a frozen teacher; rows in PAIRING_ORDER (others after, by name). Cells are formatted strings:
    one run's score, or "mean ± std (n=k)" over the runs of a cell (seeds; "(n=k of m)" when m − k runs
    have no score), "n/a" where no run is configured, "–" where runs are configured but none is scored.
    """
    weights = [w for w in WEIGHTS_ORDER if w != FROZEN or (runs["weights"] == FROZEN).any()]
    columns = [(s, w) for s in SYMMETRY_ORDER for w in weights]
    known = {p: i for i, p in enumerate(PAIRING_ORDER)}
    keys = sorted(
        set(zip(runs["pairing"], runs["objective"], strict=True)),
        key=lambda k: (known.get(k[0], len(known)), k[0], k[1]),
    )
    cells = {}
    for (pairing, objective, symmetry, weight), part in runs.groupby(
        ["pairing", "objective", "symmetry", "weights"], sort=False
    ):
        values = [float(scores.get(m, np.nan)) for m in part["model"]]
        cells[(pairing, objective, symmetry, weight)] = _cell(values, digits)
    data = [[cells.get((*key, *col), NOT_RUN) for col in columns] for key in keys]
    index = pd.MultiIndex.from_tuples(keys, names=["pairing", "objective"])
    return pd.DataFrame(data, index=index, columns=[f"{s} · {w}" for s, w in columns])


def plism_top1(summary: pd.DataFrame | None) -> dict[str, float]:
    """{model: median over all slide pairs of PLISM top-1 accuracy} from the report's PLISM summary (the
    `bench.plism` summary with a `model` column); empty without PLISM scores or top-1 rows."""
    if summary is None or summary.empty or "metric" not in summary.columns:
        return {}
    rows = summary[(summary["group"] == "all") & (summary["metric"] == "top_1")]
    return {str(m): float(v) for m, v in zip(rows["model"], rows["median"], strict=True)}


def held_out_tissues(summary: pd.DataFrame | None, models: list[str]) -> str:
    """The held-out tissue ids the PLISM scores of `models` were restricted to (comma separated, "" for
    none); several different sets are listed per model."""
    if summary is None or summary.empty or "held_out" not in summary.columns:
        return ""
    firsts = summary[summary["model"].isin(models)].groupby("model", sort=False)["held_out"].first()
    sets = set(firsts)
    if len(sets) == 1:
        return next(iter(sets))
    return "; ".join(f"{m}: {h or 'all tiles'}" for m, h in firsts.items())


def _html_table(table: pd.DataFrame) -> str:
    header = [*table.index.names, *table.columns]
    rows = [[*key, *values] for key, values in zip(table.index, table.to_numpy().tolist(), strict=True)]
    return page.table(header, rows, n_keys=2)


def section(
    runs: pd.DataFrame,
    board: pd.DataFrame,
    plism_summary: pd.DataFrame | None,
    teacher: str | None = None,
) -> str:
    """The HTML body of the paired-view section: Table 1 (linear probe) and Table 2 (PLISM top-1 on the
    held-out tissues), the held-out tissues named, and the runs behind each cell listed."""
    probe = {}
    if PROBE_COLUMN in board.columns:
        probe = dict(zip(board["model"], board[PROBE_COLUMN].astype(float), strict=True))
    top1 = plism_top1(plism_summary)
    held = held_out_tissues(plism_summary, list(runs["model"]))
    body = page.note(
        'The seed paper\'s layout (Farndale et al., "More From Less", Tables 1–2): one row per pairing of '
        "inputs (teacher side rich, student side routine) and objective, one column per symmetric or "
        'asymmetric pairs with shared or separate weights of two co-trained encoders ("frozen teacher": '
        "distillation from the frozen teacher, asymmetric by construction). n/a: combination not run; "
        "mean ± standard deviation over seeds where a cell holds several runs."
    )
    body += "<h3>Table 1: linear probe (balanced accuracy, mean over probe tasks)</h3>"
    body += _html_table(seed_table(runs, probe)) if probe else page.note("No linear-probe scores.")
    title = "Table 2: PLISM top-1 accuracy (median over slide pairs)"
    body += f"<h3>{page.esc(title + (', held-out tissues' if held else ', all tiles'))}</h3>"
    body += _html_table(seed_table(runs, top1)) if top1 else page.note("No PLISM top-1 scores.")
    body += page.note(
        f"Held-out tissues (plism.tissue_holdout; no registered-pair run trained on them, PLISM scores only "
        f"them): {held}."
        if held
        else "No tissues held out (plism.tissue_holdout.method none): PLISM scores every tile, including "
        "those the registered-pair runs trained on."
    )
    if teacher is not None:
        body += page.note(
            f"Teacher {teacher}: linear probe {page.fmt(probe.get(teacher))}, PLISM top-1 "
            f"{page.fmt(top1.get(teacher))}."
        )
    listing = [
        [
            r.model,
            r.pairing,
            r.objective,
            r.symmetry,
            r.weights,
            page.MISSING if page.is_missing(r.seed) else str(int(r.seed)),
        ]
        for r in runs.itertuples(index=False)
    ]
    body += page.details(f"runs ({len(runs)})", page.table(["model", *RUN_COLUMNS[1:]], listing, n_keys=1))
    return body
