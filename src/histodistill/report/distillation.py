"""The report's distillation section: how much of the teacher each distilled student recovers, and at what cost.

Per leaderboard score column (every benchmark's ranked headline numbers; higher is better) and per student,

    recovery = (student − baseline) / (teacher − baseline)

with `baseline` the student's own architecture at random init (the same registry model, seeded random
weights): 1 means the student matches the teacher, 0 means distillation added nothing over a random
network of the student's shape, and the figure is undefined (NaN) when the teacher does not beat the baseline
(teacher − baseline ≤ `MIN_GAP`: there is nothing to recover). This is the "fraction of the teacher–baseline
gap closed" of distillation papers (e.g. the recovery figures of Filiot et al. 2025, H0-mini, relative to
H-Optimus-0); the deliberate choice of a random-init baseline (not another pretrained model) makes 0 mean "no
transfer". Beside it: parameters, GFLOPs at 224 px and measured throughput of each student relative to the
teacher (`report.model_card` counts the FLOPs; the embedding runs measure the throughput).

A gap within noise is not a gap: where the benchmark gives a standard error of its headline numbers
(`Benchmark.errors`: a test set's null standard error, or the spread over cross-validation folds), the
recovery is reported only when teacher − baseline > `GAP_Z` × sqrt(se_teacher² + se_baseline²) (a one-sided
5% test that the teacher beats the random init; the two scores are treated as independent, which
overstates the paired difference's error, so the test is conservative). Otherwise the figure would divide by
noise: on the demo, a mitosis AUROC gap of 0.004 once gave a "recovery" of −3.5. Where the benchmark gives no
standard error the figure is shown, and the table says so.

A student's baseline exists only when its architecture is one of the reported models and is built at random
init (a registry `_tiny` twin, `ModelSpec.random_init`, without configured weights): `configs/h0mini.yaml`
reports the published H0-mini, which is not a random init, so there the section says so instead of
computing a wrong figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from histodistill.bench.chance import CHANCE_Z
from histodistill.report import html as page

MIN_GAP = 1e-9  # teacher − baseline at or below this: recovery undefined (NaN)
GAP_Z = CHANCE_Z  # one-sided 5% level: the teacher − baseline gap must exceed GAP_Z standard errors
COLUMNS = ("student", "baseline", "teacher", "column", "student_value", "baseline_value", "teacher_value")
GAP_COLUMNS = ("gap", "gap_se", "resolved")


@dataclass(frozen=True)
class DistillationRoles:
    """Who is who in the report: `teacher` (a model name), `students` {student model: its random-init
    baseline model, or None when none was reported}."""

    teacher: str | None
    students: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return bool(self.teacher) and bool(self.students)


def roles(
    teacher: str | None,
    students: Mapping[str, str | None],
    models: Sequence[str],
    random_init: Mapping[str, bool],
) -> DistillationRoles:
    """The roles of the reported `models`: `students` maps a run name to its architecture
    (`distill.runs.<run>.student`); a student `student-<run>` is kept when it is reported, and its baseline is
    its architecture when that is reported too and `random_init[arch]` is True (else None)."""
    reported = set(models)
    out: dict[str, str | None] = {}
    for run, arch in students.items():
        name = f"student-{run}"
        if name in reported:
            out[name] = arch if arch in reported and random_init.get(str(arch), False) else None
    return DistillationRoles(teacher if teacher in reported else None, out)


def recovery(student: float, baseline: float, teacher: float) -> float:
    """(student − baseline) / (teacher − baseline); NaN when a value is missing or teacher − baseline ≤
    MIN_GAP (the teacher does not beat the random init: nothing to recover)."""
    values = np.array([student, baseline, teacher], dtype=float)
    if not np.isfinite(values).all() or teacher - baseline <= MIN_GAP:
        return float("nan")
    return float((student - baseline) / (teacher - baseline))


def gap_resolved(gap: float, se_teacher: float, se_baseline: float) -> tuple[float, bool | None]:
    """(standard error of the teacher − baseline gap, whether the gap exceeds `GAP_Z` of them).

    The error is sqrt(se_teacher² + se_baseline²) (independent scores: conservative for a paired
    difference). None (not judged) when either standard error or the gap is missing."""
    se = float(np.hypot(se_teacher, se_baseline))
    if not (np.isfinite(se) and np.isfinite(gap)):
        return se, None
    return se, bool(gap > GAP_Z * se)


def recovery_table(
    board: pd.DataFrame,
    score_columns: Sequence[str],
    who: DistillationRoles,
    errors: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (student, score column): the three values, the teacher − baseline `gap`, its standard
    error `gap_se` and whether it is `resolved` (`gap_resolved`: True, False, or None when a standard error
    is missing), and `recovery` (see `recovery`; NaN when the gap is not resolved: within noise).

    `board`: the leaderboard (a `model` column, one row per model); `score_columns`: its higher-is-better
    columns (the benchmarks' ranked headline numbers), in report order; `errors`: the standard errors of the
    board's numbers in the same layout (`Benchmark.errors`; None or a missing column: not judged). Students
    without a baseline get NaN; no rows unless the teacher and a student are reported (`who.enabled`).
    """
    values = board.set_index("model")
    ses = errors.set_index("model") if errors is not None and len(errors) else pd.DataFrame()

    def get(frame: pd.DataFrame, model: str | None, column: str) -> float:
        ok = model in frame.index and column in frame.columns
        return float(frame.at[model, column]) if ok else np.nan

    rows = []
    for student, baseline in (who.students if who.enabled else {}).items():
        for column in score_columns:
            s, b, t = (get(values, m, column) for m in (student, baseline, who.teacher))
            gap_se, resolved = gap_resolved(t - b, get(ses, who.teacher, column), get(ses, baseline, column))
            rows.append(
                {
                    "student": student,
                    "baseline": baseline,
                    "teacher": who.teacher,
                    "column": column,
                    "student_value": s,
                    "baseline_value": b,
                    "teacher_value": t,
                    "gap": t - b,
                    "gap_se": gap_se,
                    "resolved": resolved,
                    "recovery": np.nan if resolved is False else recovery(s, b, t),
                }
            )
    out = pd.DataFrame(rows, columns=[*COLUMNS, *GAP_COLUMNS, "recovery"])
    out["resolved"] = out["resolved"].astype("boolean")
    return out


