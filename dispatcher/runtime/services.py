"""The dispatcher's side loops: the LISTEN connection for wake-up hints, the backlog
sampler for metrics, the counts of capped backlogs, and the expiry of what the library keeps
for a while."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from functools import partial

import anyio
import asyncpg

from dispatcher.core.policy import RandomSource
from dispatcher.runtime.config import DispatcherConfig
from dispatcher.runtime.connections import DB_ERRORS, jittered, session_settings
from dispatcher.runtime.signals import Signals
from dispatcher.runtime.stats import Recorder, Stats
from dispatcher.sql import Sql


async def listen(
    dsn: str,
    sql: Sql,
    config: DispatcherConfig,
    signals: Signals,
    hinted: Callable[[], None],
    rng: RandomSource,
) -> None:
    """Keep a LISTEN connection open; call ``hinted`` for each wake-up hint."""
    delay = config.reconnect_min
    while True:
        conn: asyncpg.Connection | None = None
        try:
            conn = await asyncpg.connect(
                dsn, server_settings=session_settings(f"{config.application_name}:listen")
            )
            lost = anyio.Event()
            conn.add_termination_listener(partial(_set_event, lost))
            await conn.add_listener(sql.channel, lambda *_: hinted())
            delay = config.reconnect_min
            signals.wake_poller()  # catch up on anything sent while we were not listening
            await lost.wait()
        except DB_ERRORS:
            await signals.sleep_or_stop(jittered(delay, rng, config.reconnect_max))
            delay = min(delay * 2, config.reconnect_max)
        finally:
            if conn is not None:
                conn.terminate()


async def sample_backlog(
    pool: asyncpg.Pool, sql: Sql, config: DispatcherConfig, recorder: Recorder
) -> None:
    while True:
        try:
            row = await pool.fetchrow(sql.backlog_sample, 100_000)
        except DB_ERRORS:
            pass  # the poll loop reports database trouble; a missed sample is harmless
        else:
            assert row is not None
            recorder.backlog(int(row["due"]), float(row["oldest_due_seconds"]))
            recorder.blocked_keys(int(row["blocked_keys"]))
        await anyio.sleep(config.backlog_interval)


# How often a dispatcher that claimed or settled rows counts the capped backlogs that are
# due (seconds).
BACKLOG_RECOUNT_EVERY = 1.0


async def count_capped_backlogs(pool: asyncpg.Pool, sql: Sql, stats: Stats) -> None:
    """Count again the backlogs of capped scopes whose count is due (each cap's own
    ``recount_interval``), within a second of this dispatcher claiming or settling rows.

    An emit refused for a full scope counts nothing (its transaction is aborted, a count
    with it), so a full scope's count goes down here, as the dispatchers drain it. An idle
    dispatcher sends nothing: only ``claims`` moves then (a claim that found no row).
    """
    seen = _work_done(stats)
    while True:
        await anyio.sleep(BACKLOG_RECOUNT_EVERY)
        now = _work_done(stats)
        if now == seen:
            continue
        with contextlib.suppress(*DB_ERRORS):  # the poll loop reports database trouble
            await pool.execute(sql.recount_backlog_caps)
            seen = now


def _work_done(stats: Stats) -> dict[str, int]:
    counters = stats.as_dict()
    del counters["claims"]
    return counters


async def housekeeping(pool: asyncpg.Pool, sql: Sql, config: DispatcherConfig) -> None:
    """Expire what the library keeps for a while: per-root budgets, depth cutoffs."""
    budgets = config.max_executions_per_root is not None
    every = min(config.depth_cutoff_retention, 600.0)
    if budgets:
        every = min(every, config.root_budget_ttl)
    while True:
        with contextlib.suppress(*DB_ERRORS):
            if budgets:
                await pool.execute(sql.root_budget_expire, config.root_budget_ttl)
            await pool.execute(sql.depth_cutoffs_expire, config.depth_cutoff_retention)
        await anyio.sleep(every)


def _set_event(event: anyio.Event, *_: object) -> None:
    event.set()
