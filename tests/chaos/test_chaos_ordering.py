"""Scenario — per-key ordered delivery (issue 14) under crashes, and a blocked key beside
flowing ones.

1. Order under crashes: concurrent writers (each on its own connection, in its own
   transactions) mutate random keys of an ordered trigger (``ordering="key"``), the same key
   written by different writers at the same moment; several dispatcher processes drain; one of
   them is SIGKILLed (and restarted) at random moments; the handler fails a deterministic ~10%
   of (key, seq, attempt) with a retryable error. Shows, from the ledger of handler calls:
   zero per-key order violations, versions that follow the commit order, zero loss (every
   version 1..n of every key, n as in ``key_versions`` and as the writers committed, has a
   successful call), duplicates only of rows the killed processes held leased.
2. A blocked key does not slow the others: one key's head is refused permanently (it
   dead-letters and blocks its key), with many mutations behind it; the other keys' p99
   commit-to-start latency stays within 1.5x of the same load without the blocked key
   (phases with and without one alternate in one test, on the same processes). The blocked
   key's rows wait, unrun, until its dead letter is replayed; then they run in order.

Definitions (ledger rows are handler calls; times are the database clock):

- a call *completed* a version when its ledger outcome is ``success`` (the handler returned
  normally); its ``ended_at`` is written before the handler returns to the dispatcher, so
  before the dispatcher can settle the row and release the key's next version;
- an *order violation* is, for one key, in call-start order: a version lower than the one
  before it; a call of version s starting before every version < s has a completed call that
  ended at or before that start; or a call starting while the key's previous call still ran
  (an unfinished call counts as running until its lease expired, and only a killed process
  leaves one unfinished).
"""

from __future__ import annotations

import itertools
import math
import random
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import anyio
import asyncpg
import pytest

from dispatcher import (
    Admin,
    DeadLetterFilter,
    FlowControl,
    Mutation,
    Op,
    Resolution,
    RetryPolicy,
    emit_many,
)
from dispatcher.flow import BlockedKey
from tests.chaos.harness import (
    LEASE_MARGIN,
    Harness,
    Kill,
    Proc,
    _without_phantom_starts,
    expected_pairs,
    record,
    sizes,
    wait_until,
)
from tests.chaos.ledger import REFUSED, TABLE

pytestmark = pytest.mark.anyio

POLL = 0.1
TIMEOUT = 1.0  # each trigger's execution timeout: a lease is TIMEOUT + LEASE_MARGIN
NAMESPACE = "orders"
# Retryable failures come back fast; ten attempts at a 10% failure rate never run out.
FAST = RetryPolicy(base_delay=0.05, max_delay=0.2, jitter=0.1, max_attempts=10)


# --- writers ---


@dataclass(frozen=True)
class Tx:
    """One committed writer transaction, with the database clock read in it before its emit
    (``began``) and on its connection right after its commit (``committed``)."""

    writer: int
    mutations: tuple[Mutation, ...]
    began: datetime
    committed: datetime


def plan(
    rng: random.Random,
    keys: Sequence[str],
    per_key: tuple[int, int],
    tx_size: tuple[int, int],
    *,
    value: dict[str, object],
    group: int = 8,
) -> list[list[Mutation]]:
    """Transactions mutating ``keys`` ``per_key`` times each, in an order where a key's
    mutations sit close together (shuffled within groups of ``group`` keys): dealt round-robin
    to writers paced alike, they are written by different writers at the same moment."""
    order: list[str] = []
    for i in range(0, len(keys), group):
        chunk = [k for k in keys[i : i + group] for _ in range(rng.randint(*per_key))]
        rng.shuffle(chunk)
        order += chunk
    txs: list[list[Mutation]] = []
    i = 0
    while i < len(order):
        n = rng.randint(*tx_size)
        txs.append([Mutation("acme", NAMESPACE, k, Op.PUT, dict(value)) for k in order[i : i + n]])
        i += n
    return txs


