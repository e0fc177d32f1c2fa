"""Provenance stored in every artifact's metadata: package version, config hash, library versions."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from histodistill import __version__

_TRACKED = ("numpy", "openslide-python", "openslide-bin", "zarr", "pyarrow", "scikit-image", "torch", "timm")


def config_hash(params: Any) -> str:
    """A short, stable hash of a rule's parameters (key order does not matter)."""
    blob = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _TRACKED:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def provenance(params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The provenance block: what made this artifact, with which settings."""
    return {
        "histodistill_version": __version__,
        "config_hash": config_hash(params),
        "params": params,
        "versions": library_versions(),
        **extra,
    }


META_KEY = b"histodistill"  # the Parquet schema-metadata key holding an artifact's provenance (JSON)


def write_parquet(frame, out, metadata: dict[str, Any], schema=None) -> None:
    """Write a frame to Parquet atomically, with `metadata` as JSON under META_KEY (pandas' own kept).

    `schema` (a pyarrow.Schema) fixes the column order and types, so that an empty frame is written with
    the same types as a full one; columns it does not name are dropped. The index is not written.
    Raises what pyarrow raises for a frame that does not fit `schema`, and OSError for the file.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from histodistill.atomic import atomic_path

    table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
    table = table.replace_schema_metadata(
        {**(table.schema.metadata or {}), META_KEY: json.dumps(dict(metadata), default=str).encode()}
    )
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)


def read_parquet(
    path, what: str, error: type[Exception], *, required: bool = True
) -> tuple[Any, dict[str, Any] | None]:
    """A frame written by `write_parquet` (pandas.DataFrame) and its metadata (the JSON under META_KEY).

    Raises `error` naming `what` and the path when the file cannot be read as Parquet, or (with `required`)
    carries no histodistill metadata. Without `required`, missing or unreadable metadata gives None (with a
    warning when it is unreadable): for files other tools wrote.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise error(f"cannot read {what} {path}: {exc}") from exc
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        if not required:
            return table.to_pandas(), None
        raise error(f"{path} is not a histodistill {what} (no '{META_KEY.decode()}' metadata)")
    try:
        return table.to_pandas(), json.loads(raw)
    except ValueError as exc:
        if required:
            raise error(f"{what} {path}: unreadable '{META_KEY.decode()}' metadata ({exc})") from exc
        logging.getLogger(__name__).warning("%s %s has unreadable provenance metadata", what, path)
        return table.to_pandas(), None
