"""Config loading: JSON-Schema validation with defaults, and the sample sheet.

No module here imports snakemake: the Snakefile calls these functions, and so do the CLI and the tests.
"""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import jsonschema
import pandas as pd
import yaml

from histodistill.errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "configs" / "schema.yaml"
SAMPLE_COLUMNS = ("slide_id", "path", "cohort")


def load_schema(path: str | Path | None = None) -> dict[str, Any]:
    with open(path or SCHEMA_PATH) as fh:
        return yaml.safe_load(fh)


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

    Quote characters are literal (paths may contain them); ids must be unique and file-name safe.
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
    bad = [s for s in sheet["slide_id"] if not safe_id(s)]
    bad += [c for c in sheet["cohort"].unique() if not safe_id(c)]
    if bad:
        raise ConfigError(
            f"sample sheet {path}: id(s) {bad} may hold only letters, digits, '.', '_' and '-' "
            "(they become file names)"
        )
    if "mpp" not in sheet.columns:
        sheet["mpp"] = ""
    mpp = pd.to_numeric(sheet["mpp"].replace("", None), errors="coerce")
    bad_mpp = sheet.loc[mpp.isna() & (sheet["mpp"] != ""), "slide_id"].tolist()
    if bad_mpp:
        raise ConfigError(f"sample sheet {path}: 'mpp' is not a number for slide(s) {bad_mpp}")
    sheet["mpp"] = mpp.astype("float64")
    return sheet.set_index("slide_id", drop=False)


def safe_id(value: str) -> bool:
    return bool(value) and all(ch.isalnum() or ch in "._-" for ch in value) and not value.startswith(".")
