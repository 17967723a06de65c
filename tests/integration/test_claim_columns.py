"""A claimed row is decoded by position (dispatcher.records.CLAIMED_COLUMNS): every
statement that returns one must return exactly those columns, in that order, and the row
read back must be the one written."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from dispatcher import Mutation, Op, RetryPolicy, TriggerRegistry, emit_many
from dispatcher.core.outcomes import ClaimedRow
from dispatcher.records import CLAIMED_COLUMNS, POLICY_COLUMNS, claimed_row
from dispatcher.sql import POLICY_COLUMNS as SQL_POLICY_COLUMNS
from dispatcher.sql import queries

pytestmark = pytest.mark.anyio


def test_the_decoder_reads_the_fields_where_the_columns_are() -> None:
    fields = ClaimedRow._fields
    assert CLAIMED_COLUMNS[:12] == fields[:12]
    assert CLAIMED_COLUMNS[12:15] == ("reply_to", "reply_owner", "dead_letter_id")
    assert fields[12:16] == ("reply_to", "dead_letter_id", "policy", "timeout")
    policy = CLAIMED_COLUMNS.index("retry_kind")
    assert CLAIMED_COLUMNS[policy : policy + len(POLICY_COLUMNS)] == POLICY_COLUMNS
    assert CLAIMED_COLUMNS[-2:] == fields[-2:] == ("age", "traceparent")


async def test_claim_and_invocation_return_the_decoders_columns(
    conn: asyncpg.Connection,
) -> None:
    assert POLICY_COLUMNS == SQL_POLICY_COLUMNS
    policy = RetryPolicy(base_delay=0.5, max_delay=9, jitter=0.1, max_attempts=4)
    trigger = await TriggerRegistry().register(
        conn,
        scope="acme",
        name="columns",
        namespace="users",
        key_pattern="users/*",
        target="noop",
        registered_by="user:7",
        retry=policy,
        execution_timeout=12.5,
    )
    await emit_many(conn, [Mutation("acme", "users", "users/1", Op.PUT, {"n": 1})], autocommit=True)
    q = queries()
    token = uuid.uuid4()
    (record,) = await conn.fetch(q.claim, 10, token, "inbox", 5.0, [])
    assert tuple(record.keys()) == CLAIMED_COLUMNS
    # The claim that also sweeps returns the same columns.
    await emit_many(conn, [Mutation("acme", "users", "users/3", Op.PUT, {"n": 3})], autocommit=True)
    (swept,) = await conn.fetch(q.claim_and_sweep, 10, uuid.uuid4(), "inbox", 5.0, [], 1000)
    assert tuple(swept.keys()) == CLAIMED_COLUMNS
    payload = claimed_row(swept).payload
    assert isinstance(payload, dict)
    assert payload["key"] == "users/3"
    row = claimed_row(record)
    assert row.lease_token == token
    assert row.trigger_id == trigger.id
    assert (row.scope, row.trigger_name, row.target) == ("acme", "columns", "noop")
    assert row.registered_by == "user:7"
    assert isinstance(row.payload, dict)
    assert (row.payload["key"], row.payload["value"]) == ("users/1", {"n": 1})
    assert (row.attempts, row.orphans, row.depth) == (0, 0, 0)
    assert row.reply_to is None
    assert row.dead_letter_id is None
    assert row.policy == policy
    assert row.timeout == 12.5
    assert 0 <= row.age < 60

    invoked = await conn.fetchrow(
        q.insert_invocation,
        uuid.uuid4(),
        '{"key": "users/2"}',
        0,
        "reply-inbox",
        "owner",
        30.0,
        trigger.id,
        uuid.uuid4(),
        5.0,
        None,
    )
    assert invoked is not None
    assert tuple(invoked.keys()) == CLAIMED_COLUMNS
    sync = claimed_row(invoked)
    assert sync.reply_to == "reply-inbox"
    assert sync.payload == {"key": "users/2"}
