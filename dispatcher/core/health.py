"""Readiness by progress, not heartbeat: pure verdicts from what a dispatcher (or the tables)
last saw, with the clock readings passed in.

A process is ready when its claims make progress: a claim statement succeeded within the
window, or nothing was due at a backlog sample taken within the window. A claim that returns
no row still counts (paused triggers, open breakers and parked rows are the operator's
doing, not a stall); a claim that fails, blocks, or is never tried (drained, stopping, every
permit held, settlements behind) does not.

>>> process_readiness(phase="idle", since_claim=0.2, due=3, since_sample=1.0, window=30)
Readiness(ready=True, reason='claimed 0.2s ago')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_READY_WINDOW = 30.0
"""Seconds without a successful claim, while rows are due, after which a process is not
ready (``dispatcher run --ready-window``)."""

_DOWN_PHASES = frozenset({"stopping", "stopped"})


@dataclass(frozen=True, slots=True)
class Readiness:
    """A verdict and why, in words an operator can act on."""

    ready: bool
    reason: str


def process_readiness(
    *,
    phase: str,
    since_claim: float | None,
    due: int | None,
    since_sample: float | None,
    window: float,
) -> Readiness:
    """One dispatcher's verdict.

    ``since_claim``: seconds since its latest successful claim statement (None: none yet);
    ``due`` and ``since_sample``: due rows at the latest backlog sample and its age (None:
    no sample); ``phase``: its :class:`~dispatcher.runtime.stats.Phase` value.
    """
    if phase in _DOWN_PHASES:
        return Readiness(False, f"dispatcher is {phase}")
    if since_claim is not None and since_claim <= window:
        return Readiness(True, f"claimed {since_claim:.1f}s ago")
    last = (
        "no successful claim yet"
        if since_claim is None
        else (f"last successful claim {since_claim:.1f}s ago")
    )
    fresh = since_sample is not None and since_sample <= window
    if fresh and due == 0:
        return Readiness(True, f"nothing due at the backlog sample {since_sample:.1f}s ago")
    if fresh:
        return Readiness(False, f"{due} row(s) due, {last} (window {window:g}s, phase {phase})")
    return Readiness(False, f"{last} and no backlog sample within {window:g}s (phase {phase})")


def combined(verdicts: Sequence[Readiness]) -> Readiness:
    """Several dispatchers of one process: ready when every one is (none: not ready)."""
    if not verdicts:
        return Readiness(False, "no dispatcher is watched")
    down = [v.reason for v in verdicts if not v.ready]
    if down:
        return Readiness(False, "; ".join(down))
    return Readiness(True, "; ".join(v.reason for v in verdicts))


def table_readiness(*, claimable: int, oldest_claimable: float | None, window: float) -> Readiness:
    """The verdict the tables give, for every dispatcher of a schema at once: claimable rows
    (due, not parked, paused or held by a breaker) that waited longer than ``window`` mean no
    dispatcher claimed them within it (none running, all stuck, or all too busy)."""
    if claimable == 0 or oldest_claimable is None:
        return Readiness(True, "no claimable row is due")
    if oldest_claimable <= window:
        return Readiness(
            True, f"{claimable} claimable row(s) due, the oldest for {oldest_claimable:.1f}s"
        )
    return Readiness(
        False,
        f"{claimable} claimable row(s) due, the oldest for {oldest_claimable:.1f}s "
        f"(window {window:g}s): no dispatcher claimed them",
    )
