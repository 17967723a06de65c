"""Fault-injection harness: the dispatcher under test as a subprocess, faults, and the
invariant checker every scenario ends with.

Time is always the database's (``clock_timestamp()``): the ledger, the leases and the
harness's own marks are all compared on one clock. Waiting is done by polling durable state
(ledger, outbox, process status) under :func:`wait_until`, never by sleeping for a guess.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import anyio
import anyio.to_thread
import asyncpg
import pytest

from dispatcher import Mutation, RetryPolicy, TriggerRegistry, emit_many
from dispatcher.postgres import ProvidedPostgres
from tests.chaos.ledger import DDL, DSN_ENV, LEDGER_START_FAILED, TABLE

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = "tests.chaos.handlers:registry"
# InternalClientError: asyncpg's protocol state after the server dropped the connection in
# the middle of an operation.
DB_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)
# What the dispatcher adds to a trigger's timeout to make its lease (DispatcherConfig default;
# the CLI has no option for it).
LEASE_MARGIN = 5.0
# How long harness queries retry through a database outage before giving up.
OUTAGE_PATIENCE = 60.0

T = TypeVar("T")


async def wait_until(
    check: Callable[[], Awaitable[T]],
    *,
    within: float,
    what: str,
    interval: float = 0.05,
    explain: Callable[[], Awaitable[object]] | None = None,
) -> T:
    """Poll ``check`` until it returns something truthy; fail after ``within`` seconds
    (with what ``explain`` returns, to say why)."""
    last: T | None = None
    try:
        with anyio.fail_after(within):
            while True:
                last = await check()
                if last:
                    return last
                await anyio.sleep(interval)
    except TimeoutError:
        detail = "" if explain is None else f"\n{await explain()}"
        raise AssertionError(
            f"timed out after {within:g}s waiting for {what} (last: {last!r}){detail}"
        ) from None


# Ledger outcomes of executions rescheduled without using an attempt (a rate limit, a fault
# of the dispatcher's own database under ctx.kv): the next one repeats their attempt number.
NO_ATTEMPT = frozenset({"rate_limited", "unavailable"})


class ProcessDied(AssertionError):
    """A dispatcher under test exited when it should have kept running."""


def record(scenario: str, **figures: object) -> dict[str, object]:
    """Print a scenario's measured figures (and append them to ``$CHAOS_REPORT``)."""
    line = {"scenario": scenario, **figures}
    text = json.dumps(line, default=str, sort_keys=False)
    print(f"CHAOS {text}")
    target = os.environ.get("CHAOS_REPORT")
    if target:
        with open(target, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    return line


# --- key patterns, as the library documents them (exact, prefix `a/*`, glob with * and ?) ---


def pattern_regex(pattern: str) -> re.Pattern[str]:
    parts = ["." if c == "?" else ".*" if c == "*" else re.escape(c) for c in pattern]
    return re.compile("".join(parts), re.DOTALL)


@dataclass(frozen=True, slots=True)
class TriggerSpec:
    id: int
    scope: str
    name: str
    namespace: str
    key_pattern: str
    ops: frozenset[str]
    registered_by: str
    max_attempts: int
    timeout: float
    is_dead_letter_handler: bool

    def matches(self, m: Mutation) -> bool:
        return (
            not self.is_dead_letter_handler
            and self.scope == m.scope
            and self.namespace == m.namespace
            and m.op.value in self.ops
            and pattern_regex(self.key_pattern).fullmatch(m.key) is not None
        )


Pair = tuple[uuid.UUID, int]


def expected_pairs(triggers: Iterable[TriggerSpec], mutations: Iterable[Mutation]) -> set[Pair]:
    """Every (event, trigger) the mutations must be delivered to, computed independently of
    the library's SQL matcher."""
    ts = list(triggers)
    return {(m.event_id, t.id) for m in mutations for t in ts if t.matches(m)}


# --- the dispatcher under test ---


@dataclass
class Proc:
    app: str
    popen: subprocess.Popen[bytes]
    stderr_path: Path
    log_path: Path
    started_monotonic: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def assert_alive(self) -> None:
        if not self.alive():
            raise ProcessDied(
                f"{self.app} (pid {self.pid}) exited with {self.popen.returncode}:\n"
                f"{self.stderr()[-4000:]}"
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def logs(self) -> list[dict[str, Any]]:
        """The ``dispatcher`` log records this process wrote, extras included."""
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.logs() if r["extra"].get("event") == name]


@dataclass(frozen=True, slots=True)
class Kill:
    """What a SIGKILL left behind: the rows still leased, by the database clock."""

    pids: tuple[int, ...]
    at: datetime
    leased: list[asyncpg.Record]

    @property
    def count(self) -> int:
        return len(self.leased)


class Harness:
    """One scenario's processes, faults and database access, bound to one test database."""

    def __init__(self, postgres: ProvidedPostgres, dsn: str, workdir: Path) -> None:
        self.postgres = postgres
        self.dsn = dsn
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.killed: dict[int, Kill] = {}
        self.backdated: set[uuid.UUID] = set()
        self._pool: asyncpg.Pool | None = None
        self._seq = 0

    # ----- database access (reconnects after a server restart or a terminated backend) -----

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                min_size=1,
                max_size=4,
                server_settings={"application_name": "chaos-harness"},
            )
        return self._pool

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        deadline = time.monotonic() + OUTAGE_PATIENCE
        while True:
            try:
                async with (await self.pool()).acquire() as conn:
                    return await conn.fetch(sql, *args)
            except DB_ERRORS:
                if time.monotonic() > deadline:
                    raise
                await anyio.sleep(0.1)  # bounded: the server is restarting

    async def fetchval(self, sql: str, *args: object) -> Any:
        rows = await self.fetch(sql, *args)
        return rows[0][0] if rows else None

    async def now(self) -> datetime:
        value: datetime = await self.fetchval("SELECT clock_timestamp()")
        return value

    async def setup(self) -> None:
        async with (await self.pool()).acquire() as conn:
            await conn.execute(DDL)

    async def close(self) -> None:
        for proc in self.procs:
            if proc.alive():
                proc.popen.kill()
            with anyio.fail_after(30):
                await anyio.to_thread.run_sync(proc.popen.wait)
        if self._pool is not None:
            await self._pool.close()

    # ----- setup helpers -----

    async def trigger(
        self,
        name: str,
        target: str,
        *,
        scope: str = "acme",
        namespace: str = "ns",
        key_pattern: str = "*",
        registered_by: str = "user:1",
        retry: RetryPolicy | None = None,
        execution_timeout: float = 2.0,
        is_dead_letter_handler: bool = False,
        ops: Iterable[str] = ("put", "delete"),
        conn: asyncpg.Connection | None = None,
        ordering: str | None = None,
        on_dead_letter: str | None = None,
    ) -> TriggerSpec:
        policy = retry or RetryPolicy(base_delay=0.1, max_delay=0.5, max_attempts=3)
        async with (await self.pool()).acquire() as own:
            t = await TriggerRegistry().register(
                conn or own,
                scope=scope,
                name=name,
                namespace=namespace,
                key_pattern=key_pattern,
                target=target,
                registered_by=registered_by,
                retry=policy,
                execution_timeout=execution_timeout,
                is_dead_letter_handler=is_dead_letter_handler,
                ops=ops,
                ordering=ordering,
                on_dead_letter=on_dead_letter,
            )
        return TriggerSpec(
            t.id,
            t.scope,
            t.name,
            t.namespace,
            t.key_pattern,
            frozenset(o.value for o in t.ops),
            t.registered_by,
            t.retry.max_attempts,
            t.timeout,
            t.is_dead_letter_handler,
        )

    async def emit(self, mutations: Sequence[Mutation], *, batch: int = 500) -> None:
        """Emit in batches; a batch that hits a database error is emitted again (same event
        ids, so a batch that did commit is not enqueued twice)."""
        for i in range(0, len(mutations), batch):
            chunk = mutations[i : i + batch]
            deadline = time.monotonic() + OUTAGE_PATIENCE
            while True:
                try:
                    async with (await self.pool()).acquire() as conn:
                        await emit_many(conn, chunk, autocommit=True)
                    break
                except DB_ERRORS:
                    if time.monotonic() > deadline:
                        raise
                    await anyio.sleep(0.1)  # bounded: the server is restarting

    async def produce(self, mutations: Sequence[Mutation], *, rate: float, batch: int = 50) -> None:
        """Emit at ``rate`` mutations per second (a steady producer, below capacity)."""
        begin = time.monotonic()
        for i in range(0, len(mutations), batch):
            due = begin + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await anyio.sleep(delay)  # pacing the producer, not waiting for a condition
            await self.emit(mutations[i : i + batch], batch=batch)

    # ----- processes -----

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        env[DSN_ENV] = self.dsn
        env.pop("DATABASE_URL", None)
        if extra:
            env.update(extra)
        return env

    def _paths(self, app: str) -> tuple[Path, Path]:
        self._seq += 1
        base = self.workdir / f"{self._seq:02d}-{app}"
        return base.with_suffix(".stderr"), base.with_suffix(".jsonl")

    def _popen(self, app: str, args: list[str], env: dict[str, str] | None) -> Proc:
        stderr_path, log_path = self._paths(app)
        full_env = self._env(env)
        full_env["CHAOS_LOG_FILE"] = str(log_path)
        with open(stderr_path, "wb") as err:
            popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=ROOT,
                env=full_env,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        proc = Proc(app, popen, stderr_path, log_path)
        self.procs.append(proc)
        return proc

    def spawn(
        self,
        app: str = "chaos-d",
        *,
        concurrency: int = 100,
        batch_size: int = 100,
        poll: float = 0.1,
        grace: float = 10.0,
        max_depth: int = 8,
        breaker_threshold: int | None = None,
        max_executions_per_root: int | None = None,
        dsn: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """Start ``python -m dispatcher.cli run`` as a subprocess with its own
        application_name (options left as None keep the command's defaults)."""
        args = [
            "-m", "dispatcher.cli", "--log-level", "INFO", "run",
            "--handlers", HANDLERS,
            "--dsn", dsn or self.dsn,
            "--application-name", app,
            "--concurrency", str(concurrency),
            "--batch-size", str(batch_size),
            "--poll-interval", str(poll),
            "--grace-period", str(grace),
            "--max-depth", str(max_depth),
        ]  # fmt: skip
        if breaker_threshold is not None:
            args += ["--breaker-threshold", str(breaker_threshold)]
        if max_executions_per_root is not None:
            args += ["--max-executions-per-root", str(max_executions_per_root)]
        return self._popen(app, args, env)

    def spawn_invoker(self, trigger_id: int, app: str = "chaos-inv", *, parallel: int = 4) -> Proc:
        args = [
            "-m", "tests.chaos.invoker", "--dsn", self.dsn, "--trigger", str(trigger_id),
            "--application-name", app, "--parallel", str(parallel), "--time-limit", "2",
        ]  # fmt: skip
        return self._popen(app, args, None)

    async def slow_close_proxy(self, *, delay: float = 0.3) -> str:
        """Start :mod:`tests.chaos.proxy` in front of the server; return the DSN through it.

        The proxy passes on the server's end of a connection ``delay`` seconds late."""
        parts = urlsplit(self.dsn)
        query = dict(parse_qsl(parts.query))
        port = parts.port or int(query.get("port", "5432"))
        if "host" in query:  # a unix socket directory (the embedded server)
            where = tempfile.mkdtemp(prefix="chaos-px-")
            listen, target = where, query["host"]
            dsn = urlunsplit(parts._replace(query=urlencode(query | {"host": where})))
            ready = Path(where) / f".s.PGSQL.{port}"
        else:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                free = s.getsockname()[1]
            listen, target = str(free), f"{parts.hostname}:{port}"
            user = parts.netloc.rpartition("@")[0]
            dsn = urlunsplit(parts._replace(netloc=f"{user}@127.0.0.1:{free}"))
            ready = None
        args = [
            "-m", "tests.chaos.proxy", "--listen", listen, "--target", target,
            "--port", str(port), "--delay", str(delay),
        ]  # fmt: skip
        proc = self._popen("chaos-proxy", args, None)

        async def listening() -> bool:
            proc.assert_alive()
            if ready is not None:
                return ready.exists()
            with contextlib.suppress(OSError):
                await (await anyio.connect_tcp("127.0.0.1", int(listen))).aclose()
                return True
            return False

        await wait_until(listening, within=15, what="the proxy to listen")
        return dsn

    async def backends(self, app: str) -> int:
        """Connections the process named ``app`` holds (its pool and its listener)."""
        n: int = await self.fetchval(
            """SELECT count(*) FROM pg_stat_activity
               WHERE datname = current_database()
                 AND (application_name = $1 OR application_name = $1 || ':listen')""",
            app,
        )
        return n

    async def wait_ready(self, proc: Proc, *, within: float = 30.0) -> None:
        """Wait until the process is connected (its pool opens two connections at once)."""

        async def ready() -> bool:
            proc.assert_alive()
            return await self.backends(proc.app) >= 2

        await wait_until(ready, within=within, what=f"{proc.app} to connect")

    async def wait_exit(self, proc: Proc, *, within: float) -> int:
        """Wait for the process to exit; fail (leaving it running) after ``within`` s."""
        try:
            code: int = await anyio.to_thread.run_sync(partial(proc.popen.wait, within))
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{proc.app} (pid {proc.pid}) still running {within:g}s after the signal:\n"
                f"{proc.stderr()[-3000:]}"
            ) from None
        return code

    # ----- faults -----

    async def sigkill(self, *procs: Proc) -> Kill:
        """SIGKILL the processes; report the rows left leased once all of them are dead."""
        for proc in procs:
            proc.popen.send_signal(signal.SIGKILL)
        for proc in procs:
            await self.wait_exit(proc, within=30)
        at = await self.now()
        leased = await self.fetch(
            """SELECT id, event_id, trigger_id, lease_token, due_at AS lease_expires_at,
                   reply_to IS NOT NULL AS is_reply, dead_letter_id
               FROM dispatcher.outbox
               WHERE lease_token IS NOT NULL AND due_at > clock_timestamp()"""
        )
        kill = Kill(tuple(p.pid for p in procs), at, leased)
        for proc in procs:
            self.killed[proc.pid] = kill
        return kill

    def signal(self, proc: Proc, signum: signal.Signals) -> None:
        proc.popen.send_signal(signum)

    async def terminate_backends(self, app: str) -> int:
        """``pg_terminate_backend`` every connection of the process named ``app``."""
        rows = await self.fetch(
            """SELECT pg_terminate_backend(pid) FROM pg_stat_activity
               WHERE datname = current_database()
                 AND (application_name = $1 OR application_name = $1 || ':listen')""",
            app,
        )
        return sum(1 for r in rows if r[0])

    async def backdate_leases(self, *, trigger_ids: Sequence[int] | None = None) -> int:
        """Make live leases expire now (deterministic expiry); remember their tokens."""
        rows = await self.fetch(
            """UPDATE dispatcher.outbox SET due_at = clock_timestamp() - interval '1 second'
               WHERE lease_token IS NOT NULL AND due_at > clock_timestamp()
                 AND ($1::bigint[] IS NULL OR trigger_id = ANY ($1))
               RETURNING lease_token""",
            list(trigger_ids) if trigger_ids is not None else None,
        )
        self.backdated.update(r[0] for r in rows)
        return len(rows)

    def can_restart_postgres(self) -> bool:
        return self.postgres.control is not None and self.postgres.source in (
            "embedded",
            "testcontainers",
        )

    @contextlib.asynccontextmanager
    async def mid_settlement(self, app: str) -> AsyncIterator[None]:
        """Hold the outbox in EXCLUSIVE mode until a settlement of the process named ``app``
        (a fenced write inside its transaction) waits on the lock, so that a fault injected
        in the body hits the process in the middle of that transaction; the lock goes when
        the block ends. Needs executions finishing meanwhile."""
        holder = await asyncpg.connect(self.dsn, server_settings={"application_name": "chaos-lock"})
        try:
            tx = holder.transaction()
            await tx.start()
            await holder.execute("LOCK TABLE dispatcher.outbox IN EXCLUSIVE MODE")

            async def waiting() -> bool:
                # Settlements pass their rows as arrays (unnest); claims do not.
                n: int = await self.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                       WHERE datname = current_database() AND application_name = $1
                         AND wait_event_type = 'Lock' AND query LIKE '%unnest(%'""",
                    app,
                )
                return n > 0

            async def activity() -> object:
                rows = await self.fetch(
                    """SELECT application_name, state, wait_event_type, left(query, 120) AS q
                       FROM pg_stat_activity WHERE datname = current_database()"""
                )
                return [dict(r) for r in rows]

            await wait_until(
                waiting, within=10, what=f"a settlement of {app} to wait", explain=activity
            )
            yield
        finally:
            holder.terminate()

    @contextlib.asynccontextmanager
    async def postgres_down(self) -> AsyncIterator[None]:
        """Stop the server for the body of the block; it is started again on the way out,
        whatever happens (the session's other tests share it)."""
        assert self.postgres.control is not None
        control = self.postgres.control
        await anyio.to_thread.run_sync(control.stop)
        try:
            yield
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(control.start)

    # ----- observation -----

    async def ledger(self) -> list[asyncpg.Record]:
        return await self.fetch(f"SELECT * FROM {TABLE} ORDER BY started_at, id")

    async def ledger_count(self, where: str = "true", *args: object) -> int:
        n: int = await self.fetchval(f"SELECT count(*) FROM {TABLE} WHERE {where}", *args)
        return n

    async def outbox_count(self, where: str = "true", *args: object) -> int:
        n: int = await self.fetchval(f"SELECT count(*) FROM dispatcher.outbox WHERE {where}", *args)
        return n

    async def wait_drained(self, *, within: float, watch: Sequence[Proc] = ()) -> None:
        """Wait until the outbox is empty (every row succeeded, was dead-lettered, answered
        or dropped); fail at once if a process in ``watch`` dies meanwhile."""

        async def empty() -> bool:
            for proc in watch:
                proc.assert_alive()
            return await self.outbox_count() == 0

        await wait_until(empty, within=within, what="the outbox to drain", interval=0.1)

    async def check(self, expected: set[Pair], *, max_depth: int = 8) -> Report:
        """Run the invariant checker (see :class:`Report`)."""
        return Report.build(
            ledger=await self.ledger(),
            triggers=await self.fetch("SELECT * FROM dispatcher.triggers"),
            dead_letters=await self.fetch("SELECT * FROM dispatcher.dead_letters"),
            outbox=await self.fetch("SELECT * FROM dispatcher.outbox"),
            expected=expected,
            max_depth=max_depth,
            backdated=self.backdated,
        )


# --- the invariant checker ---


@dataclass
class Report:
    """What the ledger and the tables say after a scenario.

    A *duplicate* is an execution that re-ran a pair whose previous execution succeeded, or
    that ran without a new attempt being counted (the previous claim's result was never
    written: its process died, or its lease was lost). Rate-limited reschedules are not
    duplicates. Each duplicate is charged to the process of the execution it repeated.
    """

    executions: int
    pairs_executed: int
    successes: int
    dead_letters: int
    lost: list[Pair]
    outbox_left: int
    duplicates: int
    duplicates_by_pid: Counter[int]
    # Each duplicate as (the execution repeated, the repeat).
    reruns: list[tuple[asyncpg.Record, asyncpg.Record]]
    # Violations of the invariants (each list must be empty).
    within_lease: list[str]
    over_attempts: list[str]
    over_depth: list[str]
    wrong_principal: list[str]
    reply_reruns: list[str]
    handler_reruns: list[str]
    multiple_dead_letters: list[str]

    @classmethod
    def build(
        cls,
        *,
        ledger: Sequence[asyncpg.Record],
        triggers: Sequence[asyncpg.Record],
        dead_letters: Sequence[asyncpg.Record],
        outbox: Sequence[asyncpg.Record],
        expected: set[Pair],
        max_depth: int,
        backdated: set[uuid.UUID],
    ) -> Report:
        by_trigger = {t["id"]: t for t in triggers}
        runs: defaultdict[Pair, list[asyncpg.Record]] = defaultdict(list)
        for e in ledger:
            runs[(e["event_id"], e["trigger_id"])].append(e)
        for pair, es in runs.items():
            runs[pair] = _without_phantom_starts(es)
        dl_pairs = Counter((d["event_id"], d["trigger_id"]) for d in dead_letters)
        successes = {p for p, es in runs.items() if any(e["outcome"] == "success" for e in es)}

        within_lease: list[str] = []
        over_attempts: list[str] = []
        duplicates_by_pid: Counter[int] = Counter()
        reruns: list[tuple[asyncpg.Record, asyncpg.Record]] = []
        for pair, es in runs.items():
            t = by_trigger.get(pair[1])
            counted = 0
            for i, e in enumerate(es):
                if e["outcome"] not in NO_ATTEMPT:
                    counted += 1
                if i == 0:
                    continue
                prev = es[i - 1]
                backdated_prev = prev["lease_token"] in backdated
                rerun = prev["outcome"] == "success" or (
                    e["attempt"] <= prev["attempt"] and prev["outcome"] not in NO_ATTEMPT
                )
                if rerun:
                    duplicates_by_pid[prev["pid"]] += 1
                    reruns.append((prev, e))
                    if prev["outcome"] == "cancelled":
                        counted -= 1  # released at shutdown: no attempt, no orphan
                    # A re-run is legitimate only once the previous claim's lease is gone:
                    # expired (process died, result lost), backdated by the harness, or
                    # given back when a shutdown cancelled the execution.
                    lease_over = (
                        prev["lease_expires_at"] is None
                        or e["started_at"] >= prev["lease_expires_at"]
                    )
                    if not (lease_over or backdated_prev or prev["outcome"] == "cancelled"):
                        within_lease.append(_describe(pair, prev, e, "re-run within the lease"))
                elif (
                    prev["ended_at"] is not None
                    and e["started_at"] < prev["ended_at"]
                    and not backdated_prev
                ):
                    # A next attempt while the previous one still ran. (A previous run with
                    # no end but a counted attempt is a blocking handler the executor
                    # abandoned at its timeout: its thread cannot be stopped.)
                    within_lease.append(_describe(pair, prev, e, "overlapping executions"))
            if t is not None:
                top = max(e["attempt"] for e in es)
                if top > t["max_attempts"] or counted > t["max_attempts"]:
                    over_attempts.append(
                        f"{pair}: attempt {top}, {counted} counted executions, "
                        f"max_attempts {t['max_attempts']}"
                    )
        for d in dead_letters:
            policy = json.loads(d["policy"])
            if d["attempts"] > policy["max_attempts"]:
                over_attempts.append(f"dead letter {d['id']}: {d['attempts']} attempts")

        wrong_principal = []
        for e in ledger:
            t = by_trigger.get(e["trigger_id"])
            if t is None:
                continue
            scopes_ok = e["scope"] == t["scope"] and e["event_scope"] in (None, t["scope"])
            if e["principal"] != t["registered_by"] or not scopes_ok:
                wrong_principal.append(
                    f"ledger {e['id']}: ran as {e['principal']!r} in {e['scope']!r} "
                    f"(event scope {e['event_scope']!r}) for trigger {t['id']} registered by "
                    f"{t['registered_by']!r} in {t['scope']!r}"
                )

        reply_runs = Counter((e["event_id"], e["trigger_id"]) for e in ledger if e["is_reply"])
        handler_runs = Counter(e["dead_letter_id"] for e in ledger if e["dead_letter_id"])
        lost = sorted(expected - successes - set(dl_pairs), key=str)
        return cls(
            executions=len(ledger),
            pairs_executed=len(runs),
            successes=len(successes),
            dead_letters=len(dead_letters),
            lost=lost,
            outbox_left=len(outbox),
            duplicates=sum(duplicates_by_pid.values()),
            duplicates_by_pid=duplicates_by_pid,
            reruns=reruns,
            within_lease=within_lease,
            over_attempts=over_attempts,
            over_depth=[
                f"ledger {e['id']}: depth {e['depth']} > {max_depth}"
                for e in ledger
                if e["depth"] > max_depth
            ],
            wrong_principal=wrong_principal,
            reply_reruns=[f"{p}: {n} runs" for p, n in reply_runs.items() if n > 1],
            handler_reruns=[f"dead letter {d}: {n} runs" for d, n in handler_runs.items() if n > 1],
            multiple_dead_letters=[f"{p}: {n} dead letters" for p, n in dl_pairs.items() if n > 1],
        )

    def violations(self) -> dict[str, list[str]]:
        found = {
            "lost": [str(p) for p in self.lost[:20]],
            "outbox_left": [str(self.outbox_left)] if self.outbox_left else [],
            "within_lease": self.within_lease,
            "over_attempts": self.over_attempts,
            "over_depth": self.over_depth,
            "wrong_principal": self.wrong_principal,
            "reply_reruns": self.reply_reruns,
            "handler_reruns": self.handler_reruns,
            "multiple_dead_letters": self.multiple_dead_letters,
        }
        return {k: v[:20] for k, v in found.items() if v}

    def assert_ok(self, *, max_duplicates: int | None = 0) -> None:
        """Every invariant holds; at most ``max_duplicates`` duplicates (None: any number,
        each still justified by a fault)."""
        problems = self.violations()
        assert not problems, f"invariants violated: {json.dumps(problems, indent=1)}"
        if max_duplicates is not None:
            assert self.duplicates <= max_duplicates, (
                f"{self.duplicates} duplicate executions (allowed {max_duplicates}): "
                f"{dict(self.duplicates_by_pid)}"
            )

    def summary(self) -> dict[str, object]:
        return {
            "executions": self.executions,
            "pairs_executed": self.pairs_executed,
            "successes": self.successes,
            "dead_letters": self.dead_letters,
            "duplicates": self.duplicates,
        }


def _without_phantom_starts(es: list[asyncpg.Record]) -> list[asyncpg.Record]:
    """Drop ledger starts that committed although their writer saw an error.

    A server shutting down can commit a ledger INSERT and then end the connection before the
    reply is read: the handler, told the start was not written, asks for a reschedule
    (``RateLimited``, no attempt used), and the row runs again. That start has no end, and the
    next execution of the pair says why it came: its row's last error is that reschedule.
    """
    kept: list[asyncpg.Record] = []
    for i, e in enumerate(es):
        nxt = es[i + 1] if i + 1 < len(es) else None
        if nxt is not None and e["outcome"] is None and nxt["attempt"] == e["attempt"]:
            why = json.loads(nxt["previous_error"]) if nxt["previous_error"] else {}
            if why.get("kind") == "rate_limited" and LEDGER_START_FAILED in str(
                why.get("message", "")
            ):
                continue
        kept.append(e)
    return kept


def _describe(pair: Pair, prev: asyncpg.Record, e: asyncpg.Record, what: str) -> str:
    return (
        f"{what}: {pair} ledger {prev['id']} (pid {prev['pid']}, attempt {prev['attempt']}, "
        f"{prev['outcome']}, {prev['started_at']}..{prev['ended_at']}, lease "
        f"{prev['lease_token']} to {prev['lease_expires_at']}) then {e['id']} (pid "
        f"{e['pid']}, attempt {e['attempt']}, lease {e['lease_token']}, started "
        f"{e['started_at']}, after error {e['previous_error']})"
    )


def sizes(short: object, long: object) -> pytest.MarkDecorator:
    """Parametrize a scenario with its short size (default suite) and its long size (marked
    ``chaos``: ``python -m pytest -m chaos``)."""
    return pytest.mark.parametrize(
        "size",
        [
            pytest.param(short, id="short"),
            pytest.param(long, id="long", marks=[pytest.mark.chaos, pytest.mark.timeout(3600)]),
        ],
    )
