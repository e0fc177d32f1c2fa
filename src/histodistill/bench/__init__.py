"""Benchmark scorers: exact re-implementations of published protocols, on frozen embeddings."""

from histodistill.errors import HistodistillError


class BenchmarkError(HistodistillError):
    """A benchmark's input (task layout, split, manifest, embeddings) is missing or inconsistent."""


def write_scores(frame, out, metadata: dict) -> None:
    """Write a scorer's tidy frame to Parquet atomically, with `metadata` (provenance) as JSON in the schema."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from histodistill.atomic import atomic_path

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({b"histodistill": json.dumps(metadata, default=str).encode()})
    with atomic_path(out) as tmp:
        pq.write_table(table, tmp)