def random_keys(rng: random.Random, prefix: str, n: int) -> list[str]:
    keys: set[str] = set()
    while len(keys) < n:
        keys.add(f"{NAMESPACE}/{prefix}{rng.getrandbits(40):010x}")
    out = sorted(keys)
    rng.shuffle(out)
    return out


async def write(
    dsn: str,
    writers: int,
    txs: Sequence[Sequence[Mutation]],
    *,
    rate: float,
    done: list[Tx] | None = None,
) -> list[Tx]:
    """Commit ``txs`` from ``writers`` concurrent connections, dealt round-robin, at ``rate``
    mutations per second in all (each transaction is due at its place in the whole list, so
    the writers keep step with each other)."""
    due: list[float] = []
    offset = 0
    for tx in txs:
        due.append(offset / rate)
        offset += len(tx)
    done = [] if done is None else done  # filled as the transactions commit
    begin = time.monotonic()

    async def writer(w: int) -> None:
        conn = await asyncpg.connect(dsn, server_settings={"application_name": f"chaos-w{w}"})
        try:
            for i in range(w, len(txs), writers):
                delay = begin + due[i] - time.monotonic()
                if delay > 0:
                    await anyio.sleep(delay)  # pacing the writer, not waiting for a condition
                async with conn.transaction():
                    began = await conn.fetchval("SELECT clock_timestamp()")
                    await emit_many(conn, txs[i])
                committed = await conn.fetchval("SELECT clock_timestamp()")
                done.append(Tx(w, tuple(txs[i]), began, committed))
        finally:
            await conn.close()

    async with anyio.create_task_group() as tg:
        for w in range(writers):
            tg.start_soon(writer, w)
    return done


# --- the order checker ---


def order_violations(
    ledger: Sequence[asyncpg.Record], trigger_id: int, killed: set[int]
) -> tuple[list[str], int]:
    """The order violations (see the module notes) among the calls of ``trigger_id``, and how
    many calls re-ran a version (a retry, or a re-run after a kill)."""
    # A start that committed although its writer saw an error (the call did not run: the
    # row was rescheduled) is dropped, as the invariant checker does.
    by_pair: defaultdict[uuid.UUID, list[asyncpg.Record]] = defaultdict(list)
    for e in sorted(ledger, key=lambda e: (e["started_at"], e["id"])):
        if e["trigger_id"] == trigger_id:
            by_pair[e["event_id"]].append(e)
    calls = [e for es in by_pair.values() for e in _without_phantom_starts(es)]
    by_key: defaultdict[str, list[asyncpg.Record]] = defaultdict(list)
    for e in sorted(calls, key=lambda e: (e["started_at"], e["id"])):
        by_key[e["key"]].append(e)
    found: list[str] = []
    repeats = 0
    for key, es in by_key.items():
        if any(e["seq"] is None for e in es):
            found.append(f"{key}: a call without a version (seq)")
            continue
        completed: dict[int, datetime] = {}
        for e in es:
            if e["outcome"] == "success":
                s, end = e["seq"], e["ended_at"]
                completed[s] = min(end, completed.get(s, end))
        for i, e in enumerate(es):
            s = e["seq"]
            missing = [v for v in range(1, s) if v not in completed]
            late = [v for v in range(1, s) if v in completed and completed[v] > e["started_at"]]
            if missing or late:
                found.append(
                    f"{key}: v{s} (ledger {e['id']}, pid {e['pid']}) started at "
                    f"{e['started_at']:%H:%M:%S.%f} before v{(missing or late)[0]} completed "
                    f"(never: {missing[:5]}, later: {late[:5]})"
                )
            if i == 0:
                continue
            prev = es[i - 1]
            if s < prev["seq"]:
                found.append(f"{key}: v{s} (ledger {e['id']}) started after v{prev['seq']}")
            elif s == prev["seq"]:
                repeats += 1
            if prev["ended_at"] is None:
                # Only a killed process leaves a call unfinished; its key is held until the
                # lease of that call is over.
                if prev["pid"] not in killed or (
                    prev["lease_expires_at"] is not None
                    and e["started_at"] < prev["lease_expires_at"]
                ):
                    found.append(
                        f"{key}: v{s} (ledger {e['id']}, attempt {e['attempt']}, after "
                        f"{e['previous_error']}) started while v{prev['seq']} (ledger "
                        f"{prev['id']}, pid {prev['pid']}, attempt {prev['attempt']}, "
                        f"unfinished) held the key"
                    )
            elif e["started_at"] < prev["ended_at"]:
                found.append(
                    f"{key}: v{s} (ledger {e['id']}) overlapped v{prev['seq']} "
                    f"(ledger {prev['id']}, {prev['started_at']:%H:%M:%S.%f}.."
                    f"{prev['ended_at']:%H:%M:%S.%f})"
                )
    return found, repeats


