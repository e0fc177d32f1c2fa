"""The report's paired-view section: the seed paper's Tables 1–2 for the paired distillation runs.

Farndale et al., "More From Less: Self-Supervised Knowledge Distillation for Routine Histopathology Data",
report each pairing of inputs (rows) under symmetric and asymmetric pairs with shared and separate weights
(columns), scored by linear probing. Here each table has one row per (pairing, objective) and one column per
(symmetry, weights) of the co-trained runs configured (`distill.runs.<run>`: `pairing.source`,
`pairing.symmetric`, `teacher_mode` cotrained_separate or cotrained_shared, `objective`), and one table per
score:

- Table 1: the linear probe's balanced accuracy (the report's `probe_balanced_accuracy_linear` column: the
  mean over the probe tasks, tissue classification on the demo), as the seed's tables;
- Table 2: PLISM robustness on the held-out tissues: the median over slide pairs of top-1 retrieval
  accuracy (`bench.plism`, group `all`), the H0-mini paper's robustness measure restricted by
  `plism.tissue_holdout` to the tissues no paired student trained on.

Deliberate deviations from the seed's layout: runs distilled from the frozen teacher (`teacher_mode` cached
or online, e.g. the `feature` objective; neither shared nor separate weights apply) are Table 3, both
scores side by side, not a column of Tables 1–2 that every co-trained row would leave empty; a registered
run whose student side is the reference slide only (`pairing.slides: [<reference>]`) is the row "none
(unpaired control)"; runs that differ only by seed share a cell, shown as mean ± standard deviation over
seeds (n seeds). A combination that no run configures reads "n/a"; a configured run without a score reads
"–".
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
WEIGHTS_ORDER = ("separate", "shared")  # the seed's columns; frozen-teacher runs: `frozen_table`
UNPAIRED = "none (unpaired control)"
PAIRING_ORDER = ("registered", UNPAIRED, "context", "downsample", "mask")
NOT_RUN = "n/a"
RUN_COLUMNS = ("model", "pairing", "objective", "symmetry", "weights", "seed")
PROBE_COLUMN = "probe_balanced_accuracy_linear"
COLUMNS_NOTE = "Rows: pairing · objective. Columns: pairs (asymmetric or symmetric) · encoder weights (separate or shared)."
PROBE_LABEL = "linear probe (balanced accuracy)"
TOP1_LABEL = "PLISM top-1"


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


def column_label(symmetry: str, weights: str) -> str:
    """A seed table's column header, pairs · encoder weights: "asymmetric · separate"."""
    return f"{symmetry} · {weights}"


def _cells(runs: pd.DataFrame, keys: list[str], scores: Mapping[str, float], digits: int) -> dict:
    """{group key: formatted cell} of `runs` grouped by `keys` (seeds share a cell)."""
    cells = {}
    for key, part in runs.groupby(keys, sort=False):
        cells[key] = _cell([float(scores.get(m, np.nan)) for m in part["model"]], digits)
    return cells


