"""µm/px values as sample sheets, manifests and rule params give them (no slide library imported).

Kept apart from `histodistill.slides` (which imports OpenSlide) so that the Snakefile's parse-time helpers
stay light: see `tests/unit/test_light_imports.py`.
"""

from __future__ import annotations

import math

__all__ = ["parse_mpp"]


def parse_mpp(value: object) -> float | None:
    """A µm/px override as a sample sheet, a manifest or a rule param gives it: a float, or None for none.

    None, NaN (pandas' missing value) and a blank string mean "no override" and give None (the slide's own
    metadata is then used). A number, or a string holding one, gives that float. Raises ValueError for
    anything else: text that is not a number, inf, zero or a negative value.
    """
    if value is None:
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            out = float(value.strip())
        except ValueError:
            raise ValueError(f"µm/px {value!r} is not a number") from None
    else:
        try:
            out = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ValueError(f"µm/px {value!r} is not a number") from None
        if math.isnan(out):
            return None
    if math.isnan(out) or not math.isfinite(out) or out <= 0:
        raise ValueError(f"µm/px {value!r} is not a number > 0")
    return out
