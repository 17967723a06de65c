"""Regenerate the example output blocks of docs/cli.md from real runs.

    python docs/generate_cli.py           # rewrite the examples of docs/cli.md if they changed
    python docs/generate_cli.py --check   # exit 1 if they are out of date; change nothing

Postgres: ``--dsn URL`` or ``$DISPATCHER_TEST_DSN`` (a server the script may create and drop
databases on), else what the test suite would use (a Docker container, else the embedded
server of the ``embedded`` extra). Each scenario below gets a throw-away database, migrated,
seeded by real dispatcher runs of the failing handlers below, and dropped at the end. ``psql``
must be on the PATH (or come with the embedded server) for the SQL examples.

The script owns the regions of docs/cli.md between ``<!-- cli: KEY -->`` and
``<!-- /cli -->`` and leaves the prose around them alone. Each KEY is written by one step of a
scenario (``letters``, ``flow``, ``caps``, ``redaction``), in the order the scenario runs its
commands, which is not always the order the doc shows them in; a region no step writes, or a
step whose region is missing, stops the script. So does a command exiting with another status
than its step expects: an example of an error stays an error. Commands run in-process through click
(stdout is not a terminal, so tables are plain text), except ``dispatcher run``, which runs as
a process of its own. The DSN goes in ``$DATABASE_URL``, so no example shows it, and this
machine's directories are cut from file paths (``File "dispatcher/runtime/handlers.py"``).

Both modes compare with event ids, times, measured ages and traceback line numbers masked and
column widths ignored: a new field, message, row or command counts as a change, a new
timestamp does not (the file is then left as it is, so regenerating makes no noise in a diff).
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import re
import shlex
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import traceback
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import asyncpg
from click.testing import CliRunner

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    FlowControl,
    HandlerContext,
    HandlerRegistry,
    InvokeTimeout,
    Mutation,
    Op,
    RetryPolicy,
    emit_many,
    migrate,
)
from dispatcher.cli import main
from dispatcher.postgres import ProvidedPostgres, provide_postgres, with_database
from dispatcher.runtime.handlers import PermanentError, PermissionDenied
from dispatcher.triggers import TriggerRegistry

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "cli.md"
COMMAND = "python docs/generate_cli.py"

REGION = re.compile(r"(<!-- cli: (?P<key>\S+) -->\n)(?P<body>.*?)(<!-- /cli -->)", re.DOTALL)

# Retries at once, so that one dispatcher run uses up every attempt.
AT_ONCE = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=3)


# --- the handlers the scenarios' dispatchers run (their tracebacks show these lines) ---

letters_handlers = HandlerRegistry()
flow_handlers = HandlerRegistry()


@letters_handlers.handler("send_welcome")
@flow_handlers.handler("send_welcome")
async def send_welcome(ctx: HandlerContext) -> None:
    raise ConnectionRefusedError("smtp.example.com:587 refused the connection")


@letters_handlers.handler("crm_upsert")
async def crm_upsert(ctx: HandlerContext) -> dict[str, object]:
    if ctx.event["key"] == "invoke":
        # A synchronous call that outlasts its caller's patience: its result is abandoned.
        await anyio.sleep(1.5)
        return {"crm_id": "c-0009", "synced": True}
    value = ctx.event.get("value")
    if isinstance(value, dict) and "email" not in value:
        raise PermanentError("CRM rejected the record: email is missing")
    return {"synced": True}


@letters_handlers.handler("make_invoice")
async def make_invoice(ctx: HandlerContext) -> None:
    raise TimeoutError("billing API did not answer")


@flow_handlers.handler("crm_upsert")
async def crm_upsert_denied(ctx: HandlerContext) -> None:
    raise PermissionDenied("svc:crm may not write contacts")


# The flow scenario's `make_invoice` is not deployed: no handler, so its rows park.

# `dispatcher run --handlers billing_jobs:handlers`, in a process of its own, imports this
# from a temporary directory.
BILLING_JOBS = """\
from dispatcher import HandlerContext, HandlerRegistry

