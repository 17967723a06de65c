"""Fan a mutation out into outbox rows inside the caller's transaction.

>>> async with conn.transaction():
...     await conn.execute("UPDATE accounts SET ...")
...     rows = await emit(conn, Mutation("acme", "users", "users/42", Op.PUT, {"plan": "pro"}))

Rolling the transaction back leaves no outbox rows; committing makes them durable. A connection
outside a transaction is refused with :class:`~dispatcher.TransactionRequired` (its rows would
commit on their own and outlive a rollback of the host's work) unless the call passes
``autocommit=True``.

The host's connection may be asyncpg's, psycopg 3's or SQLAlchemy's (connections and sessions,
any driver), or Django's: async hosts ``await emit`` / ``emit_many``, sync hosts call
``emit_sync`` / ``emit_many_sync`` (no event loop), Django hosts use
:mod:`dispatcher.contrib.django`. docs/embedding.md shows each.

The fan-out itself (matching, the fan-out cap, the backlog caps, the policy snapshot, the
payload, the wake-up hint) is defined once, by the ``emit`` and ``emit_many`` functions in the
library's schema (migrations 0007, 0010 and 0011), which any client may call. A scope whose backlog
is at its cap refuses the emit with :class:`~dispatcher.BacklogFull`, enqueueing nothing and
leaving the caller's transaction aborted, to be rolled back. This module checks a
mutation, has :mod:`dispatcher.encode` validate and encode its payload, and sends it, in one
round trip for any number of mutations; every host sends the same statement with the same
arguments (:mod:`dispatcher.hosts` only speaks each driver).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from dispatcher.core.errors import InvalidInput, LimitExceeded, TransactionRequired
from dispatcher.core.models import Mutation
from dispatcher.core.validate import is_int
from dispatcher.db import Connection

# MAX_NESTING and encode_event are re-exported: importers take them from here.
from dispatcher.encode import MAX_NESTING as MAX_NESTING
from dispatcher.encode import encode_event as encode_event
from dispatcher.encode import encode_values
from dispatcher.hosts import AsyncHost, Row, SyncHost, async_runner, refusals, sync_runner
from dispatcher.names import DEFAULT_SCHEMA
from dispatcher.sql import queries
from dispatcher.tracing import current_traceparent

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024
DEFAULT_MAX_FANOUT = 100
DEFAULT_NOTIFY_INTERVAL = 0.002

# Ceilings, also enforced by the emit functions for callers that bypass this module (frozen in
# migrations/versions/0007_emit_functions.py; change both together).
MAX_FANOUT = 10_000
# The functions refuse a value whose JSON text, as Postgres writes it, is over 16 MiB. That
# text adds a space after every ',' and ':' (at most 1.5 times the compact text measured
# here), so a payload within this bound passes, unless it holds many numbers written with a
# large exponent (Postgres prints 1e300 in full).
MAX_PAYLOAD_BYTES = 8 * 1024 * 1024

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


@dataclass(frozen=True, slots=True)
class Enqueued:
    """One outbox row written by an emit."""

    outbox_id: int
    event_id: uuid.UUID
    trigger_id: int


@dataclass(frozen=True, slots=True)
class Emitter:
    """Emit with a given schema and limits. ``emit``/``emit_many`` (and their ``_sync``
    forms) use the defaults."""

    schema: str = DEFAULT_SCHEMA
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    max_fanout: int = DEFAULT_MAX_FANOUT
    # Seconds between wake-up hints from this process (0: one per emitting transaction).
    notify_interval: float = DEFAULT_NOTIFY_INTERVAL

    def __post_init__(self) -> None:
        _check_bound("max_payload_bytes", self.max_payload_bytes, MAX_PAYLOAD_BYTES)
        _check_bound("max_fanout", self.max_fanout, MAX_FANOUT)

    async def emit(
        self, conn: AsyncHost, mutation: Mutation, *, autocommit: bool = False
    ) -> list[Enqueued]:
        """Enqueue one row per matching enabled trigger of the mutation's scope.

        ``conn`` (an async host: see :func:`dispatcher.emit`) must be inside a transaction
        (:class:`TransactionRequired` otherwise). ``autocommit=True`` skips that check: the
        statement then runs as the connection runs any other, committing on its own on a
        connection in autocommit mode.

        A scope with a backlog cap (:meth:`dispatcher.FlowControl.set_backlog_cap`) that the
        rows would take past it raises :class:`~dispatcher.BacklogFull` and enqueues nothing;
        the transaction is then aborted: roll it back.
        """
        runner = async_runner(conn)
        if not autocommit:
            await runner.require_transaction("emit")
        statement, args = self._single(mutation)
        with refusals:
            row = await runner.fetch(statement, args)
        return self._enqueued_single(mutation, row)

    async def emit_many(
        self, conn: AsyncHost, mutations: Sequence[Mutation], *, autocommit: bool = False
    ) -> list[Enqueued]:
        """Enqueue for many mutations in one statement; all or nothing.

        ``conn`` must be inside a transaction unless ``autocommit=True``, as for :meth:`emit`
        (checked for an empty list too, so a misplaced call fails on every path). Every limit
        is checked before anything is written: a payload over ``max_payload_bytes`` or a
        mutation matching more than ``max_fanout`` triggers raises :class:`LimitExceeded` and
        inserts no row for any of the mutations, and so does a scope the rows would take past
        its backlog cap (:class:`~dispatcher.BacklogFull`, the transaction aborted).
        """
        runner = async_runner(conn)
        if not autocommit:
            await runner.require_transaction("emit_many")
        call = self._many(mutations)
        if call is None:
            return []
        with refusals:
            row = await runner.fetch(*call)
        return self._enqueued_many(mutations, row)

    def emit_sync(
        self, conn: SyncHost, mutation: Mutation, *, autocommit: bool = False
    ) -> list[Enqueued]:
        """:meth:`emit` for a sync host (see :func:`dispatcher.emit_sync`), without an event
        loop."""
        runner = sync_runner(conn)
        if not autocommit:
            runner.require_transaction("emit")
        statement, args = self._single(mutation)
        with refusals:
            row = runner.fetch(statement, args)
        return self._enqueued_single(mutation, row)

    def emit_many_sync(
        self, conn: SyncHost, mutations: Sequence[Mutation], *, autocommit: bool = False
    ) -> list[Enqueued]:
        """:meth:`emit_many` for a sync host, without an event loop."""
        runner = sync_runner(conn)
        if not autocommit:
            runner.require_transaction("emit_many")
        call = self._many(mutations)
        if call is None:
            return []
        with refusals:
            row = runner.fetch(*call)
        return self._enqueued_many(mutations, row)

    # What every host runs: the statement and its arguments, and how its row is read. The
    # hosts differ only in how they send them (dispatcher/hosts/).

    def _single(self, mutation: Mutation) -> tuple[str, tuple[object, ...]]:
        if not isinstance(mutation, Mutation):
            raise InvalidInput("mutation", mutation, "must be a dispatcher.Mutation")
        value, old = encode_values(mutation, self.max_payload_bytes)
        return queries(self.schema).emit_one, (
            mutation.event_id,
            mutation.scope,
            mutation.namespace,
            mutation.key,
            mutation.op.value,
            value,
            mutation.depth,
            mutation.root_id,
            self.max_fanout,
            _should_notify(self.schema, self.notify_interval),
            old,
            current_traceparent(),
        )

    def _enqueued_single(self, mutation: Mutation, row: Row) -> list[Enqueued]:
        if row["matched"] > self.max_fanout:
            raise LimitExceeded(
                f"triggers matching {mutation.scope}/{mutation.namespace}/{mutation.key}",
                int(row["matched"]),
                self.max_fanout,
                "max_fanout",
            )
        return [
            Enqueued(outbox_id=i, event_id=mutation.event_id, trigger_id=t)
            for i, t in zip(row["outbox_ids"], row["trigger_ids"], strict=True)
        ]

    def _many(self, mutations: Sequence[Mutation]) -> tuple[str, tuple[object, ...]] | None:
        """The bulk statement and its arguments (arrays), or None for no mutations."""
        if not mutations:
            return None
        for m in mutations:
            if not isinstance(m, Mutation):
                raise InvalidInput("mutation", m, "must be a dispatcher.Mutation")
        encoded = [encode_values(m, self.max_payload_bytes) for m in mutations]
        olds = [old for _, old in encoded]
        return queries(self.schema).emit, (
            [m.event_id for m in mutations],
            [m.scope for m in mutations],
            [m.namespace for m in mutations],
            [m.key for m in mutations],
            [m.op.value for m in mutations],
            [value for value, _ in encoded],
            [m.depth for m in mutations],
            [m.root_id for m in mutations],
            self.max_fanout,
            _should_notify(self.schema, self.notify_interval),
            # No array when no mutation has an old value: less to send and to unnest.
            None if all(old is None for old in olds) else olds,
            current_traceparent(),
        )

    def _enqueued_many(self, mutations: Sequence[Mutation], row: Row) -> list[Enqueued]:
        if row["over_ordinal"] is not None:
            culprit = mutations[row["over_ordinal"] - 1]
            raise LimitExceeded(
                f"triggers matching {culprit.scope}/{culprit.namespace}/{culprit.key}",
                int(row["over_matched"]),
                self.max_fanout,
                "max_fanout",
            )
        return [
            Enqueued(outbox_id=i, event_id=e, trigger_id=t)
            for i, e, t in zip(row["outbox_ids"], row["event_ids"], row["trigger_ids"], strict=True)
        ]


def require_transaction(conn: Connection, operation: str, *, autocommit: bool) -> None:
    """Raise :class:`TransactionRequired` for ``conn`` outside a transaction, unless
    ``autocommit``."""
    # A local check of the status the server reported with its last reply: no round trip.
    # It catches SQLAlchemy's asyncpg driver too, which sends BEGIN only with the first
    # statement of its transaction, so an emit made first would otherwise commit by itself.
    if not autocommit and not conn.is_in_transaction():
        raise TransactionRequired(operation, conn)


def _check_bound(name: str, value: object, ceiling: int) -> None:
    if not is_int(value) or not 1 <= value <= ceiling:
        raise InvalidInput(name, value, f"must be an integer from 1 to {ceiling}")


_DEFAULT = Emitter()


async def emit(conn: AsyncHost, mutation: Mutation, *, autocommit: bool = False) -> list[Enqueued]:
    """Enqueue one row per matching trigger, in the caller's transaction (default limits).

    ``conn`` is the async connection or session your work runs on: an asyncpg connection,
    a psycopg 3 ``AsyncConnection``, or a SQLAlchemy ``AsyncConnection`` or ``AsyncSession``
    (any driver). Sync hosts call :func:`emit_sync`; Django hosts
    :mod:`dispatcher.contrib.django`. A connection outside a transaction raises
    :class:`~dispatcher.TransactionRequired`, saying how to open one; pass
    ``autocommit=True`` where one statement committing on its own is what you want.

    >>> async with session.begin():                 # or: async with conn.transaction():
    ...     await emit(session, Mutation("acme", "users", "users/42", Op.PUT, {"plan": "pro"}))
    """
    return await _DEFAULT.emit(conn, mutation, autocommit=autocommit)


async def emit_many(
    conn: AsyncHost, mutations: Sequence[Mutation], *, autocommit: bool = False
) -> list[Enqueued]:
    """Bulk :func:`emit`: one statement for all mutations (default limits), all or nothing;
    the same hosts, transaction rule and ``autocommit`` opt-out."""
    return await _DEFAULT.emit_many(conn, mutations, autocommit=autocommit)


def emit_sync(conn: SyncHost, mutation: Mutation, *, autocommit: bool = False) -> list[Enqueued]:
    """:func:`emit` for sync hosts: a plain call, no event loop.

    ``conn`` is a psycopg 3 ``Connection``, a SQLAlchemy ``Connection`` or ``Session`` (a
    ``scoped_session`` too; any driver: psycopg, psycopg2, ...), or a Django connection
    (:mod:`dispatcher.contrib.django` takes an alias instead). The same SQL function, the
    same encoded arguments and the same transaction rule as :func:`emit`.

    Two names rather than one that guesses: ``emit`` is a coroutine function whatever it is
    given, so a sync host calling it would get a coroutine back, not rows, and forgetting the
    ``await`` would silently enqueue nothing. A name per calling convention keeps each
    signature honest for type checkers, and passing the wrong kind of connection to either
    says which one to call.

    >>> with Session(engine) as session, session.begin():
    ...     session.add(account)
    ...     emit_sync(session, Mutation("acme", "users", "users/42", Op.PUT, {"plan": "pro"}))
    """
    return _DEFAULT.emit_sync(conn, mutation, autocommit=autocommit)


def emit_many_sync(
    conn: SyncHost, mutations: Sequence[Mutation], *, autocommit: bool = False
) -> list[Enqueued]:
    """Bulk :func:`emit_sync`: one statement for all mutations, all or nothing."""
    return _DEFAULT.emit_many_sync(conn, mutations, autocommit=autocommit)
