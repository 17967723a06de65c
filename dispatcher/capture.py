"""Table capture: every insert, update and delete on a host table, by any client, becomes a
mutation with the row's old and new values, in the writer's transaction.

>>> captures = Captures()
>>> await captures.add(conn, "public.accounts", namespace="accounts", scope_column="tenant")
Capture(table='public.accounts', namespace='accounts', keys=('id',), ...)

:meth:`Captures.add` attaches the row trigger function of migration 0011
(``capture_row``) to the table, with arguments saying how a row becomes a mutation: the
namespace, a fixed scope or the column holding it, and the key (a prefix, by default the
table's name and ``/``, then the key columns' values joined with ``/``; by default the
primary key). An insert is a put whose value is the new row, an update a put with the old
row as ``old``, a delete a delete with the old row as ``old``; an update that moves a row to
another key or scope is a delete of the old key and a put of the new one. ``TRUNCATE`` is not
captured. Adding again is idempotent (same settings: nothing changes; others: the trigger is
replaced), and the trigger belongs to the table, so it outlives ``dispatcher migrate``.

Attaching a trigger needs what ``CREATE TRIGGER`` needs: the role owns the table (or holds
TRIGGER on it) and may execute ``capture_row`` (its owner, the migrating role, may; grant
EXECUTE to another). Writers of the table need no grant at all: the function runs as its
owner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from dispatcher.core.errors import InvalidInput
from dispatcher.core.models import MAX_KEY_LENGTH, check_name
from dispatcher.db import Connection
from dispatcher.names import DEFAULT_SCHEMA
from dispatcher.sql.capture import CaptureSql

# The column types a key or a scope may be read from: their text is stable and readable.
KEY_TYPES = frozenset(
    {"text", "varchar", "bpchar", "citext", "int2", "int4", "int8", "numeric", "uuid"}
)
# capture_row's argument format (migration 0011).
_FORMAT = "1"
# The longest name Postgres keeps (NAMEDATALEN - 1 bytes); a longer one is cut.
_MAX_IDENTIFIER = 63
_SYSTEM_SCHEMAS = frozenset({"pg_catalog", "information_schema"})


class CaptureNotFound(InvalidInput):
    """The table has no capture of this schema."""

    def __init__(self, table: str) -> None:
        super().__init__("table", table, "is not captured")


@dataclass(frozen=True, slots=True)
class Capture:
    """One captured table: how its rows become mutations."""

    table: str  # as SQL names it: schema.table, quoted where it must be
    table_schema: str
    table_name: str
    namespace: str
    keys: tuple[str, ...]
    key_prefix: str
    scope: str | None  # a fixed scope, or None when ``scope_column`` holds it
    scope_column: str | None
    trigger: str
    enabled: bool = True

    def arguments(self) -> list[str]:
        """capture_row's arguments for this capture."""
        kind, arg = (
            ("scope", self.scope) if self.scope is not None else ("column", self.scope_column)
        )
        return [_FORMAT, self.namespace, kind, arg or "", self.key_prefix, *self.keys]