handlers = HandlerRegistry()


@handlers.handler("charge")
async def charge(ctx: HandlerContext) -> None:
    customer = ctx.event["value"]
    raise RuntimeError(
        f"card service refused {customer}: customer_ssn={customer['customer_ssn']} via "
        "https://billing:hunter2@pay.example/v1"
    )
"""


# --- running commands and recording what they print ---


@dataclass
class Session:
    """One throw-away database, and the blocks its commands write."""

    dsn: str
    blocks: dict[str, list[str]]
    scrub: Callable[[str], str]
    runner: CliRunner = field(init=False)

    def __post_init__(self) -> None:
        env = {"DATABASE_URL": self.dsn, "DISPATCHER_SCHEMA": None, "DISPATCHER_LOG_LEVEL": None}
        self.runner = CliRunner(env=env)

    def cli(
        self, key: str, command: str, *, code: int = 0, keep: Callable[[str], str] | None = None
    ) -> None:
        """Run ``dispatcher COMMAND`` (shell syntax) and record it and its output (stdout and
        stderr, as a terminal shows them; ``keep`` picks a part) under ``key``."""
        args = shlex.split(command)
        result = self.runner.invoke(main, args, prog_name="dispatcher")
        if result.exit_code != code or (code == 0 and result.exception is not None):
            raise SystemExit(
                f"`dispatcher {command}` ({key}) exited {result.exit_code}, expected {code}:\n"
                f"{result.output}{_traceback(result.exc_info)}"
            )
        self.record(key, ["dispatcher", *args], keep(result.output) if keep else result.output)

    def psql(self, key: str, query: str, *, fails: bool = False) -> None:
        """Run ``query`` through psql and record it and its output (with ``fails``: an
        error expected, and recorded as psql prints it)."""
        done = subprocess.run(
            [_psql(), self.dsn, "-c", query],
            env={**os.environ, "PSQLRC": os.devnull, "PGTZ": "UTC"},
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        if (done.returncode != 0) != fails:
            raise SystemExit(f"psql -c {query!r} ({key}) exited {done.returncode}:\n{done.stderr}")
        self.record(key, ["psql", "$DATABASE_URL", "-c", query], done.stdout + done.stderr)

    def record(self, key: str, argv: Sequence[str], output: str) -> None:
        lines = [_prompt(argv)]
        lines += [ln.rstrip() for ln in self.scrub(output).rstrip("\n").splitlines()]
        self.blocks.setdefault(key, []).extend(lines)

    def run(self, fn: Callable[[asyncpg.Connection], Coroutine[Any, Any, None]]) -> None:
        """Run ``fn`` on a connection to this database."""

        async def go() -> None:
            conn = await asyncpg.connect(self.dsn)
            try:
                await fn(conn)
            finally:
                await conn.close()

        anyio.run(go)


def _traceback(exc_info: Any) -> str:
    if not exc_info or isinstance(exc_info[1], SystemExit):
        return ""
    return "".join(traceback.format_exception(*exc_info))


def _prompt(argv: Sequence[str], width: int = 96) -> str:
    """``$ command``, quoted as a shell needs it; a long one broken before an option."""
    words = ['"$DATABASE_URL"' if a == "$DATABASE_URL" else _quote(a) for a in argv]
    units: list[str] = []  # an option and its value stay on one line
    for word in words:
        if units and units[-1].startswith("--") and " " not in units[-1] and word[0] != "-":
            units[-1] += " " + word
        else:
            units.append(word)
    lines = ["$"]
    for unit in units:
        if len(lines[-1]) + 1 + len(unit) > width - 2 and unit.startswith("--"):
            lines[-1] += " \\"
            lines.append("   ")
        lines[-1] += " " + unit
    return "\n".join(lines)


def _quote(word: str) -> str:
    """``word`` as a shell reads it: in double quotes when it holds single quotes (SQL text)
    and nothing a shell would expand between double quotes."""
    if "'" in word and not re.search(r'["$`\\!]', word):
        return f'"{word}"'
    return shlex.quote(word)


def _psql() -> str:
    found = shutil.which("psql")
    if found:
        return found
    with contextlib.suppress(ImportError):
        from pgserver._commands import POSTGRES_BIN_PATH

        return str(POSTGRES_BIN_PATH / "psql")
    raise SystemExit("psql not found: install the Postgres client, or the embedded extra")


def make_scrub(dsns: Sequence[str], tmp: Path) -> Callable[[str], str]:
    """Cut this machine out of an output: the DSNs, and the directories of file paths."""
    dirs = {str(tmp), str(ROOT), sys.prefix, sys.base_prefix, sysconfig.get_paths()["purelib"]}
    dirs.update(site.getsitepackages())
    prefixes = sorted({d.rstrip("/") + "/" for d in dirs if d}, key=len, reverse=True)

    def scrub(text: str) -> str:
        for dsn in dsns:
            text = text.replace(dsn, "$DATABASE_URL")
        for prefix in prefixes:
            text = text.replace(prefix, "")
        return text

    return scrub


# --- scenarios ---


async def _register(conn: asyncpg.Connection, **kw: Any) -> int:
    return (await TriggerRegistry().register(conn, **kw)).id


async def _put(
    conn: asyncpg.Connection, scope: str, namespace: str, values: dict[str, Any]
) -> None:
    mutations = [Mutation(scope, namespace, key, Op.PUT, v) for key, v in values.items()]
    async with conn.transaction():
        await emit_many(conn, mutations)


def _quick(breaker_threshold: int = 0) -> DispatcherConfig:
    """Polls often; no circuit breakers unless asked."""
    return DispatcherConfig(poll_interval=0.05, breaker_threshold=breaker_threshold)


def letters(s: Session) -> None:
    """The dead-letter examples: three triggers whose handlers fail, run to the end, and a
    synchronous call whose caller gave up."""

    async def seed(conn: asyncpg.Connection) -> None:
        users = {"namespace": "users", "key_pattern": "users/*", "registered_by": "user:7"}
        await _register(
            conn, scope="acme", name="welcome-email", target="send_welcome", ops=["put"],
            retry=AT_ONCE, execution_timeout=10, **users,
        )  # fmt: skip
        crm = await _register(
            conn, scope="acme", name="sync-crm", target="crm_upsert", retry=AT_ONCE, **users
        )
        await _register(
            conn, scope="globex", name="invoice", namespace="orders", key_pattern="orders/*",
            target="make_invoice", registered_by="svc:billing", retry=AT_ONCE,
        )  # fmt: skip
        # One event at a time, so that the dead letters' ids are the same on every run:
        # 1 sync-crm (permanent at once), 2 and 3 welcome-email, 4 invoice.
        for scope, namespace, key, value in (
            ("acme", "users", "users/7", {"name": "user 7", "plan": "pro"}),
            ("acme", "users", "users/8", {"name": "user 8", "email": "u8@example.com"}),
            ("globex", "orders", "orders/1001", {"customer": "users/8", "total": 120}),
        ):
            await _put(conn, scope, namespace, {key: value})
            dispatcher = Dispatcher(s.dsn, letters_handlers, config=_quick())
            await dispatcher.run_until_idle(include_scheduled=True, time_limit=30)
        await _abandon(s.dsn, conn, crm)

    s.run(seed)
    s.cli("letters/triggers-list", "triggers list")
    s.cli(
        "letters/triggers-add",
        "triggers add --scope acme --name audit --namespace users --pattern 'users/*' "
        "--target audit_log --registered-by user:7 --ops put --retry-kind linear --base-delay 5 "
        "--factor 1 --max-delay 60 --max-attempts 4 --timeout 15",
    )
    s.cli("letters/triggers-disable", "triggers disable 4")
    s.cli("letters/triggers-enable", "triggers enable 4")
    s.cli("letters/triggers-list-json", "triggers list --scope globex --json")
    s.cli("letters/triggers-remove", "triggers remove 4")
    s.cli("letters/triggers-remove-again", "triggers remove 4", code=1)
    s.cli(
        "letters/triggers-add-taken",
        "triggers add --scope acme --name welcome-email --namespace users --pattern 'users/*' "
        "--target x --registered-by user:7",
        code=1,
    )

    s.cli("letters/list", "dead-letters list")
    s.cli(
        "letters/list-filtered", "dead-letters list --scope acme --reason handler_error --since 1h"
    )
    s.cli("letters/list-older", "dead-letters list --older-than 7d")
    s.cli("letters/show", "dead-letters show 1")
    s.cli("letters/show-json", "dead-letters show 1 --json")

    s.cli("letters/replay-dry", "dead-letters replay --trigger acme/welcome-email --dry-run")
    s.cli("letters/replay", "dead-letters replay --trigger acme/welcome-email")
    s.cli("letters/replay-again", "dead-letters replay 2 3")
    s.cli("letters/show-replayed", "dead-letters show 3")
    s.cli("letters/replay-current", "dead-letters replay 1 --policy current --dry-run --json")
    s.cli("letters/replay-nothing", "dead-letters replay", code=2)

    s.cli("letters/discard-dry", "dead-letters discard 4 --dry-run")
    s.cli("letters/discard", "dead-letters discard 4")
    s.cli("letters/discard-final", "dead-letters discard --resolution replayed", code=1)

    s.cli("letters/purge-dry", "dead-letters purge --older-than 7d --dry-run")
    s.cli("letters/purge", "dead-letters purge --older-than 0s")
    s.cli("letters/list-json", "dead-letters list --json")

    s.cli("letters/abandoned", "abandoned list")
    s.cli("letters/abandoned-json", "abandoned list --since 1h --json")

    s.cli("letters/error-no-letter", "dead-letters show 999", code=1)
    s.cli("letters/error-since", "dead-letters list --since yesterday", code=2)
    s.cli("letters/error-trigger-id", "dead-letters list --trigger-id 0", code=1)
    s.cli("letters/error-schema", "status --schema elsewhere", code=1)
    unreachable = "postgresql://app:secret@127.0.0.1:1/app"
    s.cli("letters/error-unreachable", f"status --dsn {unreachable}", code=1)
    bad_port = "postgresql://app:secret@127.0.0.1:99999/app"
    s.cli("letters/error-bad-dsn", f"status --dsn {bad_port}", code=1)
    s.psql(
        "letters/summary-view",
        "SELECT * FROM dispatcher.dead_letter_summary ORDER BY scope, trigger_name",
    )


async def _abandon(dsn: str, conn: asyncpg.Connection, trigger_id: int) -> None:
    """A synchronous call that stops waiting before its execution ends: one abandoned
    result, recorded when the execution does end."""
    dispatcher = Dispatcher(dsn, letters_handlers, config=_quick())
    async with anyio.create_task_group() as tg:
        await tg.start(dispatcher.run)
        with contextlib.suppress(InvokeTimeout):
            await dispatcher.invoke(trigger_id, {"name": "user 9"}, time_limit=0.5)
        count = "SELECT count(*) FROM dispatcher.abandoned_executions"
        with anyio.fail_after(30):
            while not await conn.fetchval(count):
                with anyio.move_on_after(0.1):
                    await dispatcher.progressed()
        dispatcher.stop()


def flow(s: Session) -> None:
    """The flow-control examples: a run that parks rows and opens breakers; pauses, resets,
    un-parks."""

    async def setup(conn: asyncpg.Connection) -> None:
        users = {"scope": "acme", "namespace": "users", "key_pattern": "users/*"}
        await _register(
            conn, name="welcome-email", target="send_welcome", registered_by="user:7",
            ops=["put"], retry=RetryPolicy(base_delay=0, max_delay=0, jitter=0),
            execution_timeout=10, **users,
        )  # fmt: skip
        parks = RetryPolicy(
            base_delay=0, max_delay=0, jitter=0, max_attempts=3,
            park_on=frozenset({"permission_denied"}),
        )  # fmt: skip
        await _register(
            conn, name="crm-sync", target="crm_upsert", registered_by="svc:crm", retry=parks,
            **users,
        )  # fmt: skip

    async def dispatch(conn: asyncpg.Connection) -> None:
        await _put(
            conn, "acme", "users", {f"users/{n}": {"name": f"user {n}"} for n in range(1, 5)}
        )
        await _put(conn, "globex", "orders", {f"orders/{n}": {"total": 10 * n} for n in (1, 2, 3)})
        # One trigger at a time, the others paused, so that the breakers open in the same
        # order on every run (`breakers list` shows the latest change first).
        flow = FlowControl()
        for trigger_id in (1, 2, 3):
            await flow.pause(conn, trigger_id=trigger_id)
        for trigger_id in (1, 2, 3):
            await flow.resume(conn, trigger_id=trigger_id)
            # Until nothing is claimable: parked rows wait, an open breaker holds the rest.
            dispatcher = Dispatcher(s.dsn, flow_handlers, config=_quick(breaker_threshold=3))
            await dispatcher.run_until_idle(time_limit=30)

    s.run(setup)
    s.cli(
        "flow/triggers-add",
        "triggers add --scope globex --name invoice --namespace orders --pattern 'orders/*' "
        "--target make_invoice --registered-by svc:billing --park-on target_not_found "
        "--max-event-age 86400 --max-attempts 4",
    )
    s.run(dispatch)
    s.cli("flow/triggers-list", "triggers list")
    s.cli("flow/triggers-list-json", "triggers list --scope globex --json")
    s.cli("flow/status", "status")
    s.cli("flow/parked-list", "parked list")
    s.cli("flow/parked-list-json", "parked list --trigger globex/invoice --limit 1 --json")
    s.cli("flow/unpark-scope-dry", "parked unpark --scope acme --dry-run")
    s.cli("flow/breakers-list", "breakers list")
    s.cli("flow/breakers-list-json", "breakers list --json")
    s.cli("flow/pause-scope", "pause --scope globex --note 'make_invoice is not deployed yet'")
    s.cli(
        "flow/pause-trigger",
        "pause --trigger acme/welcome-email --note 'SMTP relay down, OPS-112'",
    )
    s.cli("flow/pause-all", "pause --all --note 'upgrade to 1.4'")
    s.cli("flow/status-paused", "status")
    s.cli("flow/resume-all", "resume --all")
    s.cli("flow/resume-all-again", "resume --all", code=1)
    s.cli("flow/breakers-reset", "breakers reset acme/crm-sync")
    s.cli("flow/unpark-limit-dry", "parked unpark --trigger acme/crm-sync --limit 2 --dry-run")
    s.cli("flow/unpark-limit", "parked unpark --trigger acme/crm-sync --limit 2")
    s.cli("flow/unpark-rest", "parked unpark --trigger 2")
    s.cli("flow/status-json", "status --json")
    s.cli("flow/error-no-target", "pause", code=2)
    s.cli("flow/error-unknown-trigger", "pause --trigger acme/welcome", code=1)
    s.cli("flow/error-bad-reference", "parked list --trigger welcome-email", code=2)
    s.cli("flow/error-no-breaker", "breakers reset 99", code=1)
    s.psql("flow/lag-view", "SELECT * FROM dispatcher.outbox_lag ORDER BY scope, trigger_name")


def caps(s: Session) -> None:
    """The backlog-cap examples: five rows waiting in `acme`, which is then capped at five."""

    async def setup(conn: asyncpg.Connection) -> None:
        await _register(
            conn, scope="acme", name="welcome-email", namespace="users", key_pattern="users/*",
            target="send_welcome", registered_by="user:7",
        )  # fmt: skip
        await _put(conn, "acme", "users", {f"users/{n}": {"name": f"user {n}"} for n in range(5)})

    s.run(setup)
    s.cli("caps/set", "backlog-caps set acme 5")
    s.cli("caps/set-globex", "backlog-caps set globex 50_000 --recount-interval 5")
    s.psql(
        "caps/refused",
        "SELECT * FROM dispatcher.emit(gen_random_uuid(), 'acme', 'users', 'users/5', 'put', '{}')",
        fails=True,
    )
    s.cli("caps/list", "backlog-caps list")
    s.cli("caps/list-json", "backlog-caps list --json")
    s.cli("caps/remove", "backlog-caps remove globex")
    s.cli("caps/remove-again", "backlog-caps remove globex", code=1)
    s.cli("caps/error-zero", "backlog-caps set acme 0", code=2)


def keys(s: Session) -> None:
    """The blocked-key examples: an ordered trigger whose handler refuses the first version
    of orders/17, so that key is blocked behind it while orders/18 goes on."""

    async def setup(conn: asyncpg.Connection) -> None:
        await _register(
            conn, scope="acme", name="search", namespace="orders", key_pattern="orders/*",
            target="search.index", registered_by="user:7", delivery="latest",
        )  # fmt: skip
        await _put(conn, "acme", "orders", {"orders/17": {"total": 7}, "orders/18": {"total": 8}})
        await _put(conn, "acme", "orders", {"orders/17": {"total": 9}})
        await _put(conn, "acme", "orders", {"orders/17": {"total": 11}})
        handlers = HandlerRegistry()

        @handlers.handler("crm.sync")
        async def sync(ctx: HandlerContext) -> None:
            if ctx.event["key"] == "orders/17" and ctx.event["seq"] == 1:
                raise PermanentError("crm rejected order 17: unknown customer")

        @handlers.handler("search.index")
        async def index(ctx: HandlerContext) -> None:
            return None

        await Dispatcher(s.dsn, handlers, config=_quick()).run_until_idle()

    s.cli(
        "keys/triggers-add",
        "triggers add --scope acme --name crm-sync --namespace orders --pattern 'orders/*' "
        "--target crm.sync --registered-by user:7 --ordering key",
    )
    s.run(setup)
    s.cli("keys/triggers-list", "triggers list")
    s.cli("keys/blocked", "keys blocked")
    s.cli("keys/blocked-json", "keys blocked --trigger acme/crm-sync --json")
    s.cli("keys/unblock-missing", "keys unblock --trigger acme/crm-sync --key orders/18", code=1)
    s.cli("keys/unblock", "keys unblock --trigger acme/crm-sync --key orders/17")
    s.cli("keys/blocked-after", "keys blocked")


def capture(s: Session) -> None:
    """The table-capture examples: two host tables captured, written through psql, the
    outbox rows the writes left, then the listing and the errors."""

    async def setup(conn: asyncpg.Connection) -> None:
        await conn.execute(
            "CREATE TABLE accounts (id integer PRIMARY KEY, tenant_id text, plan text, prefs jsonb)"
        )
        await conn.execute(
            "CREATE TABLE orders (region text, number integer, total numeric,"
            " PRIMARY KEY (region, number))"
        )
        await conn.execute("CREATE VIEW plans AS SELECT id, plan FROM accounts")
        for namespace in ("accounts", "orders"):
            await _register(
                conn, scope="acme", name=f"sync-{namespace}", namespace=namespace,
                key_pattern="*", target="crm_upsert", registered_by="svc:crm",
            )  # fmt: skip

    s.run(setup)
    s.cli(
        "capture/add", "capture add public.accounts --namespace accounts --scope-column tenant_id"
    )
    s.cli("capture/add-orders", "capture add orders --namespace orders --scope acme")
    s.cli("capture/add-again", "capture add orders --namespace orders --scope acme")
    s.cli(
        "capture/add-update",
        "capture add orders --namespace orders --scope acme --key region --key number "
        "--key-prefix order:",
    )
    for statement in (
        "INSERT INTO accounts VALUES (42, 'acme', 'free', jsonb_build_object('lang', 'fr'))",
        "UPDATE accounts SET plan = 'pro' WHERE id = 42",
        "INSERT INTO orders VALUES ('eu', 1001, 120.50)",
        "UPDATE orders SET number = 1002 WHERE number = 1001",
        "DELETE FROM accounts WHERE id = 42",
    ):
        s.psql("capture/writes", statement)
    s.psql(
        "capture/outbox",
        "SELECT scope, payload->>'op' AS op, payload->>'key' AS key, payload->'value' AS value,"
        " payload->'old' AS old FROM dispatcher.outbox ORDER BY id",
    )
    s.psql("capture/refused", "INSERT INTO accounts (id, plan) VALUES (7, 'pro')", fails=True)
    s.cli("capture/list", "capture list")
    s.cli("capture/list-json", "capture list --json")
    s.cli("capture/remove", "capture remove orders")
    s.cli("capture/remove-again", "capture remove orders", code=1)
    s.cli("capture/error-scope", "capture add accounts --namespace accounts", code=2)
    s.cli("capture/error-view", "capture add plans --namespace plans --scope acme", code=1)
    s.cli(
        "capture/error-type",
        "capture add accounts --namespace accounts --scope acme --key prefs",
        code=1,
    )


def redaction(s: Session, tmp: Path) -> None:
    """``dispatcher run --redact-key`` in a process of its own, stopped by SIGTERM once the
    event is dead-lettered."""
    (tmp / "billing_jobs.py").write_text(BILLING_JOBS)

    async def setup(conn: asyncpg.Connection) -> None:
        await _register(
            conn, scope="acme", name="charge", namespace="customers",
            key_pattern="customers/*", target="charge", registered_by="svc:billing",
            retry=RetryPolicy(max_attempts=1),
        )  # fmt: skip
        ann = {
            "name": "Ann",
            "customer_ssn": "123-45-6789",
            "card": {"api_token": "tok_live_9f8e7d"},
        }
        await _put(conn, "acme", "customers", {"customers/ann": ann})

    s.run(setup)
    command = "run --handlers billing_jobs:handlers --redact-key ssn"
    env = {**os.environ, "DATABASE_URL": s.dsn, "PYTHONPATH": str(tmp)}
    for name in ("DISPATCHER_SCHEMA", "DISPATCHER_LOG_LEVEL"):
        env.pop(name, None)
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", *shlex.split(command)],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    async def dead_lettered(conn: asyncpg.Connection) -> None:
        # Another process writes it: there is no event to wait on, so poll.
        for _ in range(600):
            if process.poll() is not None:
                return  # it stopped by itself; its output says why
            if await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters"):
                return
            await anyio.sleep(0.1)
        raise SystemExit("`dispatcher run` dead-lettered nothing within 60 s")

    try:
        s.run(dead_lettered)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    if process.returncode != 0 or "SIGTERM" not in output:
        raise SystemExit(f"`dispatcher {command}` exited {process.returncode}:\n{output}")
    s.record("redaction/run", ["dispatcher", *shlex.split(command)], output)
    s.cli("redaction/run", "dead-letters show 1", keep=_errors_onwards)


def _errors_onwards(output: str) -> str:
    """The error history and the payload of ``dead-letters show``, the rest elided."""
    lines = output.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("Errors ("))
    return "\n".join(["…", *lines[start:]])


SCENARIOS: dict[str, Callable[[Session, Path], None]] = {
    "letters": lambda s, _tmp: letters(s),
    "flow": lambda s, _tmp: flow(s),
    "caps": lambda s, _tmp: caps(s),
    "keys": lambda s, _tmp: keys(s),
    "capture": lambda s, _tmp: capture(s),
    "redaction": redaction,
}


# --- the doc ---


def generate(server_dsn: str) -> dict[str, str]:
    """Every scenario's blocks, by region key."""
    blocks: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="dispatcher-docs-") as tmp_dir:
        tmp = Path(tmp_dir)
        for name, scenario in SCENARIOS.items():
            with _database(server_dsn, name) as dsn:
                scenario(Session(dsn, blocks, make_scrub([dsn, server_dsn], tmp)), tmp)
    return {key: "\n".join(lines) for key, lines in blocks.items()}


