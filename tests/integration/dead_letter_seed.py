"""Seed dead letters, outbox rows and abandoned executions as the runtime writes them.

Shared by test_admin.py and test_cli.py. Rows go straight into the tables (the shapes are
those of ``dispatcher.sql``'s dead-letter and abandoned-execution statements), so each test
controls ages and resolutions exactly.
"""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import asyncpg

from dispatcher.core.models import Mutation, Op, RetryPolicy
from dispatcher.emit import Emitter
from dispatcher.triggers import TriggerRegistry

SNAPSHOT_POLICY: dict[str, Any] = {
    "kind": "linear",
    "base_delay": 2.0,
    "factor": 1.0,
    "max_delay": 20.0,
    "jitter": 0.0,
    "max_attempts": 3,
    "max_event_age": 3600.0,
    "timeout": 12.0,
}


async def add_trigger(
    conn: asyncpg.Connection, name: str, *, scope: str = "acme", schema: str = "dispatcher",
    **kw: Any,
) -> int:  # fmt: skip
    params: dict[str, Any] = {
        "scope": scope,
        "name": name,
        "namespace": "users",
        "key_pattern": "users/*",
        "target": f"run_{name}",
        "registered_by": "user:7",
        "retry": RetryPolicy(max_attempts=8, base_delay=5, max_delay=60, jitter=0.2),
        "execution_timeout": 45,
    }
    params.update(kw)
    return (await TriggerRegistry(schema).register(conn, **params)).id


def event(key: str = "users/42", scope: str = "acme", depth: int = 0) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "scope": scope,
        "namespace": "users",
        "key": key,
        "op": "put",
        "value": {"plan": "pro", "seats": 3},
        "depth": depth,
    }


async def dead_letter(
    conn: asyncpg.Connection,
    *,
    trigger_id: int,
    trigger_name: str = "welcome",
    scope: str = "acme",
    reason: str = "handler_error",
    resolution: str = "open",
    age: timedelta = timedelta(hours=1),
    resolved_age: timedelta | None = None,
    replayed_as: uuid.UUID | None = None,
    payload: dict[str, Any] | None = None,
    policy: Any = None,
    depth: int = 0,
    attempts: int = 3,
    errors: list[Any] | None = None,
    schema: str = "dispatcher",
) -> int:
    """Insert one dead letter, dead-lettered ``age`` ago (resolved ``resolved_age`` ago)."""
    if errors is None:
        errors = [
            {
                "attempt": n,
                "kind": "handler_error",
                "message": f"ValueError: smtp refused #{n}",
                "at": f"2026-11-22T10:0{n}:00.123456+00:00",
            }
            for n in range(1, attempts + 1)
        ]
    if resolution != "open" and resolved_age is None:
        resolved_age = age / 2
    return int(
        await conn.fetchval(
            f"""
            INSERT INTO "{schema}".dead_letters (outbox_id, event_id, trigger_id, scope,
                trigger_name, target, registered_by, payload, policy, depth, attempts, reason,
                errors, resolution, replayed_as, event_created_at, dead_lettered_at,
                resolved_at)
            VALUES ($1, $2, $3, $4, $5, $6, 'user:7', $7::jsonb, $8::jsonb, $9, $10, $11,
                $12::jsonb, $13, $14, clock_timestamp() - $15::interval - interval '1 minute',
                clock_timestamp() - $15::interval, clock_timestamp() - $16::interval)
            RETURNING id""",
            1000 + trigger_id,
            uuid.uuid4(),
            trigger_id,
            scope,
            trigger_name,
            f"run_{trigger_name}",
            json.dumps(payload if payload is not None else event(scope=scope, depth=depth)),
            json.dumps(SNAPSHOT_POLICY if policy is None else policy),
            depth,
            attempts,
            reason,
            json.dumps(errors),
            resolution,
            replayed_as,
            age,
            resolved_age,
        )
    )


async def enqueue(
    conn: asyncpg.Connection, *keys: str, scope: str = "acme", schema: str = "dispatcher"
) -> list[int]:
    """Emit puts of ``keys``; the outbox ids written."""
    mutations = [Mutation(scope, "users", k, Op.PUT, {"k": k}) for k in keys]
    return [e.outbox_id for e in await Emitter(schema).emit_many(conn, mutations, autocommit=True)]


async def set_state(
    conn: asyncpg.Connection, outbox_id: int, *, due_in: float, leased: bool = False
) -> None:
    """Move an outbox row's due time ``due_in`` seconds from now, with or without a lease."""
    await conn.execute(
        """UPDATE dispatcher.outbox
        SET due_at = clock_timestamp() + make_interval(secs => $2),
            lease_token = CASE WHEN $3 THEN gen_random_uuid() END
        WHERE id = $1""",
        outbox_id,
        due_in,
        leased,
    )


async def abandoned(
    conn: asyncpg.Connection,
    *,
    scope: str = "acme",
    outcome: str = "success",
    age: timedelta = timedelta(minutes=5),
    trigger_id: int = 1,
) -> int:
    return int(
        await conn.fetchval(
            """INSERT INTO dispatcher.abandoned_executions (reply_to, event_id, trigger_id,
                scope, target, status, outcome, result, error, created_at)
            VALUES ('inbox:host-1:17', $1, $2, $3, 'quote', $4, $5, $6::jsonb, $7,
                clock_timestamp() - $8::interval)
            RETURNING id""",
            uuid.uuid4(),
            trigger_id,
            scope,
            200 if outcome == "success" else 504,
            outcome,
            json.dumps({"price": 12.5}) if outcome == "success" else None,
            None if outcome == "success" else "timeout: no reply in 5s",
            age,
        )
    )


async def rows(conn: asyncpg.Connection, table: str, schema: str = "dispatcher") -> list[Any]:
    """Every row of a table, in id order, as comparable tuples."""
    return [tuple(r) for r in await conn.fetch(f'SELECT * FROM "{schema}".{table} ORDER BY id')]
