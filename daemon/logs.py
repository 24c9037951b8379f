"""The daemon's structured logging: one logger, ``ckptd``, writing ``key=value`` lines.

Call sites format their fields with ``fields`` so that every line about a save carries the
same keys (``run``, ``rank``, ``step``) and stays greppable::

    log.info("save accepted %s", fields(run="a", rank=0, step=7, bytes=1024))
    # 2025-01-01T00:00:00 level=info logger=ckptd.server msg="save accepted" run=a rank=0 ...
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TextIO

LOGGER_NAME = "ckptd"
_BARE = re.compile(r"[A-Za-z0-9_.:/@+-]+")


def get_logger(suffix: str = "") -> logging.Logger:
    """Returns ``ckptd`` or a child of it (``ckptd.server``)."""
    return logging.getLogger(f"{LOGGER_NAME}.{suffix}" if suffix else LOGGER_NAME)


def quote(value: object) -> str:
    """Renders a value for a ``key=value`` line, quoting it when it has spaces or symbols."""
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def fields(**values: object) -> str:
    """Formats keyword arguments as ``key=value`` pairs, skipping None values."""
    return " ".join(f"{key}={quote(value)}" for key, value in values.items() if value is not None)


class KeyValueFormatter(logging.Formatter):
    """Formats a record as ``<time> level=<l> logger=<name> msg="<message>" [k=v ...]``."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        # A message is "<words> key=value ..."; the words become msg, the pairs stay as they are.
        words: list[str] = []
        pairs: list[str] = []
        for token in message.split(" "):
            (pairs if pairs or "=" in token else words).append(token)
        line = (
            f"{self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} level={record.levelname.lower()} "
            f"logger={record.name} msg={quote(' '.join(words))}"
        )
        if pairs:
            line += " " + " ".join(pairs)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure(level: str = "info", stream: TextIO | None = None) -> None:
    """Sends the ``ckptd`` logger's records to ``stream`` (stderr) as key=value lines.

    Called once by the CLI; an embedding process (tests, benchmarks) keeps its own logging.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    logger.handlers[:] = [handler]
    logger.propagate = False
