"""Config loading: JSON-Schema validation with defaults, and the sample sheet.

No module here imports snakemake: the Snakefile calls these functions, and so do the CLI and the tests.
"""

from __future__ import annotations

import copy
import csv
import logging
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pandas as pd
import yaml

from histodistill.errors import ConfigError
from histodistill.ids import ID_RULE, IdError, bad_ids, is_safe_id
from histodistill.mpp import parse_mpp

log = logging.getLogger(__name__)

SCHEMA_RESOURCE = "schema.yaml"  # package data of `histodistill` (pyproject: tool.setuptools.package-data)
SAMPLE_COLUMNS = ("slide_id", "path", "cohort")
PLISM_MANIFEST_COLUMNS = ("slide_id", "path", "scanner", "staining")
# The settings the report shows (its provenance block): the report rule gets only these as params, so an edit
# of anything else (resources, a SLURM runtime, a distillation setting) does not rerun it. Settings that
# change a result reach the report through its input files, which carry their own config hashes.
REPORT_CONFIG_KEYS = (
    "seed",
    "tiling.mpp",
    "tiling.tile_px",
    "teacher.model",
    "embeddings.models",
    "benchmarks.models",
)
# Defaults of the distillation heads' dimensions: DistillConfig's own, kept here so the workflow can check
# them when it is parsed without importing torch (histodistill.distill imports it).
DISTILL_HEAD_DEFAULTS = {
    "n_prototypes": 1024,
    "dino_bottleneck": 384,
    "ibot_bottleneck": 256,
    "head_hidden": 2048,
}


def load_schema(path: str | Path | None = None) -> dict[str, Any]:
    """The config's JSON Schema (a dict): the packaged `histodistill/schema.yaml`, or the file at `path`.

    The packaged schema is read with importlib.resources, so it works from an installed wheel as well as
    from a source checkout. Raises OSError if `path` cannot be read.
    """
    if path is not None:
        text = Path(path).read_text(encoding="utf-8")
    else:
        text = resources.files("histodistill").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    # libyaml's safe loader where PyYAML was built with it: the same documents, ~10x faster than the pure-
    # Python one (the schema is read every time the Snakefile is parsed, `snakemake -n` included)
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # noqa: S506 (a safe loader)


def _with_defaults(validator_class):
    """A validator that fills in `default` values of absent properties while it validates."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults})


_DefaultingValidator = _with_defaults(jsonschema.Draft202012Validator)


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path)
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        allowed = set(error.schema.get("properties", {}))
        unknown = sorted(k for k in error.instance if k not in allowed)
        keys = ", ".join(f"'{where + '.' if where else ''}{k}'" for k in unknown)
        hint = f" (known keys here: {', '.join(sorted(allowed))})" if allowed else ""
        return f"unknown config key {keys}{hint}"
    if error.validator == "required":
        return f"config key '{where or '<top level>'}': {error.message}"
    return f"config key '{where}': {error.message}"


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate `config` in place against the schema, filling defaults; raise ConfigError naming the key."""
    validator = _DefaultingValidator(schema or load_schema())
    # Two passes: the first fills defaults of nested objects that were themselves defaulted.
    for _ in range(2):
        errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
        if errors:
            raise ConfigError("invalid config: " + "; ".join(_describe(e) for e in errors))
    return config


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with open(path) as fh:
        config = yaml.safe_load(fh) or {}
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path} must hold a mapping, not {type(config).__name__}")
    return validate_config(config)


