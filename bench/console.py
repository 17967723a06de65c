"""The console's dead-letter list over a big table: ``python -m bench.console``.

    python -m bench.console --dsn postgresql://postgres@127.0.0.1:5432/postgres
    python -m bench.console --rows 10000          # a quick run

Creates a database of its own on the server (``--dsn``: one where it may create and drop
databases; dropped at the end unless ``--keep``), migrates it, writes ``--rows`` dead letters
(default 1,000,000) over 20 scopes and 200 triggers, dead-lettered over 90 days, 22% still
needing action (open or handler_failed), the rest resolved, and runs ANALYZE. Then it times
each query of the list as the console runs it (``Admin.dead_letter_page`` on a connection
configured as the console's pool configures it), ``--repeat`` times each, and the whole page
over HTTP (the console's ASGI app, through httpx: the page rendered; the live counts it
loads after itself, and polls, timed apart).
It prints the median and the 95th percentile of each, in milliseconds, and the target
(300 ms). Not part of the test suite.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta

import anyio
import asyncpg
import httpx

from dispatcher.admin import Admin, DeadLetterFilter, PageCursor
from dispatcher.console import ConsoleSettings, create_app
from dispatcher.migrate import migrate
from dispatcher.postgres import with_database

TARGET_MS = 300.0
SCOPES = 20
TRIGGERS_PER_SCOPE = 10

# Every row in one statement: ids ascend with dead_lettered_at, as the runtime writes them.
# One row in a thousand carries a rare token in its last error (the rare text search).
SEED = """
INSERT INTO dispatcher.dead_letters (outbox_id, event_id, trigger_id, scope, trigger_name,
    target, registered_by, payload, policy, depth, attempts, reason, errors, resolution,
    event_created_at, dead_lettered_at, resolved_at)
SELECT g, gen_random_uuid(), 1 + g % $2, 'scope' || (g % $2) % $3,
    'trigger' || g % $2, 'run', 'user:7',
    jsonb_build_object('key', 'orders/' || g, 'op', 'put',
        'value', jsonb_build_object('status', 'paid', 'n', g)),
    '{"kind": "exponential", "base_delay": 1, "factor": 2, "max_delay": 60, "jitter": 0.1,
      "max_attempts": 3, "max_event_age": null, "timeout": 10}'::jsonb,
    0, 3,
    (ARRAY['handler_error', 'timeout', 'permanent', 'target_not_found', 'expired'])[1 + g % 5],
    jsonb_build_array(
        jsonb_build_object('attempt', 1, 'kind', 'handler_error',
            'message', 'ValueError: card declined #' || g),
        jsonb_build_object('attempt', 2, 'kind', 'handler_error',
            'message', CASE WHEN g % 1000 = 7 THEN 'needle ' || g ELSE 'smtp refused' END)),
    CASE WHEN g % 50 < 10 THEN 'open' WHEN g % 50 = 10 THEN 'handler_failed'
         WHEN g % 50 < 30 THEN 'handled' WHEN g % 50 < 40 THEN 'replayed'
         ELSE 'discarded' END,
    now() - interval '90 days' + (g::float8 / $1) * interval '90 days' - interval '1 minute',
    now() - interval '90 days' + (g::float8 / $1) * interval '90 days',
    CASE WHEN g % 50 > 10 THEN now() END
FROM generate_series(1, $1) AS g
"""


async def _exec(dsn: str, sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _time(fn: Callable[[], Awaitable[object]], repeat: int) -> tuple[float, float]:
    await fn()  # warm: the statement prepared, the pages cached
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        await fn()
        samples.append((time.perf_counter() - start) * 1000)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(0.95 * len(samples)))]


async def bench(dsn: str, rows: int, repeat: int, keep: bool, reuse: str | None) -> None:
    name = reuse or f"dispatcher_bench_console_{uuid.uuid4().hex[:8]}"
    if reuse is None:
        await _exec(dsn, f'CREATE DATABASE "{name}"')
    db = with_database(dsn, name)
    try:
        await migrate(db)
        conn = await asyncpg.connect(db, server_settings={"plan_cache_mode": "force_custom_plan"})
        try:
            if reuse is None:
                start = time.perf_counter()
                await conn.execute(SEED, rows, SCOPES * TRIGGERS_PER_SCOPE, SCOPES)
                await conn.execute("VACUUM ANALYZE dispatcher.dead_letters")
                print(f"seeded {rows:,} dead letters in {time.perf_counter() - start:.1f}s")
            count = await conn.fetchval("SELECT count(*) FROM dispatcher.dead_letters")
            print(f"{count:,} dead letters in {name}")
            await _report(conn, db, repeat)
        finally:
            await conn.close()
    finally:
        if keep or reuse is not None:
            print(f"kept the database {name}")
        else:
            await _exec(dsn, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _report(conn: asyncpg.Connection, db: str, repeat: int) -> None:
    admin = Admin()
    deep = await admin.dead_letter_page(conn, DeadLetterFilter(), limit=5000)
    cursor = deep.next_cursor or PageCursor(deep.letters[-1].dead_lettered_at, 1)
    cases: list[tuple[str, DeadLetterFilter, PageCursor | None]] = [
        ("open (the default page)", DeadLetterFilter(resolution="open"), None),
        ("any resolution", DeadLetterFilter(), None),
        ("any resolution, page after 5,000 rows", DeadLetterFilter(), cursor),
        ("one scope, open", DeadLetterFilter(scope="scope7", resolution="open"), None),
        ("one trigger, any resolution", DeadLetterFilter(trigger_id=42), None),
        ("reason timeout, open", DeadLetterFilter(reason="timeout", resolution="open"), None),
        ("newer than 1d, open", DeadLetterFilter(since=timedelta(days=1), resolution="open"), None),
        ("two scopes (an operator's limit)", DeadLetterFilter(scopes=("scope3", "scope4")), None),
        ("text 'declined' (common)", DeadLetterFilter(text="declined"), None),
        ("text 'needle 7007' (one row: a scan)", DeadLetterFilter(text="needle 7007"), None),
    ]
    print(f"{'query (50 rows a page)':<42} {'median ms':>10} {'p95 ms':>8}")
    for label, f, after in cases:

        async def page(f: DeadLetterFilter = f, after: PageCursor | None = after) -> object:
            return await admin.dead_letter_page(conn, f, after=after, limit=50)

        median, p95 = await _time(page, repeat)
        flag = "" if p95 < TARGET_MS else f"  (over {TARGET_MS:.0f} ms)"
        print(f"{label:<42} {median:>10.1f} {p95:>8.1f}{flag}")

    app = create_app(ConsoleSettings(db))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
        for label, path in (
            ("HTTP GET /dead-letters (the page)", "/dead-letters"),
            ("HTTP GET /dead-letters?scope=scope7", "/dead-letters?scope=scope7"),
            ("HTTP GET /counts (live counts, polled)", "/counts"),
        ):

            async def get(path: str = path) -> object:
                response = await client.get(path)
                response.raise_for_status()
                return response

            median, p95 = await _time(get, repeat)
            flag = "" if p95 < TARGET_MS else f"  (over {TARGET_MS:.0f} ms)"
            print(f"{label:<42} {median:>10.1f} {p95:>8.1f}{flag}")
    await app.state.console.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", metavar="DATABASE", help="measure a database --keep kept")
    args = parser.parse_args()
    anyio.run(bench, args.dsn, args.rows, args.repeat, args.keep, args.reuse)


if __name__ == "__main__":
    main()
