"""Several dead-letter handlers for one dead letter (issue 12, item 6): each handler's outcome
is recorded on the letter, any failure leaves it ``handler_failed`` whatever the order in
which the handlers finish, and ``dead-letters show`` lists them.

The order is forced with a pause: the handler trigger meant to run second is paused while
the first runs, then resumed.
"""

from __future__ import annotations

import asyncpg
import pytest
from cli_run import ok, ok_json
from dead_letter_seed import add_trigger

from dispatcher import (
    Admin,
    Dispatcher,
    DispatcherConfig,
    FlowControl,
    HandlerContext,
    HandlerRegistry,
    Mutation,
    Op,
    PermanentError,
    Resolution,
    RetryPolicy,
    emit_many,
)

pytestmark = pytest.mark.anyio

# Breakers are exercised elsewhere; here a failing handler must not pause its trigger.
CONFIG = DispatcherConfig(poll_interval=0.05, grace_period=5, breaker_threshold=0)
FAST = RetryPolicy(base_delay=0, max_delay=0, jitter=0, max_attempts=3)


def handler_registry() -> HandlerRegistry:
    handlers = HandlerRegistry()

    @handlers.handler("broken")
    async def broken(ctx: HandlerContext) -> None:
        raise PermanentError("upstream rejected the event")

    @handlers.handler("archive")
    async def archive(ctx: HandlerContext) -> None:
        return None

    @handlers.handler("page_oncall")
    async def page_oncall(ctx: HandlerContext) -> None:
        raise RuntimeError("pager service down")

    return handlers


async def setup(conn: asyncpg.Connection) -> dict[str, int]:
    return {
        "broken": await add_trigger(conn, "broken", target="broken", retry=FAST),
        "archive": await add_trigger(
            conn, "archive", target="archive", retry=FAST, is_dead_letter_handler=True
        ),
        "page": await add_trigger(
            conn, "page-oncall", target="page_oncall", retry=FAST, is_dead_letter_handler=True
        ),
    }


async def dead_letter_state(conn: asyncpg.Connection) -> asyncpg.Record:
    [row] = await conn.fetch("SELECT id, resolution, resolution_note FROM dispatcher.dead_letters")
    return row


async def run_in_order(dsn: str, conn: asyncpg.Connection, first: str, second: str) -> int:
    """Dead-letter one event, let handler trigger ``first`` settle, then ``second``; the
    dead letter's id."""
    ids = await setup(conn)
    flow = FlowControl()
    await flow.pause(conn, trigger_id=ids[second], note="runs second")
    await emit_many(conn, [Mutation("acme", "users", "users/1", Op.PUT, {})], autocommit=True)
    handlers = handler_registry()
    await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle()
    after_first = await dead_letter_state(conn)
    assert after_first["resolution"] == ("handled" if first == "archive" else "handler_failed")
    await flow.resume(conn, trigger_id=ids[second])
    await Dispatcher(dsn, handlers, config=CONFIG).run_until_idle(include_scheduled=True)
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    return int(after_first["id"])


EXPECTED = {
    "archive": ("archive", Resolution.HANDLED, None),
    "page": ("page-oncall", Resolution.HANDLER_FAILED, "handler_error: RuntimeError"),
}


@pytest.mark.parametrize(("first", "second"), [("archive", "page"), ("page", "archive")])
async def test_a_failure_wins_whatever_the_order(
    dsn: str, conn: asyncpg.Connection, first: str, second: str
) -> None:
    letter = await run_in_order(dsn, conn, first, second)
    state = await dead_letter_state(conn)
    assert state["resolution"] == "handler_failed"
    assert "pager service down" in state["resolution_note"]

    detail = await Admin().show_dead_letter(conn, letter)
    assert detail.resolution is Resolution.HANDLER_FAILED
    seen = [(h.trigger, h.outcome, h.error) for h in detail.handler_outcomes]
    assert [(t, o) for t, o, _ in seen] == [EXPECTED[k][:2] for k in (first, second)]
    errors = {t: e for t, _, e in seen}
    assert errors["archive"] is None
    assert errors["page-oncall"] is not None
    assert errors["page-oncall"].startswith(str(EXPECTED["page"][2]))
    assert "pager service down" in errors["page-oncall"]
    trigger_ids = {h.trigger: h.trigger_id for h in detail.handler_outcomes}
    names = await conn.fetch("SELECT id, name FROM dispatcher.triggers")
    assert trigger_ids == {n: i for i, n in names if n != "broken"}
    assert all(h.at is not None for h in detail.handler_outcomes)


async def test_a_later_success_keeps_the_failure_and_its_note(
    dsn: str, conn: asyncpg.Connection
) -> None:
    letter = await run_in_order(dsn, conn, "page", "archive")
    before = await conn.fetchrow(
        "SELECT resolved_at FROM dispatcher.dead_letters WHERE id = $1", letter
    )
    detail = await Admin().show_dead_letter(conn, letter)
    # The failure's moment stays the resolution's: the success changed nothing but the list.
    assert detail.resolved_at == before["resolved_at"]
    assert detail.handler_outcomes[0].at is not None
    assert detail.resolved_at is not None
    assert detail.resolved_at <= detail.handler_outcomes[1].at  # type: ignore[operator]
    assert detail.resolution_note is not None
    assert "pager service down" in detail.resolution_note


async def test_two_handlers_settled_together_are_both_recorded(
    dsn: str, conn: asyncpg.Connection
) -> None:
    await setup(conn)
    await emit_many(conn, [Mutation("acme", "users", "users/1", Op.PUT, {})], autocommit=True)
    await Dispatcher(dsn, handler_registry(), config=CONFIG).run_until_idle(include_scheduled=True)
    state = await dead_letter_state(conn)
    assert state["resolution"] == "handler_failed"
    detail = await Admin().show_dead_letter(conn, state["id"])
    assert sorted((h.trigger or "", h.outcome) for h in detail.handler_outcomes) == [
        ("archive", Resolution.HANDLED),
        ("page-oncall", Resolution.HANDLER_FAILED),
    ]


async def test_dead_letters_show_lists_every_handler(dsn: str, conn: asyncpg.Connection) -> None:
    letter = await run_in_order(dsn, conn, "archive", "page")
    text = (await ok("dead-letters", "show", "--dsn", dsn, str(letter))).stdout
    assert "Handlers (2)" in text
    lines = text.splitlines()
    archive = next(line for line in lines if line.lstrip().startswith("archive "))
    page = next(line for line in lines if line.lstrip().startswith("page-oncall "))
    assert " handled " in archive
    assert " handler_failed " in page
    assert "pager service down" in page
    assert lines.index(archive) < lines.index(page)
    shown = await ok_json("dead-letters", "show", "--dsn", dsn, str(letter))
    assert shown["resolution"] == "handler_failed"
    assert [(h["trigger"], h["outcome"]) for h in shown["handler_outcomes"]] == [
        ("archive", "handled"),
        ("page-oncall", "handler_failed"),
    ]
