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

from histodistill.report import html as page

MIN_GAP = 1e-9  # teacher − baseline at or below this: recovery undefined (NaN)
COLUMNS = ("student", "baseline", "teacher", "column", "student_value", "baseline_value", "teacher_value")


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


def recovery_table(board: pd.DataFrame, score_columns: Sequence[str], who: DistillationRoles) -> pd.DataFrame:
    """One row per (student, score column): the three values and `recovery` (see `recovery`).

    `board`: the leaderboard (a `model` column, one row per model); `score_columns`: its higher-is-better
    columns (the benchmarks' ranked headline numbers), in report order. Students without a baseline get NaN;
    no rows unless the teacher and a student are reported (`who.enabled`).
    """
    values = board.set_index("model")
    rows = []
    for student, baseline in (who.students if who.enabled else {}).items():
        for column in score_columns:
            s = float(values.at[student, column]) if student in values.index else np.nan
            b = float(values.at[baseline, column]) if baseline in values.index else np.nan
            t = float(values.at[who.teacher, column]) if who.teacher in values.index else np.nan
            rows.append(
                {
                    "student": student,
                    "baseline": baseline,
                    "teacher": who.teacher,
                    "column": column,
                    "student_value": s,
                    "baseline_value": b,
                    "teacher_value": t,
                    "recovery": recovery(s, b, t),
                }
            )
    return pd.DataFrame(rows, columns=[*COLUMNS, "recovery"])


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
    header = ["score", f"teacher ({who.teacher})"]
    baselines = list(dict.fromkeys(b for b in who.students.values() if b))
    header += [f"random init ({b})" for b in baselines]
    header += [f"{s}" for s in students] + [f"recovery {s}" for s in students]
    rows = []
    for column in dict.fromkeys(recoveries["column"]):
        part = recoveries[recoveries["column"] == column].set_index("student")
        first = part.iloc[0]
        row = [labels.get(column, column), page.fmt(first["teacher_value"])]
        for b in baselines:
            value = part.loc[part["baseline"] == b, "baseline_value"]
            row.append(page.fmt(value.iloc[0] if len(value) else np.nan))
        row += [page.fmt(part.at[s, "student_value"]) for s in students]
        row += [page.fmt(part.at[s, "recovery"], 2) for s in students]
        rows.append(row)
    body += page.table(header, rows)
    body += page.note(
        "recovery = (student − random init) / (teacher − random init), per score (higher is better): 1 = the "
        "student matches the teacher, 0 = no better than its own architecture at random init; – where the "
        "teacher does not beat the random init (nothing to recover) or a value is missing."
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
