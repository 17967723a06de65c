"""Fan a mutation out into outbox rows inside the caller's transaction.

>>> async with conn.transaction():
...     await conn.execute("UPDATE accounts SET ...")
...     rows = await emit(conn, Mutation("acme", "users", "users/42", Op.PUT, {"plan": "pro"}))

Rolling the transaction back leaves no outbox rows; committing makes them durable. Matching is
done in SQL, in one round trip for any number of mutations.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from dispatcher.core.errors import InvalidInput, LimitExceeded
from dispatcher.core.models import Mutation
from dispatcher.core.patterns import key_prefixes
from dispatcher.db import Connection
from dispatcher.schema import DEFAULT_SCHEMA
from dispatcher.sql import queries

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024
DEFAULT_MAX_FANOUT = 100
DEFAULT_NOTIFY_INTERVAL = 0.002

# Per process and channel: when the last wake-up hint was sent (monotonic seconds).
_LAST_NOTIFY: dict[str, float] = {}


def _should_notify(channel: str, interval: float) -> bool:
    """At most one hint per ``interval`` from this process: a notifying commit takes a
    database-wide lock until its WAL is flushed, so a hint per transaction would make
    concurrent producers commit one at a time. A dispatcher woken by a hint polls again
    shortly after, which picks up rows whose hint was skipped."""
    now = time.monotonic()
    if now - _LAST_NOTIFY.get(channel, -1e9) < interval:
        return False
    _LAST_NOTIFY[channel] = now
    return True


# An escaped NUL in JSON text, not preceded by an escaping backslash: Postgres' jsonb cannot
# store U+0000.
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


@dataclass(frozen=True, slots=True)
class Enqueued:
    """One outbox row written by an emit."""

    outbox_id: int
    event_id: uuid.UUID
    trigger_id: int


def encode_event(mutation: Mutation, *, max_bytes: int) -> str:
    """The event payload every matching trigger receives, as JSON text, within ``max_bytes``."""
    event = {
        "event_id": str(mutation.event_id),
        "scope": mutation.scope,
        "namespace": mutation.namespace,
        "key": mutation.key,
        "op": mutation.op.value,
        "value": mutation.value,
        "depth": mutation.depth,
        "root": str(mutation.root),
    }
    try:
        text = json.dumps(event, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise InvalidInput("value", mutation.value, f"is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise InvalidInput("value", "<deeply nested>", "is nested too deeply to store") from None
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(
            "value", mutation.value, "contains a lone surrogate, which is not valid Unicode"
        ) from None
    if _JSON_NUL.search(text):
        raise InvalidInput(
            "value", mutation.value, "contains a NUL character, which Postgres cannot store"
        )
    if size > max_bytes:
        raise LimitExceeded(
            f"event payload for key {mutation.key!r}", size, max_bytes, "max_payload_bytes"
        )
    return text


@dataclass(frozen=True, slots=True)
class Emitter:
    """Emit with a given schema and limits. ``emit``/``emit_many`` use the defaults."""

    schema: str = DEFAULT_SCHEMA
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_fanout: int = DEFAULT_MAX_FANOUT
    # Seconds between wake-up hints from this process (0: one per emitting transaction).
    notify_interval: float = DEFAULT_NOTIFY_INTERVAL

    async def emit(self, conn: Connection, mutation: Mutation) -> list[Enqueued]:
        """Enqueue one row per matching enabled trigger of the mutation's scope."""
        if not isinstance(mutation, Mutation):
            raise InvalidInput("mutation", mutation, "must be a dispatcher.Mutation")
        payload = encode_event(mutation, max_bytes=self.max_payload_bytes)
        row = await conn.fetchrow(
            queries(self.schema).emit_one,
            mutation.event_id,
            mutation.scope,
            mutation.namespace,
            mutation.key,
            mutation.op.value,
            payload,
            mutation.depth,
            self.max_fanout,
            key_prefixes(mutation.key),
            _should_notify(self.schema, self.notify_interval),
        )
        assert row is not None  # an aggregate query always returns one row
        if row["matched"] > self.max_fanout:
            raise LimitExceeded(
                f"triggers matching {mutation.scope}/{mutation.namespace}/{mutation.key}",
                int(row["matched"]),
                self.max_fanout,
                "max_fanout",
            )
        return [
            Enqueued(outbox_id=i, event_id=mutation.event_id, trigger_id=t)
            for i, t in zip(row["ids"], row["trigger_ids"], strict=True)
        ]

    async def emit_many(self, conn: Connection, mutations: Sequence[Mutation]) -> list[Enqueued]:
        """Enqueue for many mutations in one statement; all or nothing.

        Every limit is checked before anything is written: a payload over
        ``max_payload_bytes`` or a mutation matching more than ``max_fanout`` triggers raises
        :class:`LimitExceeded` and inserts no row for any of the mutations.
        """
        if not mutations:
            return []
        for m in mutations:
            if not isinstance(m, Mutation):
                raise InvalidInput("mutation", m, "must be a dispatcher.Mutation")
        payloads = [encode_event(m, max_bytes=self.max_payload_bytes) for m in mutations]
        row = await conn.fetchrow(
            queries(self.schema).emit,
            [m.event_id for m in mutations],
            [m.scope for m in mutations],
            [m.namespace for m in mutations],
            [m.key for m in mutations],
            [m.op.value for m in mutations],
            payloads,
            [m.depth for m in mutations],
            self.max_fanout,
            _should_notify(self.schema, self.notify_interval),
        )
        assert row is not None  # an aggregate query always returns one row
        if row["over_ord"] is not None:
            culprit = mutations[row["over_ord"] - 1]
            raise LimitExceeded(
                f"triggers matching {culprit.scope}/{culprit.namespace}/{culprit.key}",
                int(row["over_n"]),
                self.max_fanout,
                "max_fanout",
            )
        return [
            Enqueued(outbox_id=i, event_id=e, trigger_id=t)
            for i, e, t in zip(row["ids"], row["event_ids"], row["trigger_ids"], strict=True)
        ]


_DEFAULT = Emitter()


async def emit(conn: Connection, mutation: Mutation) -> list[Enqueued]:
    """Enqueue one row per matching trigger, in the caller's transaction (default limits)."""
    return await _DEFAULT.emit(conn, mutation)


async def emit_many(conn: Connection, mutations: Sequence[Mutation]) -> list[Enqueued]:
    """Bulk :func:`emit`: one statement for all mutations (default limits)."""
    return await _DEFAULT.emit_many(conn, mutations)
