"""The invariant checker's own rules, on hand-made ledgers (no database)."""

from __future__ import annotations

import json
from typing import Any

from tests.chaos.harness import _without_phantom_starts
from tests.chaos.ledger import LEDGER_START_FAILED


def _run(attempt: int, outcome: str | None, previous_error: dict[str, Any] | None) -> Any:
    return {
        "attempt": attempt,
        "outcome": outcome,
        "previous_error": None if previous_error is None else json.dumps(previous_error),
    }


def test_a_start_reported_as_failed_is_not_an_execution() -> None:
    phantom = _run(1, None, None)
    retry = _run(1, "success", {"kind": "rate_limited", "message": f"{LEDGER_START_FAILED}: x"})
    assert _without_phantom_starts([phantom, retry]) == [retry]


def test_other_unfinished_starts_are_kept() -> None:
    killed = _run(1, None, None)
    # Re-run after a lost lease (the process died): its row's last error says nothing of it.
    rerun = _run(1, "success", None)
    assert _without_phantom_starts([killed, rerun]) == [killed, rerun]
    limited = _run(1, None, None)
    after = _run(1, "success", {"kind": "rate_limited", "message": "RateLimited: slow down"})
    assert _without_phantom_starts([limited, after]) == [limited, after]
    timed_out = _run(1, None, None)
    next_attempt = _run(2, "success", {"kind": "rate_limited", "message": LEDGER_START_FAILED})
    assert _without_phantom_starts([timed_out, next_attempt]) == [timed_out, next_attempt]
