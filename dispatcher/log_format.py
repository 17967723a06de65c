"""Log formatters that keep a record's structured fields: every ``extra`` the library passes
(``event``, ``trigger``, ``scope``, ``reason``, ``attempts`` …) reaches the output.

The library only defines them; it never installs a handler. The ``dispatcher`` command does
(``--log-format text|json``), and an application can use them in its own logging set-up:

>>> handler = logging.StreamHandler()
>>> handler.setFormatter(JsonFormatter())
>>> logging.getLogger("dispatcher").addHandler(handler)
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Literal

__all__ = ["LOG_FORMATS", "JsonFormatter", "TextFormatter", "extra_fields", "formatter"]

LOG_FORMATS = ("text", "json")
LogFormat = Literal["text", "json"]

# Attributes every LogRecord has; whatever else a record carries came from ``extra``.
_STANDARD = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", None, None).__dict__.keys()
    | {"message", "asctime", "taskName"}
)


def extra_fields(record: logging.LogRecord) -> dict[str, object]:
    """The fields a record was given through ``extra``, in the order they were given."""
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    at = datetime.fromtimestamp(record.created, UTC)
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    then the record's ``extra`` fields under their own names (``event`` first), and
    ``exception`` with the traceback when there is one. A value JSON cannot hold is written
    as its ``str()``; the line is ASCII."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = extra_fields(record)
        if "event" in fields:
            out["event"] = fields.pop("event")
        for key, value in fields.items():
            # A field named like one of ours must not overwrite it.
            out[key if key not in out else f"extra.{key}"] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # ASCII only (non-ASCII as \u escapes): a line must survive a stderr whose encoding
        # is not UTF-8, and every JSON reader decodes the escapes.
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message`` followed by the ``extra`` fields as ``key=value``
    (values with spaces, quotes or ``=`` JSON-quoted), then the traceback if any."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        fields = extra_fields(record)
        if not fields:
            return line
        return line + " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())


def _text_value(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c in text for c in ' "=\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


def formatter(kind: LogFormat) -> logging.Formatter:
    """The formatter for ``--log-format``."""
    return JsonFormatter() if kind == "json" else TextFormatter()
