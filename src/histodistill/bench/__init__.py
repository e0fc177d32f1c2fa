"""Benchmark scorers: exact re-implementations of published protocols, on frozen embeddings."""

from histodistill.errors import HistodistillError


class BenchmarkError(HistodistillError):
    """A benchmark's input (task layout, split, manifest, embeddings) is missing or inconsistent."""