@contextlib.contextmanager
def _database(server_dsn: str, name: str) -> Iterator[str]:
    db = f"dispatcher_docs_{name}_{uuid.uuid4().hex[:8]}"
    anyio.run(_execute, server_dsn, f'CREATE DATABASE "{db}"')
    try:
        dsn = with_database(server_dsn, db)
        anyio.run(migrate, dsn)
        yield dsn
    finally:
        anyio.run(_execute, server_dsn, f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


async def _execute(dsn: str, statement: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


def splice(doc: str, blocks: dict[str, str]) -> str:
    """``doc`` with each region's body replaced by its block; every key used exactly once."""
    keys = [m["key"] for m in REGION.finditer(doc)]
    problems = [
        f"{what}: {', '.join(sorted(found))}"
        for what, found in (
            ("regions used twice", {k for k in keys if keys.count(k) > 1}),
            ("regions no scenario writes", set(keys) - set(blocks)),
            ("blocks with no region in the doc", set(blocks) - set(keys)),
        )
        if found
    ]
    if problems:
        raise SystemExit(f"docs/cli.md and {COMMAND} disagree: " + "; ".join(problems))
    return REGION.sub(lambda m: f"{m[1]}```console\n{blocks[m['key']]}\n```\n{m[4]}", doc)


# What differs from one run to the next, masked for --check; widths are ignored.
_VOLATILE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"), "<uuid>"),
    (re.compile(r"\b[0-9a-f]{32}\b"), "<hex>"),  # an abandoned call's reply_to
    (
        re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d(?::\d\d)?)?"),
        "<time>",
    ),
    (re.compile(r"\b\d+\.\d{3,}\b"), "<seconds>"),  # ages measured (--json, psql)
    (re.compile(r"\b\d+\.\ds\b"), "<seconds>"),  # status: oldest due
    (re.compile(r"\bline \d+\b"), "line <n>"),
    (re.compile(r"─+"), "─"),
    (re.compile(r"-{3,}"), "---"),
    (re.compile(r"[ \t]+"), " "),
]


