"""Rows for the browser tests: triggers registered through the library, dead letters as the
runtime writes them (straight into the table, so each test controls reasons and ages)."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import asyncpg

from dispatcher.core.models import RetryPolicy
from dispatcher.triggers import TriggerRegistry

POLICY = {
    "kind": "exponential",
    "base_delay": 1.0,
    "factor": 2.0,
    "max_delay": 60.0,
    "jitter": 0.1,
    "max_attempts": 3,
    "max_event_age": None,
    "timeout": 10.0,
}


async def trigger(conn: asyncpg.Connection, name: str, scope: str = "shop") -> int:
    t = await TriggerRegistry().register(
        conn,
        scope=scope,
        name=name,
        namespace="orders",
        key_pattern="orders/*",
        target=f"run_{name}",
        registered_by="user:ops",
        retry=RetryPolicy(max_attempts=3),
    )
    return t.id


async def letter(
    conn: asyncpg.Connection,
    trigger_id: int,
    name: str,
    *,
    scope: str = "shop",
    reason: str = "handler_error",
    message: str = "ValueError: card declined",
    age: timedelta = timedelta(minutes=30),
    key: str = "orders/1",
) -> int:
    payload: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "scope": scope,
        "namespace": "orders",
        "key": key,
        "op": "put",
        "value": {"status": "paid", "total": 42},
        "old": {"status": "new", "total": 42},
        "depth": 0,
    }
    errors = [
        {"attempt": n, "kind": reason, "message": message, "at": "2026-12-01T10:00:00+00:00"}
        for n in (1, 2, 3)
    ]
    return int(
        await conn.fetchval(
            """
            INSERT INTO dispatcher.dead_letters (outbox_id, event_id, trigger_id, scope,
                trigger_name, target, registered_by, payload, policy, depth, attempts, reason,
                errors, event_created_at, dead_lettered_at)
            VALUES (1, $1, $2, $3, $4, $5, 'user:ops', $6::jsonb, $7::jsonb, 0, 3, $8,
                $9::jsonb, clock_timestamp() - $10::interval - interval '1 minute',
                clock_timestamp() - $10::interval)
            RETURNING id""",
            uuid.uuid4(),
            trigger_id,
            scope,
            name,
            f"run_{name}",
            json.dumps(payload),
            json.dumps(POLICY),
            reason,
            json.dumps(errors),
            age,
        )
    )


async def shop(conn: asyncpg.Connection) -> dict[str, int]:
    """Two triggers of scope ``shop``: ``charge`` (card errors, timeouts) and ``email``."""
    charge = await trigger(conn, "charge")
    email = await trigger(conn, "email")
    ids = {"charge": charge, "email": email}
    for n in range(3):
        ids[f"declined{n}"] = await letter(
            conn, charge, "charge", age=timedelta(minutes=40 - n), key=f"orders/{n}"
        )
    for n in range(2):
        ids[f"timeout{n}"] = await letter(
            conn,
            charge,
            "charge",
            reason="timeout",
            message="TimeoutError: no reply in 10s",
            age=timedelta(minutes=20 - n),
        )
    ids["smtp"] = await letter(conn, email, "email", message="SMTPError: mailbox full")
    return ids
