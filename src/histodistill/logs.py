"""Logging set-up shared by the CLI and the workflow scripts (rules log to logs/{rule}/{wildcards}.log)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from rich.logging import RichHandler

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
"""One record per line: time, level, logger, message (rule logs, SLURM output, pipes)."""


def stderr_handler() -> logging.Handler:
    """The CLI's stderr handler: rich's on a terminal, `LOG_FORMAT` lines elsewhere.

    Off a terminal (SLURM and Snakemake logs, pipes) rich would wrap every record at 80 columns, splitting paths
    and ids across lines so that `grep` misses them; there each record stays one line.
    """
    if sys.stderr.isatty():
        handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    return handler


def log_to(path: str | Path | None, level: int = logging.INFO) -> None:
    """Send histodistill's log records (and warnings) to `path` and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
    logging.basicConfig(level=level, format=LOG_FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)

    def log_uncaught(kind, value, tb):  # so the rule's log file says why the job failed
        logging.getLogger("histodistill").critical("job failed: %s", value, exc_info=(kind, value, tb))

    sys.excepthook = log_uncaught
