"""Mitosis annotations and the slides they point into: reading, validation, the sample sheet.

One row per annotated figure: `slide_id, x, y, label, domain, case` (x, y in level-0 px of the slide; label
`mitotic_figure` or `hard_negative`; domain = tumour type or scanner; case = patient or specimen, the unit
that never crosses train and test). The package docstring (`histodistill.bench.mitosis`) maps the MIDOG
2022 and CCMCT tables onto these columns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from histodistill.bench import BenchmarkError
from histodistill.config import read_sample_sheet
from histodistill.slides import parse_mpp

MITOTIC_FIGURE = "mitotic_figure"
HARD_NEGATIVE = "hard_negative"
TARGETS = {MITOTIC_FIGURE: 1, HARD_NEGATIVE: 0}
LABEL_ALIASES = {
    "mitotic_figure": MITOTIC_FIGURE,
    "mitotic figure": MITOTIC_FIGURE,
    "mitosis": MITOTIC_FIGURE,
    "1": MITOTIC_FIGURE,
    "hard_negative": HARD_NEGATIVE,
    "hard negative": HARD_NEGATIVE,
    "imposter": HARD_NEGATIVE,
    "non-mitosis": HARD_NEGATIVE,
    "0": HARD_NEGATIVE,
}
ANNOTATION_COLUMNS = ("slide_id", "x", "y", "label", "domain", "case")


def read_annotations(path: str | os.PathLike, slide_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """Read and validate a point-annotation CSV; rows in errors are named by their CSV line.

    Returns the columns of ANNOTATION_COLUMNS (labels canonical; x, y float64 level-0 px) plus `target`
    (int64, 1 = mitotic figure), with a fresh 0…N-1 index: splits, patch stores and embeddings refer to
    these row positions. Raises BenchmarkError for a missing or unparsable file and for every check of
    `validate_annotations`.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"annotation file {path} does not exist")
    text_cols = {c: str for c in ("slide_id", "label", "domain", "case")}
    try:
        df = pd.read_csv(path, dtype=text_cols, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise BenchmarkError(f"cannot parse annotation file {path}: {exc}") from exc
    return validate_annotations(df, where=f"annotations {path}", slide_ids=slide_ids, line_offset=2)


def validate_annotations(
    df: pd.DataFrame,
    where: str = "annotations",
    slide_ids: Sequence[str] | None = None,
    line_offset: int | None = None,
) -> pd.DataFrame:
    """Check an annotation table (columns, values, slide → case → domain consistency, duplicates).

    `line_offset` names rows as CSV lines (2 = header + 1-based); None names them `row i`. Returns the
    table as `read_annotations` does. Raises BenchmarkError (naming `where` and the first offending row)
    for a missing column, no rows, an empty id, a coordinate that is not a number ≥ 0, an unknown label, a
    slide not in `slide_ids`, a slide in two cases or a case in two domains, or two rows on the same point.
    """
    missing = [c for c in ANNOTATION_COLUMNS if c not in df.columns]
    if missing:
        raise BenchmarkError(f"{where}: missing column(s) {missing}; needs {list(ANNOTATION_COLUMNS)}")
    if df.empty:
        raise BenchmarkError(f"{where}: no annotations")

    def name(i: int) -> str:
        return f"line {i + line_offset}" if line_offset is not None else f"row {i}"

    out = pd.DataFrame({c: df[c].astype(str).str.strip() for c in ("slide_id", "domain", "case")})
    for col in ("slide_id", "domain", "case"):
        blank = np.flatnonzero((out[col] == "").to_numpy() | df[col].isna().to_numpy())
        if blank.size:
            raise BenchmarkError(f"{where}: {name(blank[0])} has an empty {col}")
    for col in ("x", "y"):
        values = pd.to_numeric(df[col], errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(~np.isfinite(values) | (values < 0))
        if bad.size:
            i = bad[0]
            raise BenchmarkError(
                f"{where}: {name(i)} (slide {out['slide_id'].iloc[i]!r}) has {col} = {str(df[col].iloc[i])!r}, "
                "not a pixel coordinate ≥ 0"
            )
        out[col] = values
    raw = df["label"].astype(str).str.strip()
    labels = raw.str.lower().map(LABEL_ALIASES)
    bad = np.flatnonzero(labels.isna().to_numpy())
    if bad.size:
        i = bad[0]
        raise BenchmarkError(
            f"{where}: {name(i)} (slide {out['slide_id'].iloc[i]!r}) has label {raw.iloc[i]!r}; expected "
            f"{MITOTIC_FIGURE!r} or {HARD_NEGATIVE!r} (aliases: {sorted(LABEL_ALIASES)})"
        )
    out["label"] = labels.to_numpy()
    out = out[list(ANNOTATION_COLUMNS)].reset_index(drop=True)
    out["target"] = out["label"].map(TARGETS).astype(np.int64)

    if slide_ids is not None:
        known = set(map(str, slide_ids))
        unknown = np.flatnonzero(~out["slide_id"].isin(known).to_numpy())
        if unknown.size:
            i = unknown[0]
            raise BenchmarkError(
                f"{where}: {name(i)} refers to slide {out['slide_id'].iloc[i]!r}, which is not in the "
                "sample sheet; add it there or drop its annotations"
            )
    for child, parent in (("slide_id", "case"), ("case", "domain")):
        n_parents = out.groupby(child)[parent].nunique()
        if (n_parents > 1).any():
            key = n_parents.index[np.argmax(n_parents.to_numpy() > 1)]
            found = sorted(out.loc[out[child] == key, parent].unique())
            raise BenchmarkError(f"{where}: {child} {key!r} belongs to more than one {parent}: {found}")
    dup = out.duplicated(["slide_id", "x", "y"], keep=False).to_numpy()
    if dup.any():
        first = np.flatnonzero(dup)[0]
        r = out.iloc[first]
        same = np.flatnonzero(
            dup
            & (out["slide_id"] == r.slide_id).to_numpy()
            & (out["x"] == r.x).to_numpy()
            & (out["y"] == r.y)
        )
        raise BenchmarkError(
            f"{where}: {name(same[0])} and {name(same[1])} annotate the same point ({r.x:g}, {r.y:g}) of "
            f"slide {r.slide_id!r}"
        )
    return out


def slides_from_sheet(sheet: pd.DataFrame) -> tuple[dict[str, str], dict[str, float | None]]:
    """Slide paths and µm/px overrides (None: the slide's own) from a sample sheet, as
    `histodistill.config.read_sample_sheet` gives it."""
    paths = {str(s): str(p) for s, p in zip(sheet["slide_id"], sheet["path"], strict=True)}
    raw = sheet["mpp"] if "mpp" in sheet.columns else [None] * len(sheet)
    mpps = {str(s): parse_mpp(v) for s, v in zip(sheet["slide_id"], raw, strict=True)}
    return paths, mpps


@dataclass(frozen=True)
class AnnotatedSlides:
    """The benchmark's data: validated annotations and the slides (path, µm/px override) they refer to."""

    annotations: pd.DataFrame
    paths: dict[str, str]
    mpps: dict[str, float | None]


def read_dataset(samples: str | os.PathLike, annotations: str | os.PathLike) -> AnnotatedSlides:
    """The sample sheet (TSV: slide_id, path, cohort[, mpp]) and the annotation CSV, checked together.

    Raises ConfigError for a bad sample sheet and BenchmarkError for bad annotations (including one that
    refers to a slide the sheet lacks).
    """
    paths, mpps = slides_from_sheet(read_sample_sheet(samples))
    return AnnotatedSlides(read_annotations(annotations, slide_ids=list(paths)), paths, mpps)
