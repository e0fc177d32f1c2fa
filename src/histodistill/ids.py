"""The one id validator (slide, cohort and dataset ids) and the path guard every writer uses.

An id becomes part of a file name (`tiles/{cohort}/{slide}.parquet`, an exporter's `{out}/{slide_id}.h5`), so
it must be safe on every file system and match the Snakemake wildcard constraints exactly: the sample sheet,
the PLISM manifest, the CLI (`--slide-id`) and `rules/common.smk` all use `ID_REGEX` through this module, so
an id the sheet accepts can never fail later in Snakemake with an unclear MissingInputException.

An id is 1–`ID_MAX_CHARS` ASCII characters: letters, digits, `_` and `-`, and single dots between them. It
cannot start or end with a dot, hold `..`, a path separator, a space or any non-ASCII character (Unicode
letters look alike and normalise differently across file systems).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from pathlib import Path

from histodistill.errors import ConfigError, HistodistillError

log = logging.getLogger(__name__)

ID_REGEX = r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*"  # also the wildcard constraint of slide, cohort, dataset
ID_MAX_CHARS = 200  # leaves room for suffixes within the usual 255-byte file-name limit
_ID = re.compile(ID_REGEX)
ID_RULE = (
    "ASCII letters, digits, '_', '-' and single '.' between them (no '/', '\\', '..', spaces, "
    f"leading or trailing '.', non-ASCII letters; at most {ID_MAX_CHARS} characters)"
)
TIFF_SUFFIXES = (".tif", ".tiff")


class IdError(ConfigError):
    """An id (slide, cohort, dataset) is not file-name safe."""


class PathEscapeError(HistodistillError):
    """A writer's final path would land outside the folder it writes into."""


def is_safe_id(value: object) -> bool:
    """Whether `value` is a valid id (see the module docstring); never raises."""
    return isinstance(value, str) and len(value) <= ID_MAX_CHARS and _ID.fullmatch(value) is not None


def check_id(value: object, what: str = "slide id", where: str = "", hint: str = "") -> str:
    """`value` itself when it is a valid id; else IdError naming it, `what` it is, `where`, the rule and
    what to do (`hint`, by default: rename it)."""
    if is_safe_id(value):
        return value  # type: ignore[return-value]
    place = f"{where}: " if where else ""
    todo = hint or "Rename it (it becomes a file name)."
    raise IdError(f"{place}{what} {value!r} is not a safe id: use only {ID_RULE}. {todo}")


def bad_ids(values) -> list:
    """The values (in order, without repeats) that are not valid ids."""
    return list(dict.fromkeys(v for v in values if not is_safe_id(v)))


def id_from_path(path: str | Path) -> str:
    """The default slide id of a slide file: its name without the extension, and without `.ome` for OME-TIFF.

    `a.svs` → `a`, `a.ome.tiff` → `a`, `a.ome.tif` → `a`, `b.v2.tiff` → `b.v2`. A name that is not a valid
    id is corrected, with a logged warning: accents are dropped (Unicode NFKD), each run of other characters
    becomes `_`, runs of dots one dot, leading and trailing dots go (`slide one's.tiff` → `slide_one_s`,
    `tissue é.svs` → `tissue_e`). Raises IdError when nothing valid is left (then give the id explicitly,
    e.g. `--slide-id`).
    """
    name = Path(path).name
    stem = Path(name).stem
    if Path(name).suffix.lower() in TIFF_SUFFIXES and stem.lower().endswith(".ome"):
        stem = stem[: -len(".ome")]
    if is_safe_id(stem):
        return stem
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode("ascii")
    fixed = re.sub(r"\.{2,}", ".", re.sub(r"[^A-Za-z0-9_.-]+", "_", ascii_stem)).strip(".")[:ID_MAX_CHARS]
    check_id(
        fixed,
        "slide id",
        f"file name {str(path)!r}",
        "Rename the file, or give a safe id (--slide-id, the sample sheet's slide_id).",
    )
    log.warning(
        "slide id %r (from the file name %s) is not a safe id; using %r (--slide-id sets it)",
        stem,
        path,
        fixed,
    )
    return fixed


def inside(folder: str | Path, *parts: str) -> Path:
    """`folder / parts…`, resolved, when it lies inside `folder`; else PathEscapeError naming both.

    Every writer that builds a path from an id calls this, so an id such as `../escaped` (or a symlink in
    the way) cannot make it write outside its folder, even when the id check was bypassed.
    """
    root = Path(folder).resolve()
    target = root.joinpath(*parts).resolve()
    if target == root or not target.is_relative_to(root):
        raise PathEscapeError(
            f"refusing to write {Path(folder).joinpath(*parts)}: it resolves to {target}, outside {root}. "
            f"The id in it ({'/'.join(parts)!r}) must be a safe id: {ID_RULE}."
        )
    return target
