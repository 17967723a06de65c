"""The formatters behind ``--log-format``: a record's extra fields reach the output."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from dispatcher.log_format import JsonFormatter, TextFormatter, extra_fields


def record(msg: str = "row dead-lettered", **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("dispatcher.settle", logging.WARNING, __file__, 1, msg, None, None)
    r.__dict__.update(extra)
    r.created = datetime(2026, 1, 2, 3, 4, 5, 678_000, UTC).timestamp()
    return r


FIELDS = {
    "event": "dispatcher.dead_lettered",
    "trigger": "crm sync",
    "scope": "acme",
    "reason": "handler_error",
    "attempts": 3,
}


def test_extra_fields_are_what_extra_added() -> None:
    assert extra_fields(record(**FIELDS)) == FIELDS
    assert extra_fields(record()) == {}


def test_json_is_one_object_with_the_fields() -> None:
    out = JsonFormatter().format(record(**FIELDS, at=datetime(2026, 1, 1, tzinfo=UTC)))
    assert "\n" not in out
    assert json.loads(out) == {
        "ts": "2026-01-02T03:04:05.678Z",
        "level": "WARNING",
        "logger": "dispatcher.settle",
        "message": "row dead-lettered",
        **FIELDS,
        "at": "2026-01-01 00:00:00+00:00",  # not JSON: its str()
    }
    assert list(json.loads(out))[:5] == ["ts", "level", "logger", "message", "event"]


def test_json_keeps_a_colliding_field_and_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        r = record("poll cycle failed", level="mine")
        r.exc_info = sys.exc_info()
    out = json.loads(JsonFormatter().format(r))
    assert out["level"] == "WARNING"
    assert out["extra.level"] == "mine"
    assert out["exception"].startswith("Traceback")
    assert "ValueError: boom" in out["exception"]


def test_text_appends_the_fields_as_key_value() -> None:
    line = TextFormatter().format(record(**FIELDS, error='said "no"', empty=""))
    assert line.endswith(
        "WARNING dispatcher.settle: row dead-lettered event=dispatcher.dead_lettered "
        'trigger="crm sync" scope=acme reason=handler_error attempts=3 '
        'error="said \\"no\\"" empty=""'
    ), line
    assert TextFormatter().format(record()).endswith("dispatcher.settle: row dead-lettered")


def test_json_lines_are_ascii() -> None:
    out = JsonFormatter().format(record(trigger="envoi-reçu"))
    assert out.isascii()
    assert json.loads(out)["trigger"] == "envoi-reçu"