def commit_order_violations(
    txs: Sequence[Tx], seq_of: dict[uuid.UUID, int]
) -> tuple[list[str], int]:
    """Versions against what the writers saw: of two mutations of one key, one committed
    before the other's transaction began must have the lower version; in one transaction, the
    earlier mutation the lower. Returns the violations and how many pairs were checked."""
    by_key: defaultdict[str, list[tuple[Tx, int, Mutation]]] = defaultdict(list)
    for tx in txs:
        for pos, m in enumerate(tx.mutations):
            by_key[m.key].append((tx, pos, m))
    found: list[str] = []
    checked = 0
    for key, ms in by_key.items():
        for a_tx, a_pos, a in ms:
            for b_tx, b_pos, b in ms:
                # In one transaction, list order; across two, commit before begin.
                before = a_pos < b_pos if a_tx is b_tx else a_tx.committed < b_tx.began
                if not before:
                    continue
                checked += 1
                sa, sb = seq_of.get(a.event_id), seq_of.get(b.event_id)
                if sa is None or sb is None or sa >= sb:
                    found.append(
                        f"{key}: {a.event_id} (writer {a_tx.writer}, committed "
                        f"{a_tx.committed:%H:%M:%S.%f}) has v{sa}, {b.event_id} (writer "
                        f"{b_tx.writer}, began {b_tx.began:%H:%M:%S.%f}) has v{sb}"
                    )
    return found, checked


def concurrent_pairs(txs: Sequence[Tx]) -> int:
    """Pairs of transactions of different writers that mutated one key at the same time
    (each began before the other committed): the key's version lock decided their order."""
    by_key: defaultdict[str, list[Tx]] = defaultdict(list)
    for tx in txs:
        for key in {m.key for m in tx.mutations}:
            by_key[key].append(tx)
    return sum(
        1
        for ts in by_key.values()
        for a, b in itertools.combinations(ts, 2)
        if a.writer != b.writer and a.began < b.committed and b.began < a.committed
    )


def seqs_of(ledger: Sequence[asyncpg.Record]) -> tuple[dict[uuid.UUID, int], list[str]]:
    """Each event's version as its calls saw it (all its calls must agree)."""
    seq_of: dict[uuid.UUID, int] = {}
    found: list[str] = []
    for e in ledger:
        s = e["seq"]
        if s is None:
            continue
        if seq_of.setdefault(e["event_id"], s) != s:
            found.append(f"{e['event_id']}: called as v{seq_of[e['event_id']]} and v{s}")
    return seq_of, found


# --- 1. order under crashes ---


@dataclass(frozen=True)
class Size:
    keys: int
    per_key: tuple[int, int]  # mutations per key
    tx: tuple[int, int]  # mutations per writer transaction
    writers: int
    processes: int
    kills: int
    rate: float  # mutations per second, all writers together
    fail_rate: float


SHORT = Size(
    keys=60, per_key=(2, 5), tx=(1, 3), writers=4, processes=2, kills=1, rate=60, fail_rate=0.1
)
LONG = Size(
    keys=1000, per_key=(2, 6), tx=(1, 4), writers=16, processes=3, kills=3, rate=150, fail_rate=0.1
)