def masked(text: str) -> str:
    for pattern, replacement in _VOLATILE:
        text = pattern.sub(replacement, text)
    return text


def run(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Regenerate the examples of docs/cli.md.")
    parser.add_argument(
        "--dsn",
        default=os.environ.get("DISPATCHER_TEST_DSN"),
        help="a Postgres server to create throw-away databases on (default: "
        "$DISPATCHER_TEST_DSN, else a Docker container, else the embedded server)",
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if docs/cli.md is out of date; write nothing"
    )
    args = parser.parse_args(argv)
    # The dispatchers' warnings (rows dead-lettered, on purpose) are not news here; and a
    # handler configured now keeps `dispatcher`'s own basicConfig from binding the captured
    # stderr of the first command it runs.
    logging.basicConfig(level=logging.ERROR)

    with contextlib.ExitStack() as stack:
        if args.dsn:
            server = args.dsn
        else:
            provided: ProvidedPostgres = stack.enter_context(
                provide_postgres("DISPATCHER_TEST_DSN")
            )
            server = provided.dsn
        blocks = generate(server)

    current = DOC.read_text()
    fresh = splice(current, blocks)
    leaked = sorted(set(re.findall(r'File "/[^"]*"', fresh)))
    if leaked:
        raise SystemExit(f"machine paths left in the examples: {leaked}")
    if args.check:
        if masked(fresh) == masked(current):
            print("docs/cli.md is up to date")
            return 0
        diff = difflib.unified_diff(
            masked(current).splitlines(), masked(fresh).splitlines(), "docs/cli.md", "generated",
            lineterm="", n=1,
        )  # fmt: skip
        print("\n".join(diff))
        print(f"docs/cli.md is out of date: run `{COMMAND}`", file=sys.stderr)
        return 1
    if masked(fresh) == masked(current):
        # Only ids and times would change: keep the file (and the diff) as it is.
        print("docs/cli.md is up to date: left as it is")
        return 0
    DOC.write_text(fresh)
    print(f"docs/cli.md: {len(blocks)} examples written")
    return 0


if __name__ == "__main__":
    sys.exit(run())