def read_sample_sheet(path: str | Path) -> pd.DataFrame:
    """Read and check the sample sheet (TSV: slide_id, path, cohort[, mpp]).

    Quote characters are literal (paths may contain them); ids must be unique and valid ids
    (`histodistill.ids`: the validator the CLI and the Snakemake wildcard constraints share). Raises
    ConfigError (IdError for an unsafe id) naming the sheet and the offending ids.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sample sheet not found: {path} (set `samples:` in the config)")
    sheet = pd.read_csv(
        path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE, keep_default_na=False, comment=None
    )
    missing = [c for c in SAMPLE_COLUMNS if c not in sheet.columns]
    if missing:
        raise ConfigError(
            f"sample sheet {path} lacks column(s) {missing}; it needs {list(SAMPLE_COLUMNS)} [+ mpp]"
        )
    unknown = sorted(set(sheet.columns) - set(SAMPLE_COLUMNS) - {"mpp"})
    if unknown:
        raise ConfigError(f"sample sheet {path} has unknown column(s) {unknown}")
    for col in SAMPLE_COLUMNS:
        blank = sheet.index[sheet[col].str.strip() == ""].tolist()
        if blank:
            raise ConfigError(f"sample sheet {path}: empty '{col}' in data row(s) {[i + 1 for i in blank]}")
    dup = sorted(sheet.loc[sheet["slide_id"].duplicated(), "slide_id"].unique())
    if dup:
        raise ConfigError(f"sample sheet {path}: duplicate slide_id(s) {dup}; every slide needs its own id")
    bad = bad_ids(sheet["slide_id"]) + bad_ids(sheet["cohort"])
    if bad:
        raise IdError(
            f"sample sheet {path}: id(s) {bad} are not safe ids: use only {ID_RULE}. Rename them in the "
            "sheet (they become file names and Snakemake wildcards)"
        )
    sheet["mpp"] = mpp_column(sheet, f"sample sheet {path}")
    return sheet.set_index("slide_id", drop=False)


MISSING_SLIDE_ACTIONS = ("error", "skip")


def check_slide_files(
    sheet: pd.DataFrame, made_here: str | Path | None = None, on_missing: str = "error"
) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    """The sheet's rows whose slide file exists, and the rows left out (`slide_id`, `path`).

    A slide under `made_here` (the folder the workflow renders its demo slides into) need not exist yet.
    `on_missing="error"` raises ConfigError naming every missing slide id and path and the switch that
    skips them; `"skip"` drops those rows with a warning and returns them, so the report can list them.
    A slide file is looked up when the workflow loads, for every target: a sheet row must never be dropped
    silently because other results already exist.
    """
    if on_missing not in MISSING_SLIDE_ACTIONS:
        raise ConfigError(f"on_missing_slide must be one of {MISSING_SLIDE_ACTIONS}, not {on_missing!r}")
    prefix = None if made_here is None else str(Path(made_here)) + "/"
    absent = [
        {"slide_id": str(s), "path": str(p)}
        for s, p in zip(sheet["slide_id"], sheet["path"], strict=True)
        if not (prefix and str(p).startswith(prefix)) and not Path(p).exists()
    ]
    if not absent:
        return sheet, []
    listed = "; ".join(f"{a['slide_id']}: {a['path']}" for a in absent[:20])
    more = f" (and {len(absent) - 20} more)" if len(absent) > 20 else ""
    if on_missing == "error":
        raise ConfigError(
            f"{len(absent)} slide file(s) of the sample sheet do not exist: {listed}{more}. Fix the paths, "
            "or set `on_missing_slide: skip` to leave them out (they are listed in the report)"
        )
    log.warning("skipping %d slide(s) whose file does not exist: %s%s", len(absent), listed, more)
    keep = ~sheet["slide_id"].isin([a["slide_id"] for a in absent])
    return sheet[keep], absent


def mpp_column(sheet: pd.DataFrame, where: str) -> pd.Series:
    """The optional `mpp` column of a sheet (µm/px overrides) as float64, NaN where none is given.

    Each cell goes through `histodistill.slides.parse_mpp` (blank → none). Raises ConfigError naming
    `where` and the slide ids whose `mpp` is not a number > 0. Turn a cell back into float | None with
    `parse_mpp` as well.
    """
    if "mpp" not in sheet.columns:
        return pd.Series(np.nan, index=sheet.index, dtype="float64")
    values, bad = [], []
    for slide_id, raw in zip(sheet["slide_id"], sheet["mpp"], strict=True):
        try:
            value = parse_mpp(raw)
        except ValueError:
            bad.append(slide_id)
            continue
        values.append(np.nan if value is None else value)
    if bad:
        raise ConfigError(f"{where}: 'mpp' is not a number > 0 for slide(s) {bad}")
    return pd.Series(values, index=sheet.index, dtype="float64")


def safe_id(value: str) -> bool:
    """Whether `value` is a valid slide/cohort id (`histodistill.ids.is_safe_id`, the one validator)."""
    return is_safe_id(value)


def read_plism_manifest(path: str | Path, reference: str, stainings: list[str] | None = None) -> pd.DataFrame:
    """Read and check the PLISM manifest (TSV: slide_id, path, scanner, staining[, mpp]), indexed by slide_id.

    Lives here, not in `histodistill.matched_tiles` (which re-exports it as `read_manifest`), because the
    workflow reads it when it is parsed, where only light modules may be imported. Raises ConfigError for a
    missing file or column, an unsafe or duplicate slide id, a duplicate (scanner, staining), an unknown
    reference or staining.

    `stainings` keeps only those stainings (e.g. the paper's 3-staining subset); the reference must stay.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"PLISM manifest not found: {path} (set plism.manifest)")
    sheet = pd.read_csv(path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE, keep_default_na=False)
    missing = [c for c in PLISM_MANIFEST_COLUMNS if c not in sheet.columns]
    if missing:
        raise ConfigError(
            f"PLISM manifest {path} lacks column(s) {missing}; it needs {list(PLISM_MANIFEST_COLUMNS)}"
        )
    bad = bad_ids(sheet["slide_id"])
    if bad:
        raise IdError(f"PLISM manifest {path}: unsafe slide id(s) {bad}: use only {ID_RULE}")
    dup = sorted(sheet.loc[sheet["slide_id"].duplicated(), "slide_id"].unique())
    if dup:
        raise ConfigError(f"PLISM manifest {path}: duplicate slide_id(s) {dup}")
    pairs = sheet[["scanner", "staining"]].apply(tuple, axis=1)
    dup_pairs = sorted(set(pairs[pairs.duplicated()]))
    if dup_pairs:
        names = [f"{sc}/{st}: {sheet.loc[pairs == (sc, st), 'slide_id'].tolist()}" for sc, st in dup_pairs]
        raise ConfigError(f"PLISM manifest {path}: duplicate (scanner, staining): {'; '.join(names)}")
    if reference not in set(sheet["slide_id"]):
        raise ConfigError(
            f"PLISM reference '{reference}' is not in the manifest {path} (slide ids: {sheet['slide_id'].tolist()})"
        )
    if stainings:
        unknown = sorted(set(stainings) - set(sheet["staining"]))
        if unknown:
            raise ConfigError(f"plism.stainings: {unknown} not in the manifest {path}")
        ref_staining = sheet.loc[sheet["slide_id"] == reference, "staining"].iloc[0]
        if ref_staining not in stainings:
            raise ConfigError(f"plism.stainings must include the reference's staining '{ref_staining}'")
        sheet = sheet[sheet["staining"].isin(stainings)]
    sheet = sheet.assign(mpp=mpp_column(sheet, f"PLISM manifest {path}"))
    return sheet.set_index("slide_id", drop=False)


def config_slice(config: dict[str, Any], keys: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The part of a nested config holding only the dotted `keys` (e.g. "tiling.mpp"), nested as in `config`.

    Keys absent from `config` are left out. Values are deep copies, so the slice can be edited freely.
    """
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = config
        parts = key.split(".")
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            target = out
            for part in parts[:-1]:
                target = target.setdefault(part, {})
            target[parts[-1]] = copy.deepcopy(node)
    return out