def busy(conditions: Mapping[str, Any] | None) -> bool:
    """Whether a throughput was measured on a BUSY machine: its 1-minute load average (`load_1min` of
    `histodistill.embed`'s `throughput_conditions`) above the CPUs the run could use (`cpus`). False when
    the conditions were not recorded."""
    load, cpus = (conditions or {}).get("load_1min"), (conditions or {}).get("cpus")
    return load is not None and bool(cpus) and float(load) > float(cpus)


def cost_table(
    board: pd.DataFrame,
    who: DistillationRoles,
    conditions: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> pd.DataFrame:
    """Per student: params (M), GFLOPs and tiles/s beside the teacher's, and the ratios (teacher / student
    for size and FLOPs: how many times smaller; student / teacher for throughput: how many times faster).

    `conditions[model]`: the load each model's throughput was measured under (`throughput_conditions`).
    When the student's or the teacher's was measured on a BUSY machine (`busy`), `busy` is True and the
    speedup is NaN: a ratio of two timings taken under other work measures the load, not the models (the
    demo once showed 3.31× between identical architectures)."""
    values = board.set_index("model")
    conditions = conditions or {}
    rows = []
    for student in who.students:
        row = {"student": student, "teacher": who.teacher}
        for col in ("params_m", "gflops", "tiles_per_s"):
            s = float(values.at[student, col]) if student in values.index else np.nan
            t = float(values.at[who.teacher, col]) if who.teacher in values.index else np.nan
            row[f"student_{col}"], row[f"teacher_{col}"] = s, t
        row["params_ratio"] = _ratio(row["teacher_params_m"], row["student_params_m"])
        row["flops_ratio"] = _ratio(row["teacher_gflops"], row["student_gflops"])
        row["busy"] = busy(conditions.get(student)) or busy(conditions.get(str(who.teacher)))
        row["speedup"] = (
            np.nan if row["busy"] else _ratio(row["student_tiles_per_s"], row["teacher_tiles_per_s"])
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _recovery_cell(row: pd.Series) -> str:
    """A recovery figure: "–" without a positive gap, "– (within noise)" when the gap is not resolved, "*" when
    it was not tested."""
    resolved = row["resolved"]
    if not row["gap"] > MIN_GAP:  # the teacher does not beat the random init: nothing to recover
        return page.MISSING
    if not pd.isna(resolved) and not resolved:
        return f"{page.MISSING} (within noise)"
    text = page.fmt(row["recovery"], 2)
    return text + " *" if pd.isna(resolved) and text != page.MISSING else text


def _ratio(a: float, b: float) -> float:
    return float(a / b) if np.isfinite(a) and np.isfinite(b) and b > 0 else float("nan")


def section(
    recoveries: pd.DataFrame,
    costs: pd.DataFrame,
    who: DistillationRoles,
    labels: Mapping[str, str],
) -> str:
    """The HTML of the distillation section: the recovery table (one row per score column, one recovery
    column per student, with the teacher's and the baseline's values) and the cost table."""
    if not who.enabled:
        return page.note(
            "No distilled student and teacher are both among the reported models (benchmarks.models): "
            "nothing to compare."
        )
    body = ""
    students = list(who.students)
    missing = [s for s, b in who.students.items() if b is None]
    if missing:
        body += page.note(
            f"No random-init baseline of {', '.join(missing)}: recovery needs the student's architecture at "
            "random init among the reported models (e.g. h0_mini_tiny for a tiny student), so it is not "
            "computed (–)."
        )
    # model names in a line above the table, each student's recovery beside its score: the recovery
    # columns stay in view on a page-wide table
    header = ["score", "teacher"]
    baselines = list(dict.fromkeys(b for b in who.students.values() if b))
    one = len(baselines) == 1
    header += ["random init" if one else f"random init ({b})" for b in baselines]
    header += ["gap ± SE" if one else f"gap to {b} ± SE" for b in baselines]
    header += [h for s in students for h in (f"{s}", f"recovery {s}")]
    names = [f"teacher: {who.teacher}"] + [f"random init of {s}: {b}" for s, b in who.students.items() if b]
    body += page.note("; ".join(names) + ".")
    rows = []
    for column in dict.fromkeys(recoveries["column"]):
        part = recoveries[recoveries["column"] == column].set_index("student")
        first = part.iloc[0]
        row = [labels.get(column, column), page.fmt(first["teacher_value"])]
        per_baseline = [part[part["baseline"] == b] for b in baselines]
        row += [page.fmt(p["baseline_value"].iloc[0] if len(p) else np.nan) for p in per_baseline]
        row += [page.fmt_pm(p["gap"].iloc[0], p["gap_se"].iloc[0]) if len(p) else "–" for p in per_baseline]
        row += [
            c for s in students for c in (page.fmt(part.at[s, "student_value"]), _recovery_cell(part.loc[s]))
        ]
        rows.append(row)
    body += page.table(header, rows)
    body += page.note(
        "gap = teacher − random init, ± its standard error. "
        "recovery = (student − random init) / (teacher − random init), per score (higher is better): 1 = the "
        "student matches the teacher, 0 = no better than its own architecture at random init; – where the "
        "teacher does not beat the random init (nothing to recover) or a value is missing. "
        f"– (within noise): the teacher − random-init gap is at most {GAP_Z} standard errors (the benchmark's "
        "own: a test set's null standard error, or the spread over cross-validation folds), so a ratio over "
        "it would measure noise. * no standard error is known for this score: the figure is not tested."
    )
    cost_rows = [
        [
            r.student,
            page.fmt(r.student_params_m, 2),
            page.fmt(r.teacher_params_m, 2),
            page.fmt(r.params_ratio, 1),
            page.fmt(r.student_gflops, 3),
            page.fmt(r.teacher_gflops, 3),
            page.fmt(r.flops_ratio, 1),
            page.fmt(r.student_tiles_per_s, 1),
            page.fmt(r.teacher_tiles_per_s, 1),
            "BUSY" if r.busy else page.fmt(r.speedup, 2),
        ]
        for r in costs.itertuples(index=False)
    ]
    body += page.table(
        [
            "student",
            "params (M)",
            "teacher params (M)",
            "× smaller",
            "GFLOPs @224",
            "teacher GFLOPs",
            "× fewer FLOPs",
            "tiles/s",
            "teacher tiles/s",
            "× faster",
        ],
        cost_rows,
    )
    body += page.note(
        "Parameters and FLOPs of one 224 × 224 forward pass as in the model-size section; tiles/s as measured "
        "by the pipeline's embedding runs (same device and batch size for both). × faster: BUSY (no "
        "ratio) when either run was timed on a BUSY machine (1-minute load above its CPUs; see the model-size "
        "section), since the ratio would then measure the other work, not the models."
    )
    return body