@dataclass(frozen=True, slots=True)
class Captures:
    """Add, list and remove the table captures of one dispatcher schema."""

    schema: str = DEFAULT_SCHEMA

    async def add(
        self,
        conn: Connection,
        table: str,
        *,
        namespace: str,
        scope: str | None = None,
        scope_column: str | None = None,
        keys: Sequence[str] | None = None,
        key_prefix: str | None = None,
    ) -> tuple[Capture, str]:
        """Capture ``table`` (a name as SQL reads it: ``accounts``, ``public.accounts``,
        ``"Odd Name"``); returns the capture and ``"added"``, ``"updated"`` or
        ``"unchanged"``.

        Exactly one of ``scope`` (every row's scope) and ``scope_column`` (the column holding
        it) is given. ``keys``: the key columns, the primary key by default. ``key_prefix``:
        what every key starts with, ``"<table name>/"`` by default. A missing table or
        column, a key column of a type not in :data:`KEY_TYPES`, a table of the library's
        own schema or a system table, or a second capture of the same rows (a partition of
        a captured table, a partitioned table with a captured partition) raises
        :class:`InvalidInput`, changing nothing.
        """
        q = CaptureSql(self.schema)
        check_name("namespace", namespace)
        if (scope is None) == (scope_column is None):
            raise InvalidInput("scope", scope, "give exactly one of scope and scope_column")
        if scope is not None:
            check_name("scope", scope)
        async with conn.transaction():
            function = await _capture_function(conn, q, self.schema)
            oid, table_schema, table_name, qualified = await _resolve(conn, q, table, self.schema)
            # Two adds of one table at once: the second waits here for the first to commit
            # and then finds its trigger, instead of both creating one.
            await _execute(conn, q.lock_table_ddl, table_schema, table_name)
            columns = {r["attname"]: r for r in await conn.fetch(q.columns, oid)}
            if keys is None:
                keys = [r["attname"] for r in await conn.fetch(q.primary_key, oid)]
                if not keys:
                    raise InvalidInput(
                        "keys", table, "the table has no primary key: name the key columns"
                    )
            keys = _check_keys(table, keys, columns)
            if scope_column is not None:
                _check_column(table, "scope_column", scope_column, columns)
            prefix = f"{table_name}/" if key_prefix is None else key_prefix
            if prefix:
                check_name("key_prefix", prefix, max_length=MAX_KEY_LENGTH)
            wanted = Capture(
                qualified,
                table_schema,
                table_name,
                namespace,
                tuple(keys),
                prefix,
                scope,
                scope_column,
                trigger=_trigger_name(self.schema),
            )
            await _check_partitions(conn, q, function, oid, table)
            # Every trigger of this schema's capture function on the table, whatever its
            # name: after this call there is exactly one.
            existing = _captures(await conn.fetch(q.captures, function, oid))
            if existing == [wanted]:
                return wanted, "unchanged"
            for c in existing:
                await _execute(conn, q.drop_trigger_ddl, c.trigger, table_schema, table_name)
            await _execute(
                conn,
                q.create_trigger_ddl,
                wanted.trigger,
                table_schema,
                table_name,
                wanted.arguments(),
            )
        return wanted, "updated" if existing else "added"

    async def list(self, conn: Connection) -> list[Capture]:
        """Every captured table of this schema's capture function."""
        q = CaptureSql(self.schema)
        function = await _capture_function(conn, q, self.schema)
        return _captures(await conn.fetch(q.captures, function, None))

    async def get(self, conn: Connection, table: str) -> Capture | None:
        q = CaptureSql(self.schema)
        function = await _capture_function(conn, q, self.schema)
        oid, *_ = await _resolve(conn, q, table, self.schema)
        found = _captures(await conn.fetch(q.captures, function, oid))
        return found[0] if found else None

    async def remove(self, conn: Connection, table: str) -> Capture:
        """Stop capturing ``table``: its capture triggers are dropped. Raises
        :class:`CaptureNotFound` when there is none."""
        q = CaptureSql(self.schema)
        async with conn.transaction():
            function = await _capture_function(conn, q, self.schema)
            oid, *_ = await _resolve(conn, q, table, self.schema)
            found = _captures(await conn.fetch(q.captures, function, oid))
            if not found:
                raise CaptureNotFound(table)
            for c in found:
                await _execute(conn, q.drop_trigger_ddl, c.trigger, c.table_schema, c.table_name)
        return found[0]


def _trigger_name(schema: str) -> str:
    """``<schema>_capture``, within the 63 bytes Postgres keeps of a name (a schema name is
    ASCII); a longer one is cut and told apart by a digest of the schema's name."""
    name = f"{schema}_capture"
    if len(name) <= _MAX_IDENTIFIER:
        return name
    digest = hashlib.blake2b(schema.encode(), digest_size=4).hexdigest()
    return f"{schema[: _MAX_IDENTIFIER - len('_capture_') - len(digest)]}_capture_{digest}"


async def _capture_function(conn: Connection, q: CaptureSql, schema: str) -> int:
    oid = await conn.fetchval(q.capture_function)
    if oid is None:
        raise InvalidInput(
            "schema",
            schema,
            "has no capture function: run `dispatcher migrate` (revision 0011 or later)",
        )
    return int(oid)


