"""Logging set-up shared by the CLI and the workflow scripts (rules log to logs/{rule}/{wildcards}.log)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def log_to(path: str | Path | None, level: int = logging.INFO) -> None:
    """Send histodistill's log records (and warnings) to `path` and to stderr."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(path, mode="w"))
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", handlers=handlers, force=True
    )
    logging.captureWarnings(True)

    def log_uncaught(kind, value, tb):  # so the rule's log file says why the job failed
        logging.getLogger("histodistill").critical("job failed: %s", value, exc_info=(kind, value, tb))

    sys.excepthook = log_uncaught