@sizes(SHORT, LONG)
async def test_keys_run_in_commit_order_through_kills(chaos: Harness, size: Size) -> None:
    rng = random.Random(20261214)
    t = await chaos.trigger(
        "ordered",
        "work",
        namespace=NAMESPACE,
        key_pattern=f"{NAMESPACE}/*",
        retry=FAST,
        execution_timeout=TIMEOUT,
        ordering="key",
    )
    keys = random_keys(rng, "", size.keys)
    txs = plan(rng, keys, size.per_key, size.tx, value={"ms": [5, 30], "fail_rate": size.fail_rate})
    total = sum(len(tx) for tx in txs)

    def spawn(slot: int, n: int) -> Proc:
        # Breakers off: 10% failures are the load here, not a reason to hold the trigger.
        return chaos.spawn(f"chaos-order-{slot}-{n}", poll=POLL, breaker_threshold=0)

    procs = [spawn(slot, 0) for slot in range(size.processes)]
    for proc in procs:
        await chaos.wait_ready(proc)
    begin = await chaos.now()

    killed: set[int] = set()
    kills: list[tuple[Kill, list[asyncpg.Record]]] = []
    committed: list[Tx] = []
    # Kill points: a random moment inside each of `kills` equal slices of the first 85% of
    # the writing (counted in committed mutations: the writers keep their pace, so rows keep
    # coming after each kill); the victim, the process with the most calls in progress at
    # that moment.
    thresholds = [
        int(total * (0.1 + 0.75 * (k + rng.uniform(0.2, 0.8)) / size.kills))
        for k in range(size.kills)
    ]

    async def writers() -> None:
        await write(chaos.dsn, size.writers, txs, rate=size.rate, done=committed)

    async def progress() -> object:
        rows = await chaos.fetch(
            f"""SELECT pid, count(*) FILTER (WHERE outcome = 'success') AS ok,
                   count(*) FILTER (WHERE ended_at IS NULL) AS open
               FROM {TABLE} GROUP BY pid"""
        )
        outbox = await chaos.fetch(
            """SELECT count(*) AS rows, count(*) FILTER (WHERE lease_token IS NOT NULL
                   AND due_at > clock_timestamp()) AS leased,
                   count(*) FILTER (WHERE due_at <= clock_timestamp()) AS due
               FROM dispatcher.outbox"""
        )
        return {
            "committed_tx": f"{len(committed)}/{len(txs)}",
            "procs": [(p.app, p.pid, p.alive()) for p in procs],
            "ledger_by_pid": [dict(r) for r in rows],
            "outbox": dict(outbox[0]),
        }

    async with anyio.create_task_group() as tg:
        tg.start_soon(writers)
        for n, threshold in enumerate(thresholds, start=1):

            async def reached(threshold: int = threshold) -> Proc | None:
                for proc in procs:
                    proc.assert_alive()
                if sum(len(tx.mutations) for tx in committed) < threshold:
                    return None
                # The busiest process (most calls in progress), so that the kill orphans work.
                busiest = await chaos.fetchval(
                    f"""SELECT pid FROM {TABLE} WHERE ended_at IS NULL AND pid = ANY ($1)
                       GROUP BY pid ORDER BY count(*) DESC, random() LIMIT 1""",
                    [p.pid for p in procs],
                )
                return next((p for p in procs if p.pid == busiest), None)

            victim = await wait_until(
                reached, within=120, what=f"{threshold} mutations written", explain=progress
            )
            slot = procs.index(victim)
            kill = await chaos.sigkill(victim)
            killed.add(victim.pid)
            procs[slot] = spawn(slot, n)
            # The rows the victim held: the leased rows of claims it had started calls of
            # (a claim's rows share its lease token; a row no call of which started cannot
            # run twice).
            tokens = {
                r[0]
                for r in await chaos.fetch(
                    f"SELECT DISTINCT lease_token FROM {TABLE} WHERE pid = $1", victim.pid
                )
            }
            held = [r for r in kill.leased if r["lease_token"] in tokens]
            kills.append((kill, held))
            await chaos.wait_ready(procs[slot])
            ids = [r["id"] for r in held]

            async def recovered(ids: list[int] = ids) -> bool:
                return await chaos.outbox_count("id = ANY ($1)", ids) == 0

            await wait_until(
                recovered, within=TIMEOUT + LEASE_MARGIN + 30, what="the orphans to re-run"
            )
    assert len(committed) == len(txs)
    await chaos.wait_drained(within=300, watch=procs)
    end = await chaos.now()
    for proc in procs:
        chaos.signal(proc, signal.SIGTERM)
    for proc in procs:
        assert await chaos.wait_exit(proc, within=15) == 0

    ledger = [e for e in await chaos.ledger() if e["trigger_id"] == t.id]
    mutations = [m for tx in committed for m in tx.mutations]
    per_key: defaultdict[str, int] = defaultdict(int)
    for m in mutations:
        per_key[m.key] += 1

    # Order: per key, in call-start order.
    violations, repeats = order_violations(ledger, t.id, killed)
    assert not violations, f"{len(violations)} order violations: {violations[:20]}"
    seq_of, disagreements = seqs_of(ledger)
    assert not disagreements, disagreements[:20]
    commit_order, pairs_checked = commit_order_violations(committed, seq_of)
    assert not commit_order, (
        f"{len(commit_order)} versions against commit order: {commit_order[:20]}"
    )

    # Zero loss: every version 1..n of every key completed, n as committed and as stored.
    versions = {
        r["key"]: r["version"]
        for r in await chaos.fetch(
            "SELECT key, version FROM dispatcher.key_versions WHERE namespace = $1", NAMESPACE
        )
    }
    assert versions == dict(per_key)
    done: defaultdict[str, set[int]] = defaultdict(set)
    for e in ledger:
        if e["outcome"] == "success":
            done[e["key"]].add(e["seq"])
    unfinished = {k: sorted(set(range(1, n + 1)) - done[k]) for k, n in per_key.items()}
    unfinished = {k: v for k, v in unfinished.items() if v}
    assert not unfinished, list(unfinished.items())[:20]
    assert set(done) == set(per_key)

    report = await chaos.check(expected_pairs([t], mutations))
    # At most the rows the killed processes held re-run.
    leased_by_killed = sum(len(held) for _, held in kills)
    report.assert_ok(max_duplicates=leased_by_killed)
    per_kill = []
    for kill, held in kills:
        assert len(held) > 0, "a kill landed when the victim held nothing"
        dups = sum(report.duplicates_by_pid[p] for p in kill.pids)
        assert dups <= len(held), (kill.pids, dups, len(held))
        per_kill.append(
            {"leased_all": kill.count, "leased_by_victim": len(held), "duplicates": dups}
        )
    assert set(report.duplicates_by_pid) <= killed, dict(report.duplicates_by_pid)
    assert report.dead_letters == 0
    assert await chaos.fetchval("SELECT count(*) FROM dispatcher.blocked_keys") == 0

    failed = sum(1 for e in ledger if e["outcome"] == "failed")
    overlapping = concurrent_pairs(committed)
    # The scenario's premise: keys written by different writers at the same moment.
    assert overlapping > 0 or size is SHORT
    record(
        "ordering-crash",
        size="long" if size is LONG else "short",
        keys=size.keys,
        mutations=total,
        writers=size.writers,
        processes=size.processes,
        kills=per_kill,
        calls=len(ledger),
        failed_calls=failed,
        reruns_of_a_version=repeats,
        order_violations=len(violations),
        commit_order_pairs_checked=pairs_checked,
        same_key_concurrent_tx_pairs=overlapping,
        seconds=round((end - begin).total_seconds(), 1),
        **report.summary(),
    )


