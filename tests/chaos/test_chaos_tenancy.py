"""Scenario 9 — tenancy and run-as.

Two scopes with identical namespaces, keys and trigger patterns under random mutations: every
execution matches the expectation computed independently of the SQL matcher, none crosses a
scope, and each runs as its trigger's registrant. A revoked registrant's rows dead-letter
without retries. A handler cannot reach the dispatcher's database credentials by walking its
context.
"""

from __future__ import annotations

import json
import random
import signal
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    Mutation,
    Op,
    PrincipalDirectory,
    RetryPolicy,
)
from tests.chaos.handlers import build_registry
from tests.chaos.harness import Harness, TriggerSpec, expected_pairs, record, sizes
from tests.chaos.ledger import Ledger

pytestmark = pytest.mark.anyio

SCOPES = ("tenant-a", "tenant-b")
# (name, namespace, key pattern, ops): the same set in both scopes.
TRIGGERS = [
    ("exact", "users", "users/42", ("put", "delete")),
    ("prefix", "users", "users/*", ("put",)),
    ("glob", "users", "u*/?2", ("put", "delete")),
    ("deletes", "users", "users/1*", ("delete",)),
    ("literal-chars", "orders", "o/%_\\*", ("put",)),
    ("everything", "orders", "*", ("put", "delete")),
]
KEYS = [
    "users/42",
    "users/12",
    "users/1",
    "users/142",
    "u/x2",
    "users/x",
    "o/%_\\a",
    "o/ab",
    "o/%_\\",
    "ux/42",
]


async def _register(chaos: Harness, *, retry: RetryPolicy | None = None) -> list[TriggerSpec]:
    """The same triggers in both scopes, each registered by a principal of its scope."""
    return [
        await chaos.trigger(
            name,
            "work",
            scope=scope,
            namespace=namespace,
            key_pattern=pattern,
            registered_by=f"user:{scope}",
            retry=retry,
            ops=ops,
        )
        for scope in SCOPES
        for name, namespace, pattern, ops in TRIGGERS
    ]


def _mutations(n: int, seed: int) -> list[Mutation]:
    rng = random.Random(seed)
    return [
        Mutation(
            rng.choice(SCOPES),
            rng.choice(("users", "orders")),
            rng.choice(KEYS),
            rng.choice((Op.PUT, Op.DELETE)),
            {"n": i},
        )
        for i in range(n)
    ]


@dataclass(frozen=True)
class Size:
    mutations: int


@sizes(Size(1000), Size(10_000))
async def test_identical_scopes_never_cross(chaos: Harness, size: Size) -> None:
    specs = await _register(chaos)
    mutations = _mutations(size.mutations, seed=9)
    expected = expected_pairs(specs, mutations)
    proc = chaos.spawn("chaos-tenancy")
    await chaos.wait_ready(proc)
    await chaos.emit(mutations, batch=1000)
    await chaos.wait_drained(within=600, watch=[proc])
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=0)
    ledger = await chaos.ledger()
    executed = {(e["event_id"], e["trigger_id"]) for e in ledger}
    by_id = {t.id: t for t in specs}
    cross = [e for e in ledger if by_id[e["trigger_id"]].scope != e["event_scope"]]
    assert executed == expected, (len(executed - expected), len(expected - executed))
    assert not cross
    assert {(e["scope"], e["principal"]) for e in ledger} == {(s, f"user:{s}") for s in SCOPES}
    record(
        "9-tenancy",
        size="long" if size.mutations > 1000 else "short",
        mutations=size.mutations,
        executions=len(ledger),
        cross_scope=len(cross),
        unexpected_matches=len(executed - expected),
    )


async def test_a_revoked_registrant_dead_letters_without_retries(chaos: Harness, dsn: str) -> None:
    specs = await _register(chaos, retry=RetryPolicy(base_delay=0, max_delay=0, max_attempts=5))
    mutations = _mutations(200, seed=10)
    expected = expected_pairs(specs, mutations)
    await chaos.emit(mutations)
    directory = PrincipalDirectory(["user:tenant-a", "user:tenant-b"])
    directory.revoke("user:tenant-b")
    ledger = Ledger(dsn)
    try:
        d = Dispatcher(
            dsn,
            build_registry(ledger),
            config=DispatcherConfig(poll_interval=0.05, breaker_threshold=0),
            principals=directory,
        )
        await d.run_until_idle(include_scheduled=True, time_limit=60)
    finally:
        await ledger.close()

    report = await chaos.check(expected)
    report.assert_ok(max_duplicates=0)
    dead = await chaos.fetch(
        "SELECT scope, reason, attempts, registered_by FROM dispatcher.dead_letters"
    )
    b_rows = {p for p in expected if any(t.id == p[1] and t.scope == "tenant-b" for t in specs)}
    assert len(dead) == len(b_rows)
    assert {(r["scope"], r["reason"], r["attempts"], r["registered_by"]) for r in dead} == {
        ("tenant-b", "permission_denied", 1, "user:tenant-b")
    }
    assert {e["principal"] for e in await chaos.ledger()} == {"user:tenant-a"}


async def test_a_handler_cannot_reach_the_dispatchers_credentials(chaos: Harness) -> None:
    """Walking the context's attributes (private and name-mangled ones too) must not arrive
    at the DSN. This is no sandbox: in-process code can always reach further (gc, frames);
    it keeps credentials out of dumps, debuggers and "log every attribute" helpers."""
    secret = f"chaos-{uuid.uuid4().hex}"
    parts = urlsplit(chaos.dsn)
    # The embedded server trusts local connections, so any password is accepted; what
    # matters is that the dispatcher holds one.
    user = parts.username or "postgres"
    netloc = f"{user}:{secret}@{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")
    dsn_with_password = urlunsplit(parts._replace(netloc=netloc))
    snoop = await chaos.trigger("snoop", "snoop", namespace="snoop")
    proc = chaos.spawn("chaos-snoop", dsn=dsn_with_password, env={"CHAOS_SECRET": secret})
    await chaos.wait_ready(proc)
    await chaos.emit([Mutation("acme", "snoop", "s/1", Op.PUT, {})])
    await chaos.wait_drained(within=60, watch=[proc])
    note = await chaos.fetchval(
        "SELECT note FROM public.chaos_ledger WHERE trigger_id = $1", snoop.id
    )
    found = json.loads(note)
    record("9-credentials", paths_to_password=found["found"])
    assert found["searched_for"] == len(secret)
    assert found["found"] == []
