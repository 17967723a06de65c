"""The dispatcher's connections: the pool, the poller's and the settler's kept connections,
and the reconnect backoff (jittered) with its one log line per state change."""

from __future__ import annotations

import contextlib
import logging
from datetime import UTC, datetime, timedelta
from typing import TypeAlias

import anyio
import asyncpg
from asyncpg.pool import PoolConnectionProxy

from dispatcher.core.policy import RandomSource
from dispatcher.core.sanitize import describe_exception
from dispatcher.runtime.config import DispatcherConfig
from dispatcher.runtime.signals import Signals
from dispatcher.runtime.stats import Phase, Stats

log = logging.getLogger("dispatcher")

PoolConnection: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"

# Failures of the database or the connection to it: never a handler failure, never an
# attempt consumed; the loop backs off and reconnects.
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # What asyncpg raises when the server ends a connection mid-statement and the next
    # statement finds the protocol still busy ("cannot switch to state …").
    asyncpg.InternalClientError,
)


# Each backoff sleeps its delay times a factor drawn from [1 - JITTER, 1 + JITTER): the
# processes an outage (or a shared bug) stopped together do not all come back at once.
JITTER = 0.5


def jittered(delay: float, rng: RandomSource, ceiling: float) -> float:
    """``delay`` give or take ``JITTER`` of it, at most ``ceiling``.

    >>> 0.5 <= jittered(1.0, random.Random(), 5.0) < 1.5
    True
    """
    return min(delay * (1.0 - JITTER + 2.0 * JITTER * rng.random()), ceiling)


def session_settings(application_name: str) -> dict[str, str]:
    """Server settings of every session the dispatcher opens."""
    # JIT compiling a claim costs far more than running it (hundreds of ms against a
    # millisecond), and the planner's cost estimates for tiny control tables can cross
    # jit_above_cost: keep it off for the dispatcher's own sessions.
    #
    # synchronous_commit=off for the dispatcher's own writes (claims, settlements,
    # handler KV writes): a server crash can lose only the last ~200 ms of them, always
    # a suffix in commit order, and losing any of them only makes a row run again,
    # which at-least-once delivery allows. What is told to someone (a sync reply, a dead
    # letter) is committed synchronously all the same (settle.py). Producers' emits keep
    # the server's setting: they commit in the host's transaction, on the host's connection.
    return {
        "application_name": application_name,
        "jit": "off",
        "synchronous_commit": "off",
    }


class Connections:
    """The pool, two kept connections, and the health of the database as the loops see it."""

    def __init__(
        self,
        dsn: str,
        config: DispatcherConfig,
        signals: Signals,
        stats: Stats,
        rng: RandomSource,
    ) -> None:
        self.dsn = dsn
        self._config = config
        self._rng = rng
        self._signals = signals
        self._stats = stats
        self.pool: asyncpg.Pool | None = None
        self._claim: PoolConnection | None = None
        self._settle: PoolConnection | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self.backoff_until: datetime | None = None

    async def open_pool(self) -> asyncpg.Pool | None:
        """Connect, retrying with backoff until it works or a stop begins (then None)."""
        cfg = self._config
        delay = cfg.reconnect_min
        while not self._signals.stopping:
            try:
                self.pool = await asyncpg.create_pool(
                    self.dsn,
                    min_size=2,
                    # pool_size for handler writes, sync calls and sampling, plus the
                    # poller's and the settler's own connections.
                    max_size=cfg.pool_size + 2,
                    server_settings=session_settings(cfg.application_name),
                )
                self.ok()
                return self.pool
            except DB_ERRORS as exc:
                delay = await self.failed(exc, delay)
        return None

    async def close(self, *, terminate: bool) -> None:
        """Close the pool (``terminate``: at once, without waiting for what uses it)."""
        await self.drop_kept()
        pool, self.pool = self.pool, None
        if pool is None:
            return
        if terminate:
            pool.terminate()
        else:
            # Cut short, asyncpg's close terminates what is left.
            with anyio.move_on_after(self._config.abandon_after):
                await pool.close()

    def ok(self) -> None:
        if self.consecutive_failures:
            log.warning(
                "database reachable again",
                extra={"event": "dispatcher.db_recovered", "failures": self.consecutive_failures},
            )
        self.consecutive_failures = 0
        self.backoff_until = None

    async def failed(self, exc: BaseException, delay: float) -> float:
        """Record a database error, sleep ``delay`` give or take :data:`JITTER` (or until a
        stop), return the next delay."""
        self._stats.db_errors += 1
        self.last_error = describe_exception(exc, limit=500)
        if self.consecutive_failures == 0:
            log.error(
                "database unavailable; backing off: %s",
                self.last_error,
                extra={"event": "dispatcher.db_unavailable", "error": self.last_error},
            )
        self.consecutive_failures += 1
        self._signals.phase = Phase.BACKOFF
        wait = jittered(delay, self._rng, self._config.reconnect_max)
        self.backoff_until = datetime.now(UTC) + timedelta(seconds=wait)
        await self._signals.sleep_or_stop(wait)
        return min(delay * 2, self._config.reconnect_max)

    # The poller and the settler each keep one connection from the pool for as long as it
    # works: acquiring per statement would add the pool's reset query to every round trip.
    async def for_claims(self) -> PoolConnection:
        if self._claim is not None and _closed(self._claim):
            await self._drop("_claim")
        if self._claim is None:
            assert self.pool is not None
            self._claim = await self.pool.acquire()
        return self._claim

    async def for_settlements(self) -> PoolConnection:
        if self._settle is not None and _closed(self._settle):
            await self._drop("_settle")
        if self._settle is None:
            assert self.pool is not None
            self._settle = await self.pool.acquire()
        return self._settle

    async def drop_kept(self) -> None:
        # One outage breaks both kept connections: replace both, so the second loop does
        # not report the same outage again when it next uses its dead one.
        await self._drop("_claim")
        await self._drop("_settle")

    async def _drop(self, name: str) -> None:
        conn: PoolConnection | None = getattr(self, name)
        setattr(self, name, None)
        if conn is None or self.pool is None:
            return
        # After a database error the protocol may be wedged mid-statement: close it hard
        # rather than let the pool try to reset it.
        with contextlib.suppress(Exception):
            conn.terminate()
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            await self.pool.release(conn, timeout=5)


def _closed(conn: PoolConnection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:  # a proxy the pool already took back
        return True