# --- 2. a blocked key beside flowing ones ---

BLOCKED = f"{NAMESPACE}/blocked/"


@dataclass(frozen=True)
class Load:
    keys: int  # per phase
    per_key: tuple[int, int]
    tx: tuple[int, int]
    writers: int
    processes: int
    rate: float  # the other keys' mutations per second
    backlog: int  # the blocked key's mutations before a phase beside it
    blocked_rate: float  # and during it, per second
    # Phases without (A) and beside (B) a blocked key, alternated so that a drift of the
    # machine's load (other work on it) weighs on both alike; after a warm-up (W, not
    # measured: the processes' first claims, their pools filling, are slower).
    phases: str


LOAD = Load(
    keys=200, per_key=(2, 6), tx=(1, 3), writers=8, processes=3, rate=150, backlog=300,
    blocked_rate=5, phases="WABBAAB",
)  # fmt: skip


def p99(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def p50(values: Sequence[float]) -> float:
    return sorted(values)[len(values) // 2]


async def latencies(chaos: Harness, txs: Sequence[Tx]) -> list[float]:
    """Commit-to-start seconds of every mutation in ``txs``: from the clock read right after
    its transaction committed to the start of its first call."""
    ids = [m.event_id for tx in txs for m in tx.mutations]
    first = {
        r["event_id"]: r["start"]
        for r in await chaos.fetch(
            f"SELECT event_id, min(started_at) AS start FROM {TABLE} "
            "WHERE event_id = ANY ($1) GROUP BY event_id",
            ids,
        )
    }
    assert len(first) == len(ids), f"{len(ids) - len(first)} mutations never ran"
    return [(first[m.event_id] - tx.committed).total_seconds() for tx in txs for m in tx.mutations]


@pytest.mark.chaos
@pytest.mark.timeout(900)
async def test_a_blocked_key_does_not_slow_the_others(chaos: Harness) -> None:
    load = LOAD
    rng = random.Random(20261215)
    t = await chaos.trigger(
        "ordered",
        "work",
        namespace=NAMESPACE,
        key_pattern=f"{NAMESPACE}/*",
        retry=FAST,
        execution_timeout=TIMEOUT,
        ordering="key",
        on_dead_letter="block",
    )
    ref = (t.scope, t.name)
    flow = FlowControl()
    procs = [
        chaos.spawn(f"chaos-blocked-{n}", poll=POLL, breaker_threshold=0)
        for n in range(load.processes)
    ]
    for proc in procs:
        await chaos.wait_ready(proc)
    value: dict[str, object] = {"ms": [1, 5], "gate": True}

    async def blocked_keys() -> list[BlockedKey]:
        async with (await chaos.pool()).acquire() as conn:
            return await flow.blocked_keys(conn, trigger=ref)

    async def others_drained() -> bool:
        for proc in procs:
            proc.assert_alive()
        return await chaos.outbox_count("order_key NOT LIKE $1", BLOCKED + "%") == 0

    async def phase(n: int) -> list[Tx]:
        """The load: its own keys, paced writers; over once every row of them ran."""
        txs = plan(rng, random_keys(rng, f"{n}/", load.keys), load.per_key, load.tx, value=value)
        done = await write(chaos.dsn, load.writers, txs, rate=load.rate)
        await wait_until(others_drained, within=120, what="the other keys to drain")
        return done

    async def beside_blocked(n: int) -> tuple[list[Tx], dict[str, object]]:
        """A phase beside a key whose head is refused for good (PermanentError): it
        dead-letters at once and blocks the key; many mutations pile up behind it before
        the phase and during it. Then the key is checked (blocked, nothing behind the head
        run) and its dead letter replayed, with the handler taking the key again: the key
        drains, in order (checked with every key at the end)."""
        key = f"{BLOCKED}{n}"
        await chaos.fetch(f"INSERT INTO {REFUSED} (key) VALUES ($1)", key)
        await chaos.emit([Mutation("acme", NAMESPACE, key, Op.PUT, {**value, "n": 1})])
        await wait_until(blocked_keys, within=30, what="the key to be blocked")
        await chaos.emit(
            [
                Mutation("acme", NAMESPACE, key, Op.PUT, {**value, "n": i})
                for i in range(2, load.backlog + 2)
            ],
            batch=500,
        )
        written = 1 + load.backlog
        stop = anyio.Event()

        async def trickle() -> None:
            nonlocal written
            begin, i = time.monotonic(), 0
            while True:
                with anyio.move_on_after(begin + i / load.blocked_rate - time.monotonic()):
                    await stop.wait()  # pacing the writer until the phase is over
                if stop.is_set():
                    return
                written += 1
                await chaos.emit(
                    [Mutation("acme", NAMESPACE, key, Op.PUT, {**value, "n": written})]
                )
                i += 1

        async with anyio.create_task_group() as tg:
            tg.start_soon(trickle)
            done = await phase(n)
            stop.set()

        # Blocked: listed with every later row waiting, none of them run.
        [held] = await blocked_keys()
        assert (held.key, held.seq, held.waiting) == (key, 1, written - 1)
        version = await chaos.fetchval(
            "SELECT version FROM dispatcher.key_versions WHERE key = $1", key
        )
        assert version == written
        waiting = await chaos.fetch(
            "SELECT key_seq, attempts, lease_token FROM dispatcher.outbox WHERE order_key = $1 "
            "ORDER BY key_seq",
            key,
        )
        assert [r["key_seq"] for r in waiting] == list(range(2, written + 1))
        assert all(r["attempts"] == 0 and r["lease_token"] is None for r in waiting)
        calls = await chaos.fetch(f"SELECT seq, outcome FROM {TABLE} WHERE key = $1", key)
        assert [tuple(c) for c in calls] == [(1, "failed")]
        [letter] = await chaos.fetch(
            "SELECT order_key, key_seq FROM dispatcher.dead_letters "
            "WHERE order_key = $1 AND resolution = 'open'",
            key,
        )
        assert tuple(letter) == (key, 1)

        # Replayed: the key drains.
        await chaos.fetch(f"DELETE FROM {REFUSED} WHERE key = $1", key)
        async with (await chaos.pool()).acquire() as conn:
            replay = await Admin().replay(
                conn, DeadLetterFilter(trigger=t.name, resolution=Resolution.OPEN)
            )
        assert len(replay.replayed) == 1
        replayed_at = await chaos.now()
        await chaos.wait_drained(within=120, watch=procs)
        drained = (await chaos.now() - replayed_at).total_seconds()
        calls = await chaos.fetch(
            f"SELECT seq, outcome FROM {TABLE} WHERE key = $1 ORDER BY started_at, id", key
        )
        assert [c["seq"] for c in calls] == [1, *range(1, written + 1)]
        assert all(c["outcome"] == "success" for c in calls[1:])
        return done, {"blocked_rows": written, "replay_drained_s": round(drained, 1)}

    without: list[float] = []
    beside: list[float] = []
    phases: list[dict[str, object]] = []
    for n, kind in enumerate(load.phases):
        extra: dict[str, object] = {}
        if kind == "W":
            await phase(n)
            continue
        if kind == "A":
            lat = await latencies(chaos, await phase(n))
            without += lat
        else:
            txs, extra = await beside_blocked(n)
            lat = await latencies(chaos, txs)
            beside += lat
        phases.append(
            {"phase": kind, "p50_s": round(p50(lat), 4), "p99_s": round(p99(lat), 4), **extra}
        )
    for proc in procs:
        chaos.signal(proc, signal.SIGTERM)
    for proc in procs:
        assert await chaos.wait_exit(proc, within=15) == 0

    ratio = p99(beside) / p99(without)
    figures = record(
        "ordering-blocked-key",
        rows_per_phase=len(without) // load.phases.count("A"),
        p99_without_s=round(p99(without), 4),
        p99_beside_blocked_s=round(p99(beside), 4),
        p50_without_s=round(p50(without), 4),
        p50_beside_blocked_s=round(p50(beside), 4),
        ratio=round(ratio, 2),
        phases=phases,
    )
    assert ratio <= 1.5, figures
    violations, _ = order_violations(await chaos.ledger(), t.id, set())
    assert not violations, f"{len(violations)} order violations: {violations[:20]}"
    assert await chaos.outbox_count() == 0
    assert await blocked_keys() == []
    resolutions = await chaos.fetch("SELECT resolution FROM dispatcher.dead_letters")
    assert [r[0] for r in resolutions] == ["replayed"] * load.phases.count("B")
