"""Claimed outbox rows as routing and execution see them."""

from __future__ import annotations

import json

import asyncpg

from dispatcher.core.models import JsonValue, RetryPolicy
from dispatcher.core.outcomes import ClaimedRow
from dispatcher.triggers import policy_from_record

_POLICIES: dict[tuple[object, ...], RetryPolicy] = {}


def _policy(r: asyncpg.Record) -> RetryPolicy:
    # Rows of one trigger share one snapshot: validate it once, not once per row.
    key = (
        r["retry_kind"],
        r["retry_base_delay"],
        r["retry_factor"],
        r["retry_max_delay"],
        r["retry_jitter"],
        r["max_attempts"],
        r["max_event_age"],
        tuple(r["park_on"]),
    )
    policy = _POLICIES.get(key)
    if policy is None:
        if len(_POLICIES) > 10_000:
            _POLICIES.clear()
        policy = _POLICIES[key] = policy_from_record(r)
    return policy


def row_from_record(r: asyncpg.Record) -> ClaimedRow:
    """The claimed row as routing sees it. Raises on a row that cannot be decoded (see
    :func:`undecodable_row`)."""
    return ClaimedRow(
        id=r["id"],
        lease_token=r["lease_token"],
        event_id=r["event_id"],
        trigger_id=r["trigger_id"],
        scope=r["scope"],
        trigger_name=r["trigger_name"],
        target=r["target"],
        registered_by=r["registered_by"],
        payload=json.loads(r["payload"]),
        attempts=r["attempts"],
        orphans=r["orphans"],
        depth=r["depth"],
        reply_to=r["reply_to"],
        dead_letter_id=r["dead_letter_id"],
        policy=_policy(r),
        timeout=r["timeout"],
        age=r["age"],
    )


UNDECODABLE_PAYLOAD = "payload withheld: it could not be decoded"


def undecodable_row(r: asyncpg.Record) -> ClaimedRow:
    """What can be read of a claimed row that :func:`row_from_record` refused: enough to
    settle it. A payload the decoder cannot follow is replaced by a note (it could not be
    redacted either); a policy out of range by the default one, which is never used to
    run it."""
    try:
        payload: JsonValue = json.loads(r["payload"])
    except Exception:  # RecursionError for nesting past the decoder's depth, among others
        payload = {"undecodable": UNDECODABLE_PAYLOAD}
    return ClaimedRow(
        id=r["id"],
        lease_token=r["lease_token"],
        event_id=r["event_id"],
        trigger_id=r["trigger_id"],
        scope=r["scope"],
        trigger_name=r["trigger_name"],
        target=r["target"],
        registered_by=r["registered_by"],
        payload=payload,
        attempts=r["attempts"],
        orphans=r["orphans"],
        depth=r["depth"],
        reply_to=r["reply_to"],
        dead_letter_id=r["dead_letter_id"],
        policy=RetryPolicy(),
        timeout=1.0,
        age=r["age"],
    )
