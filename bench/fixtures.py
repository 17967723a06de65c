"""Triggers, mutations and seeded rows the scenarios share, all made through the public API
except where a scenario needs a million rows (B8), which it writes with one INSERT … SELECT.
"""

from __future__ import annotations

import json

import asyncpg

import dispatcher
from dispatcher import BackoffKind, Mutation, Op, RetryPolicy

SCOPE = "bench"
NAMESPACE = "items"
TARGET = "noop"
PRINCIPAL = "user:bench"

# Fast retries so that B5's retried rows come back within the drain.
B5_RETRY = RetryPolicy(kind=BackoffKind.EXPONENTIAL, base_delay=0.05, max_delay=1.0, max_attempts=5)


def mutation(i: int, *, prefix: str = "k", scope: str = SCOPE) -> Mutation:
    """The mutation every scenario emits: a small JSON value, one key per ``i``."""
    return Mutation(scope, NAMESPACE, f"{prefix}/{i}", Op.PUT, {"n": i, "tag": "bench"})


async def register_triggers(
    conn: asyncpg.Connection,
    count: int = 1,
    *,
    scope: str = SCOPE,
    pattern: str = "k/*",
    target: str = TARGET,
    retry: RetryPolicy | None = None,
    name: str = "t",
    ordering: str | None = None,
    delivery: str = "all",
) -> list[int]:
    """``count`` triggers that all match ``pattern`` (a fan-out of ``count`` per mutation)."""
    registry = dispatcher.TriggerRegistry(max_triggers_per_scope=max(1000, count + 10))
    ids = []
    for i in range(count):
        t = await registry.register(
            conn,
            scope=scope,
            name=f"{name}{i}",
            namespace=NAMESPACE,
            key_pattern=pattern,
            target=target,
            registered_by=PRINCIPAL,
            retry=retry,
            ordering=ordering,
            delivery=delivery,
        )
        ids.append(t.id)
    return ids


async def register_crowd(conn: asyncpg.Connection, scope: str, count: int) -> None:
    """``count`` triggers in ``scope``, of which exactly one (``hit/*``) matches ``hit/…``
    keys: a third exact keys, a third prefixes and a third globs, each with its own literal
    prefix, so they look like a real tenant's triggers rather than copies of one pattern."""
    registry = dispatcher.TriggerRegistry(max_triggers_per_scope=count + 10)
    async with conn.transaction():
        await registry.register(
            conn,
            scope=scope,
            name="hit",
            namespace=NAMESPACE,
            key_pattern="hit/*",
            target=TARGET,
            registered_by=PRINCIPAL,
        )
        for i in range(count - 1):
            pattern = (f"users/{i}/profile", f"orders/{i}/*", f"carts/{i}/*/line?")[i % 3]
            await registry.register(
                conn,
                scope=scope,
                name=f"t{i}",
                namespace=NAMESPACE,
                key_pattern=pattern,
                target=TARGET,
                registered_by=PRINCIPAL,
            )


async def seed_outbox(
    conn: asyncpg.Connection,
    rows: int,
    *,
    chunk: int = 2_000,
    prefix: str = "k",
    keys: int | None = None,
) -> None:
    """``rows`` due outbox rows (one trigger must match ``prefix/*``), by bulk emit, then
    VACUUM ANALYZE as autovacuum would have done on a live system. With ``keys``, the rows
    spread over that many keys (row i mutates key i % keys)."""
    for start in range(0, rows, chunk):
        batch = [
            mutation(i, prefix=prefix) if keys is None else _on_key(i, keys, prefix)
            for i in range(start, min(rows, start + chunk))
        ]
        await dispatcher.emit_many(conn, batch, autocommit=True)
    await conn.execute("VACUUM ANALYZE dispatcher.outbox")


def _on_key(i: int, keys: int, prefix: str) -> Mutation:
    return Mutation(SCOPE, NAMESPACE, f"{prefix}/{i % keys}", Op.PUT, {"n": i, "tag": "bench"})


def payload_text(i: int) -> str:
    """The same JSON event ``emit`` writes for :func:`mutation`, for the raw baselines."""
    m = mutation(i)
    event = {
        "event_id": str(m.event_id),
        "scope": m.scope,
        "namespace": m.namespace,
        "key": m.key,
        "op": m.op.value,
        "value": m.value,
        "depth": m.depth,
    }
    return json.dumps(event, separators=(",", ":"))


OUTBOX_COLUMNS = (
    "event_id, payload, depth, trigger_id, scope, trigger_name, target, registered_by, "
    "retry_kind, retry_base_delay, retry_factor, retry_max_delay, retry_jitter, "
    "max_attempts, max_event_age, timeout"
)


def raw_insert_one() -> str:
    """One outbox row per statement, values a real emit would write, no matching."""
    return f"""
        INSERT INTO dispatcher.outbox ({OUTBOX_COLUMNS})
        VALUES ($1, $2::jsonb, 0, $3, 'bench', 't0', 'noop', 'user:bench',
            'exponential', 1, 2, 300, 0.1, 5, NULL, 30)"""


def raw_insert_many() -> str:
    """Many outbox rows in one statement, from arrays."""
    return f"""
        INSERT INTO dispatcher.outbox ({OUTBOX_COLUMNS})
        SELECT e, p::jsonb, 0, t, 'bench', 't0', 'noop', 'user:bench',
            'exponential', 1, 2, 300, 0.1, 5, NULL, 30
        FROM unnest($1::uuid[], $2::text[], $3::bigint[]) AS u(e, p, t)"""


def seed_generate_series(*, spread: bool) -> str:
    """``$1`` due rows for trigger ``$2`` in one statement (B8's million). With ``spread``
    they fell due over the past hour, in id order; without, they are due now (new rows)."""
    due = "now() - interval '1 hour' + g * (interval '1 hour' / $1)" if spread else "now()"
    return f"""
        INSERT INTO dispatcher.outbox ({OUTBOX_COLUMNS}, due_at, created_at)
        SELECT gen_random_uuid(),
            jsonb_build_object('event_id', gen_random_uuid(), 'scope', 'bench',
                'namespace', 'items', 'key', 'k/' || g, 'op', 'put',
                'value', jsonb_build_object('n', g, 'tag', 'bench'), 'depth', 0),
            0, $2, 'bench', 't0', 'noop', 'user:bench',
            'exponential', 1, 2, 300, 0.1, 5, NULL, 30,
            {due}, now() - interval '1 hour'
        FROM generate_series(1, $1::int) AS g"""
