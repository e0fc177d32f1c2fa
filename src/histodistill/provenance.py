"""Provenance stored in every artifact's metadata: package version, config hash, library versions."""

from __future__ import annotations

import hashlib
import json
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
