"""Scenario 10 — secrets in dead letters.

Canary values under ``password``, ``authorization`` and ``api_key`` (nested, in lists, in
other spellings of the keys, and inside exception messages), under names that contain a
sensitive one (``db_password``, ``token``, ``x-api-key``, ``client_secret``) and as the
password of a URL never reach ``dead_letters``, ``abandoned_executions`` or the logs, on the
real write path: the dispatcher subprocess with its default redaction, and an in-process
dispatcher configured with ``DispatcherConfig(redact_keys=("password", "authorization",
"api_key"))`` whose sync calls are abandoned.
"""

from __future__ import annotations

import json
import logging
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import anyio
import pytest

from dispatcher import (
    Dispatcher,
    DispatcherConfig,
    InvokeTimeout,
    JsonValue,
    Mutation,
    Op,
    RetryPolicy,
)
from tests.chaos.handlers import build_registry
from tests.chaos.harness import Harness, expected_pairs, record, sizes, wait_until
from tests.chaos.ledger import Ledger

pytestmark = pytest.mark.anyio


def _payload(canary: str, **extra: JsonValue) -> dict[str, JsonValue]:
    return {
        "password": canary,
        "user": {"name": "ann", "Authorization": f"Bearer {canary}"},
        "keys": [{"api_key": canary}, {"API-KEY": canary}],
        "note": f"api_key={canary}",
        # Names that only contain a sensitive name, and a password inside a URL.
        "db_password": canary,
        "session": {"token": canary, "x-api-key": [canary]},
        "clients": [{"client_secret": {"value": canary}}],
        "dsn": f"postgresql://app:{canary}@db/app",
        **extra,
    }


async def _stored_text(chaos: Harness) -> str:
    """Everything the dispatcher keeps for operators, as text."""
    rows = await chaos.fetch(
        """SELECT row_to_json(d)::text FROM dispatcher.dead_letters d
           UNION ALL SELECT row_to_json(a)::text FROM dispatcher.abandoned_executions a"""
    )
    return "\n".join(r[0] for r in rows)


@dataclass(frozen=True)
class Size:
    rows: int


@sizes(Size(5), Size(200))
async def test_canaries_never_reach_dead_letters_or_logs(chaos: Harness, size: Size) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    vault = await chaos.trigger(
        "vault",
        "secret",
        namespace="vault",
        retry=RetryPolicy(base_delay=0, max_delay=0, max_attempts=2),
    )
    await chaos.trigger("on-dead", "dlh", namespace="vault", is_dead_letter_handler=True)
    rows = [Mutation("acme", "vault", f"v/{i}", Op.PUT, _payload(canary)) for i in range(size.rows)]
    proc = chaos.spawn("chaos-secrets", breaker_threshold=0)  # default redaction
    await chaos.wait_ready(proc)
    await chaos.emit(rows)
    await chaos.wait_drained(within=120, watch=[proc])
    chaos.signal(proc, signal.SIGTERM)
    assert await chaos.wait_exit(proc, within=15) == 0

    report = await chaos.check(expected_pairs([vault], rows))
    report.assert_ok(max_duplicates=0)
    stored = await _stored_text(chaos)
    logs = proc.log_path.read_text() + proc.stderr()
    dead = await chaos.fetch("SELECT payload, errors, resolution FROM dispatcher.dead_letters")
    record(
        "10-secrets-dead-letters",
        size="long" if size.rows > 5 else "short",
        dead_letters=len(dead),
        canary_in_tables=stored.count(canary),
        canary_in_logs=logs.count(canary),
    )
    assert len(dead) == size.rows
    assert {d["resolution"] for d in dead} == {"handled"}
    assert canary not in stored
    assert canary not in logs
    # Redacted, not dropped: the rest of the payload and of the error is still there.
    payload = json.loads(dead[0]["payload"])
    assert payload["value"]["user"]["name"] == "ann"
    assert "login failed" in json.loads(dead[0]["errors"])[-1]["message"]


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.dumps(vars(record), default=repr))


@pytest.fixture
def captured_logs() -> Iterator[_Capture]:
    capture = _Capture()
    logger = logging.getLogger("dispatcher")
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)


async def test_canaries_never_reach_abandoned_executions(
    chaos: Harness, dsn: str, captured_logs: _Capture
) -> None:
    canary = f"canary-{uuid.uuid4().hex}"
    sync = await chaos.trigger("vault", "secret", namespace="vault", execution_timeout=5)
    ledger = Ledger(dsn)
    config = DispatcherConfig(
        poll_interval=0.05, redact_keys=("password", "authorization", "api_key")
    )
    d = Dispatcher(dsn, build_registry(ledger), config=config)
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(d.run)
            for mode in ("reply", "fail"):
                with pytest.raises(InvokeTimeout):
                    await d.invoke(sync.id, _payload(canary, mode=mode, ms=500), time_limit=0.1)

            async def abandoned() -> bool:
                n: int = await chaos.fetchval(
                    "SELECT count(*) FROM dispatcher.abandoned_executions"
                )
                return n == 2

            await wait_until(abandoned, within=10, what="both calls to be recorded as abandoned")
            d.stop()
    finally:
        await ledger.close()
    rows = await chaos.fetch(
        "SELECT outcome, result, error FROM dispatcher.abandoned_executions ORDER BY outcome"
    )
    stored = await _stored_text(chaos)
    logs = "\n".join(captured_logs.lines)
    record(
        "10-secrets-abandoned",
        abandoned=len(rows),
        canary_in_tables=stored.count(canary),
        canary_in_logs=logs.count(canary),
    )
    assert [r["outcome"] for r in rows] == ["failure", "success"]
    assert canary not in stored
    assert canary not in logs
    result = json.loads(rows[1]["result"])
    assert result["ok"] is True
    assert "login failed" in rows[0]["error"]
