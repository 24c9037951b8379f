"""The daemon's structured logging: one logger, ``ckptd``, writing ``key=value`` or JSON lines.

Call sites pass their fields with ``fields`` (or ``step_fields`` for a save or restore,
which puts ``run``, ``rank`` and ``step`` first), so that every line about a step carries
the same keys::

    log.info("save accepted %s", step_fields(key, bytes=1024))
    # text: 2025-01-01T00:00:00.123 level=info logger=ckptd.servicer msg="save accepted"
    #       run=a rank=0 step=7 bytes=1024
    # json: {"time": "...", "level": "info", "logger": "ckptd.servicer",
    #        "msg": "save accepted", "run": "a", "rank": 0, "step": 7, "bytes": 1024}

``fields`` returns a ``Fields``: a string (so ``%s`` renders it as ``key=value`` pairs
under any formatter, including a host application's) that also keeps the values, so the
JSON formatter emits them with their types rather than parsing text back.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from typing import Any, Protocol, TextIO

LOGGER_NAME = "ckptd"
LOG_FORMATS = ("text", "json")
_BARE = re.compile(r"[A-Za-z0-9_.:/@+-]+")
# A ``key=value`` pair of a plain-string message; the value may be double-quoted.
_PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.]*)=("(?:[^"\\]|\\.)*"|\S*)')
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"
# Keys every JSON line has; a field with one of these names is prefixed with "field.".
_RESERVED = ("time", "level", "logger", "msg", "exc")


class _Step(Protocol):
    @property
    def run(self) -> str: ...
    @property
    def rank(self) -> int: ...
    @property
    def step(self) -> int: ...


def get_logger(suffix: str = "") -> logging.Logger:
    """Returns ``ckptd`` or a child of it (``ckptd.server``)."""
    return logging.getLogger(f"{LOGGER_NAME}.{suffix}" if suffix else LOGGER_NAME)


def quote(value: object) -> str:
    """Renders a value for a ``key=value`` line, quoting it when it has spaces or symbols."""
    text = str(value)
    if _BARE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


class Fields(str):
    """``key=value`` pairs as text, with the values kept in ``values`` for JSON output."""

    values: dict[str, object]

    def __new__(cls, values: dict[str, object]) -> Fields:
        text = " ".join(f"{key}={quote(value)}" for key, value in values.items())
        made = super().__new__(cls, text)
        made.values = values
        return made


def fields(**values: object) -> Fields:
    """Formats keyword arguments as ``key=value`` pairs, skipping None values."""
    return Fields({key: value for key, value in values.items() if value is not None})


def step_fields(key: _Step, **more: object) -> Fields:
    """The fields of a line about one step: ``run``, ``rank``, ``step``, then ``more``."""
    return fields(run=key.run, rank=key.rank, step=key.step, **more)


def split_record(record: logging.LogRecord) -> tuple[str, dict[str, object]]:
    """Returns a record's message without its fields, and the fields.

    Fields come from ``Fields`` arguments (typed values) or, for a plain message, from the
    ``key=value`` pairs that follow its words (string values).
    """
    args = record.args if isinstance(record.args, tuple) else ()
    found = [arg for arg in args if isinstance(arg, Fields)]
    if found:
        rest = tuple("" if isinstance(arg, Fields) else arg for arg in args)
        message = " ".join((str(record.msg) % rest).split())
        merged: dict[str, object] = {}
        for item in found:
            merged.update(item.values)
        return message, merged
    text = record.getMessage()
    match = next((m for m in _PAIR.finditer(text) if m.start() == 0 or text[m.start() - 1] == " "),
                 None)
    if match is None:
        return text, {}
    pairs: dict[str, object] = {
        m.group(1): _unquote(m.group(2)) for m in _PAIR.finditer(text, match.start())
    }
    return text[: match.start()].strip(), pairs


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1].replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
    return value


class KeyValueFormatter(logging.Formatter):
    """Formats a record as ``<time> level=<l> logger=<name> msg="<message>" [k=v ...]``."""

    def format(self, record: logging.LogRecord) -> str:
        message, values = split_record(record)
        line = (
            f"{_timestamp(self, record)} level={record.levelname.lower()} "
            f"logger={record.name} msg={quote(message)}"
        )
        if values:
            line += " " + Fields(values)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object per line: time, level, logger, msg, the fields
    (with their types) and, for an exception, ``exc`` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        message, values = split_record(record)
        line: dict[str, Any] = {
            "time": _timestamp(self, record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": message,
        }
        for key, value in values.items():
            line[f"field.{key}" if key in _RESERVED else key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def _timestamp(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    return f"{formatter.formatTime(record, _TIME_FORMAT)}.{int(record.msecs):03d}"


def make_formatter(log_format: str) -> logging.Formatter:
    """The formatter of ``log_format`` ("text" or "json")."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    return JsonFormatter() if log_format == "json" else KeyValueFormatter()


def configure(level: str = "info", log_format: str = "text", stream: TextIO | None = None) -> None:
    """Sends the ``ckptd`` logger's records to ``stream`` (stderr) as text or JSON lines.

    Called once by the CLI; an embedding process (tests, benchmarks) keeps its own logging.
    """
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(level.upper())
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(make_formatter(log_format))
    logger.handlers[:] = [handler]
    logger.propagate = False
