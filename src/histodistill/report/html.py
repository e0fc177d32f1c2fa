"""The report page: one self-contained HTML file (inline CSS, figures as base64 PNG, no external URL).

Every piece of text that comes from data (model, task and method names, config values) goes through
`html.escape`, so a name such as `<b>` shows as text and cannot break the page. Missing values show as "–".
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

MISSING = "\u2013"  # en dash

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1200px; padding: 0 1em; color: #222; line-height: 1.4; }
h1 { border-bottom: 2px solid #444; padding-bottom: 0.2em; }
h2 { border-bottom: 1px solid #bbb; padding-bottom: 0.15em; margin-top: 2em; }
.scroll { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; }
td.key, th.key { text-align: left; }
td.best { font-weight: bold; }
tr:nth-child(even) td { background: #fafafa; }
figure { display: inline-block; margin: 0.5em 1em 1em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; max-width: 640px; }
.note { font-size: 0.85em; color: #555; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.35em; border: 1px solid #555; }
pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
nav a { margin-right: 1em; }
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def is_missing(value: object) -> bool:
    if value is None or value is pd.NA:
        return True
    try:
        return math.isnan(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def fmt(value: object, digits: int = 3) -> str:
    """A number with `digits` decimals; "–" for None/NaN; other values as text (escaped by the caller)."""
    if is_missing(value):
        return MISSING
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_pm(mean: object, std: object, digits: int = 3) -> str:
    if is_missing(mean):
        return MISSING
    return fmt(mean, digits) if is_missing(std) else f"{fmt(mean, digits)} ± {fmt(std, digits)}"


def fmt_ci(value: object, low: object, high: object, digits: int = 3) -> str:
    if is_missing(value):
        return MISSING
    if is_missing(low) or is_missing(high):
        return fmt(value, digits)
    return f"{fmt(value, digits)} [{fmt(low, digits)}, {fmt(high, digits)}]"


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    n_keys: int = 1,
    bold: set[tuple[int, int]] | None = None,
) -> str:
    """An HTML table of already formatted (unescaped) cells; the first `n_keys` columns align left."""
    bold = bold or set()
    head = "".join(f"<th{' class=key' if j < n_keys else ''}>{esc(h)}</th>" for j, h in enumerate(header))
    body = []
    for i, row in enumerate(rows):
        cells = []
        for j, cell in enumerate(row):
            cls = [c for c, on in (("key", j < n_keys), ("best", (i, j) in bold)) if on]
            attr = f' class="{" ".join(cls)}"' if cls else ""
            cells.append(f"<td{attr}>{esc(cell)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    # inside a scrolling box: a wide table (many models or metrics) scrolls within its section, not the page
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def figure(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure><img src="data:image/png;base64,{data}" alt="{esc(alt)}">'
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def note(text: str) -> str:
    return f'<p class="note">{esc(text)}</p>'


def section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{esc(anchor)}"><h2>{esc(title)}</h2>{body}</section>'


def model_legend(colors: Mapping[str, str]) -> str:
    items = [f'<span class="swatch" style="background:{esc(c)}"></span>{esc(m)}' for m, c in colors.items()]
    return '<p class="note">Models: ' + " &nbsp; ".join(items) + "</p>"


def wide_table(
    frame: pd.DataFrame,
    keys: Sequence[str],
    models: Sequence[str],
    cell,
    key_labels: Sequence[str] | None = None,
) -> str:
    """One row per distinct `keys` tuple of `frame`, one column per model; `cell(row)` formats a value.

    A model without a row for a key tuple shows "–".
    """
    keys = list(keys)
    lookup: dict[tuple, dict[str, str]] = {}
    for rec in frame.to_dict(orient="records"):
        key = tuple(None if is_missing(rec[k]) else rec[k] for k in keys)  # NaN ≠ NaN: one key for all
        lookup.setdefault(key, {})[rec["model"]] = cell(rec)
    rows = [
        [*(MISSING if k is None else str(k) for k in key), *(by.get(m, MISSING) for m in models)]
        for key, by in lookup.items()
    ]
    return table([*(key_labels or keys), *models], rows, n_keys=len(keys))


def leaderboard_table(
    board: pd.DataFrame,
    labels: Mapping[str, str],
    higher_better: set[str],
    flagged: Sequence[str] = (),
) -> str:
    """The model × benchmark table; the best value of each metric column (≥ 2 models) in bold.

    Models in `flagged` (collapsed or uninformative) are never bold, and never make another model not bold.
    """
    columns = list(board.columns)
    bold = set()
    counted = ~board["model"].isin(list(flagged)).to_numpy()
    for j, col in enumerate(columns):
        if col not in higher_better:
            continue
        values = pd.to_numeric(board[col], errors="coerce").where(counted)
        if values.notna().sum() >= 2:
            best = values.max()
            bold |= {(i, j) for i, v in enumerate(values) if v == best}
    digits = {"params_m": 1, "gflops": 2, "tiles_per_s": 1}
    rows = [
        [fmt(v, digits.get(c, 3)) for c, v in zip(columns, rec, strict=True)]
        for rec in board.itertuples(index=False)
    ]
    return table([labels.get(c, c) for c in columns], rows, n_keys=1, bold=bold)


def key_values(items: Sequence[tuple[str, Any]]) -> str:
    rows = [[k, v if isinstance(v, str) else json.dumps(v, default=str)] for k, v in items]
    return table(["item", "value"], rows, n_keys=2)


def details(summary: str, body: str) -> str:
    return f"<details><summary>{esc(summary)}</summary>{body}</details>"


def pre(text: str) -> str:
    return f"<pre>{esc(text)}</pre>"


def page(title: str, sections: Sequence[tuple[str, str, str]], preamble: str = "") -> str:
    """The whole document; `sections` are (anchor, title, body HTML)."""
    nav = " ".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    body = "".join(section(a, t, b) for a, t, b in sections)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>"
        f"<h1>{esc(title)}</h1>{preamble}<nav>{nav}</nav>{body}</body></html>\n"
    )