def _row_keys(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(pairing, objective) of `runs` in PAIRING_ORDER (other pairings after, by name)."""
    known = {p: i for i, p in enumerate(PAIRING_ORDER)}
    return sorted(
        set(zip(runs["pairing"], runs["objective"], strict=True)),
        key=lambda k: (known.get(k[0], len(known)), k[0], k[1]),
    )


def seed_table(runs: pd.DataFrame, scores: Mapping[str, float], digits: int = 3) -> pd.DataFrame:
    """The seed-style table of one score for the co-trained runs: index (pairing, objective), columns
    `column_label(symmetry, weights)` for SYMMETRY_ORDER × WEIGHTS_ORDER, the seed's four.

    `runs`: `paired_runs`' frame (frozen-teacher runs are left out: `frozen_table`); `scores[model]`: the
    model's score (absent or NaN: not scored). Rows in PAIRING_ORDER (others after, by name). Cells are
    formatted strings: one run's score, or "mean ± std (n=k)" over the runs of a cell (seeds; "(n=k of m)"
    when m − k runs have no score), "n/a" where no run is configured, "–" where runs are configured but
    none is scored. An empty frame with those columns when no run is co-trained.
    """
    runs = runs[runs["weights"] != FROZEN]
    columns = [(s, w) for s in SYMMETRY_ORDER for w in WEIGHTS_ORDER]
    cells = _cells(runs, ["pairing", "objective", "symmetry", "weights"], scores, digits)
    keys = _row_keys(runs)
    data = [[cells.get((*key, *col), NOT_RUN) for col in columns] for key in keys]
    index = pd.MultiIndex.from_tuples(keys, names=["pairing", "objective"])
    return pd.DataFrame(data, index=index, columns=[column_label(s, w) for s, w in columns])


def frozen_table(
    runs: pd.DataFrame,
    probe: Mapping[str, float],
    top1: Mapping[str, float],
    digits: int = 3,
) -> pd.DataFrame:
    """Table 3: the runs distilled from the frozen teacher (weights FROZEN), one row per (pairing,
    objective, symmetry), columns PROBE_LABEL and TOP1_LABEL (`probe[model]`, `top1[model]`), cells as
    `seed_table`'s (seeds share a cell). An empty frame with those columns when no run uses the frozen
    teacher."""
    runs = runs[runs["weights"] == FROZEN]
    keys = ["pairing", "objective", "symmetry"]
    probe_cells = _cells(runs, keys, probe, digits)
    top1_cells = _cells(runs, keys, top1, digits)
    order = {k: i for i, k in enumerate(_row_keys(runs))}
    rows = sorted(probe_cells, key=lambda k: (order[k[:2]], SYMMETRY_ORDER.index(k[2])))
    data = [[probe_cells[k], top1_cells[k]] for k in rows]
    index = pd.MultiIndex.from_tuples(rows, names=keys) if rows else pd.MultiIndex.from_tuples([], names=keys)
    return pd.DataFrame(data, index=index, columns=[PROBE_LABEL, TOP1_LABEL])


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


def describe_holdout(held: str, holdout: Mapping[str, Any] | None) -> str:
    """What the held-out tissue ids `held` ("r1c1, r0c0") are, from `plism.tissue_holdout` (`holdout`,
    `histodistill.holdout`): for method blocks, the ids read as row and column of the reference slide's
    tile-position bounding box cut into `blocks` = [rows, columns] equal blocks, counting from 0 at the top
    left; for method table, the tissue ids of that TSV. `held` as it is without the setting."""
    holdout = dict(holdout or {})
    method = holdout.get("method", "none")
    if method == "blocks":
        rows, cols = (int(b) for b in holdout.get("blocks", (2, 2)))
        return (
            f"{held} (spatial blocks r<row>c<column> of the reference slide's tile grid cut into {rows} × "
            f"{cols} equal blocks, counting from r0c0 at the top left; plism.tissue_holdout method blocks)"
        )
    if method == "table":
        return f"{held} (tissue ids of {holdout.get('table')}; plism.tissue_holdout method table)"
    return held


def _html_table(table: pd.DataFrame) -> str:
    header = [*table.index.names, *table.columns]
    rows = [[*key, *values] for key, values in zip(table.index, table.to_numpy().tolist(), strict=True)]
    return page.table(header, rows, n_keys=table.index.nlevels)


def section(
    runs: pd.DataFrame,
    board: pd.DataFrame,
    plism_summary: pd.DataFrame | None,
    teacher: str | None = None,
    random_init: str | None = None,
    tissue_holdout: Mapping[str, Any] | None = None,
) -> str:
    """The HTML body of the paired-view section: for the co-trained runs Table 1 (linear probe) and Table 2
    (PLISM top-1 on the held-out tissues) in the seed's layout, for the frozen-teacher runs Table 3 (both
    scores), the held-out tissues named and described (`describe_holdout`, from `tissue_holdout`), the
    teacher's and the random-init twin's scores for reference, and the runs behind each cell listed."""
    probe = {}
    if PROBE_COLUMN in board.columns:
        probe = dict(zip(board["model"], board[PROBE_COLUMN].astype(float), strict=True))
    top1 = plism_top1(plism_summary)
    held = held_out_tissues(plism_summary, list(runs["model"]))
    where = "held-out tissues" if held else "all tiles"
    cotrained = runs[runs["weights"] != FROZEN]
    frozen = runs[runs["weights"] == FROZEN]
    body = page.note(
        'The seed paper\'s layout (Farndale et al., "More From Less", Tables 1–2) for the co-trained runs: one '
        "row per pairing of inputs (teacher side rich, student side routine) and objective, one column per "
        "symmetric or asymmetric pairs (symmetric: each encoder also sees the other side) with shared or "
        "separate weights of the two encoders. Table 3: the runs distilled from the frozen teacher "
        "(asymmetric by construction), the registered-pair student against the same recipe unpaired. "
        "n/a: combination not run; –: run but not scored; mean ± standard deviation over seeds (n) where a "
        "cell holds several runs."
    )
    if len(cotrained):
        body += "<h3>Table 1: linear probe (balanced accuracy, mean over probe tasks), co-trained runs</h3>"
        body += page.note(COLUMNS_NOTE)
        body += _html_table(seed_table(cotrained, probe)) if probe else page.note("No linear-probe scores.")
        title = f"Table 2: PLISM top-1 accuracy (median over slide pairs, {where}), co-trained runs"
        body += f"<h3>{page.esc(title)}</h3>" + page.note(COLUMNS_NOTE)
        body += _html_table(seed_table(cotrained, top1)) if top1 else page.note("No PLISM top-1 scores.")
    if len(frozen):
        title = f"Table 3: distillation from the frozen teacher (linear probe; PLISM top-1, {where})"
        body += f"<h3>{page.esc(title)}</h3>"
        body += _html_table(frozen_table(frozen, probe, top1))
    body += page.note(
        f"Held-out tissues (plism.tissue_holdout; no registered-pair run trained on them, PLISM scores only "
        f"them): {describe_holdout(held, tissue_holdout)}."
        if held
        else "No tissues held out (plism.tissue_holdout.method none): PLISM scores every tile, including "
        "those the registered-pair runs trained on."
    )
    for role, model in (("Teacher", teacher), ("Random-init twin", random_init)):
        if model is not None:
            body += page.note(
                f"{role} {model}: linear probe {page.fmt(probe.get(model))}, PLISM top-1 "
                f"{page.fmt(top1.get(model))}."
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