async def _check_partitions(
    conn: Connection, q: CaptureSql, function: int, oid: int, table: str
) -> None:
    """Refuse a second capture of the same rows: of a partition of a captured table, or of a
    partitioned table one of whose partitions is captured on its own."""
    ancestor = await conn.fetchrow(q.captured_ancestor, function, oid)
    if ancestor is not None:
        parent = ancestor["qualified"]
        raise InvalidInput(
            "table",
            table,
            f"is a partition of {parent}, which is captured: its rows are captured through it",
        )
    partition = await conn.fetchrow(q.captured_partition, function, oid)
    if partition is not None:
        own = partition["qualified"]
        raise InvalidInput(
            "table",
            table,
            f"its partition {own} is captured on its own: remove that capture first",
        )


async def _resolve(
    conn: Connection, q: CaptureSql, table: str, schema: str
) -> tuple[int, str, str, str]:
    """The table's oid, schema, name, and the name as SQL writes it."""
    if not isinstance(table, str) or not table.strip():
        raise InvalidInput("table", table, "must be a table name")
    try:
        # to_regclass refuses some malformed names on one Postgres version and finds
        # nothing for them on another; parse_ident refuses them on all.
        await conn.fetchval(q.parse_name, table)
        row = await conn.fetchrow(q.table, table)
    except (
        asyncpg.InvalidNameError,  # "a..b", an unterminated quote
        asyncpg.PostgresSyntaxError,  # "a.b.c.d"
        asyncpg.FeatureNotSupportedError,  # "otherdb.public.t"
        asyncpg.InvalidParameterValueError,
    ):
        raise InvalidInput("table", table, "is not a valid table name") from None
    if row is None:
        raise InvalidInput("table", table, "no such table (or not on the search_path)")
    if row["relkind"] not in ("r", "p"):
        raise InvalidInput("table", table, "is not a table (a view or another relation kind)")
    if row["nspname"] == schema:
        raise InvalidInput("table", table, "is one of dispatcher's own tables")
    if row["nspname"] in _SYSTEM_SCHEMAS or row["nspname"].startswith("pg_toast"):
        raise InvalidInput("table", table, "is a system table")
    return int(row["oid"]), str(row["nspname"]), str(row["relname"]), str(row["qualified"])


def _check_column(
    table: str, field: str, column: str, columns: dict[str, asyncpg.Record]
) -> asyncpg.Record:
    found = columns.get(column)
    if found is None:
        raise InvalidInput(
            field, column, f"table {table} has no such column (it has: {', '.join(columns)})"
        )
    if found["base"] not in KEY_TYPES:
        raise InvalidInput(
            field,
            column,
            f"is of type {found['type']}; a key or scope column must be text, an integer, "
            "numeric or uuid",
        )
    return found


def _check_keys(table: str, keys: Sequence[str], columns: dict[str, asyncpg.Record]) -> list[str]:
    if isinstance(keys, str) or not keys:
        raise InvalidInput("keys", keys, "must be a non-empty list of column names")
    if len(set(keys)) != len(keys):
        raise InvalidInput("keys", keys, "names a column twice")
    for k in keys:
        _check_column(table, "keys", k, columns)
    return list(keys)


async def _execute(conn: Connection, ddl_query: str, *args: object) -> None:
    await conn.execute(await conn.fetchval(ddl_query, *args))


def _captures(rows: Sequence[asyncpg.Record]) -> list[Capture]:
    found = []
    for r in rows:
        args = [a.decode("utf-8") for a in bytes(r["tgargs"]).split(b"\x00")[:-1]]
        if len(args) < 6 or args[0] != _FORMAT:
            continue  # not a trigger this library attached
        kind, arg = args[2], args[3]
        found.append(
            Capture(
                r["qualified"],
                r["nspname"],
                r["relname"],
                args[1],
                tuple(args[5:]),
                args[4],
                arg if kind == "scope" else None,
                arg if kind == "column" else None,
                r["tgname"],
                r["enabled"],
            )
        )
    return found
