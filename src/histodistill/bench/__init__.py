"""Benchmark scorers: exact re-implementations of published protocols, on frozen embeddings."""

from histodistill.errors import HistodistillError


class BenchmarkError(HistodistillError):
    """A benchmark's input (task layout, split, manifest, embeddings) is missing or inconsistent."""


def write_scores(frame, out, metadata: dict) -> None:
    """Write a scorer's tidy frame to Parquet atomically, with `metadata` (provenance) as JSON in the schema."""
    from histodistill.provenance import write_parquet

    write_parquet(frame, out, metadata)
