"""Take the screenshots of docs/console.md: the real console, in Chromium, over a database.

    dispatcher demo --keep                       # the demo's triggers, dead letters, ...
    python docs/console/screenshots.py           # adds scope "shop", shoots docs/console/*.png

Postgres: ``--dsn URL`` or ``$DATABASE_URL`` (the demo's database). The script adds a scope
``shop`` (two triggers, a few open dead letters written as the dispatcher writes them, queued
rows, a pause, an open breaker, an ordered trigger with a blocked key) once, serves the
console on a free loopback port, and drives Debian's ``chromium`` (``--chromium PATH`` for
another) through the pages, replaying one dead letter through its preview so that the audit
page has a row.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import threading
import uuid
from pathlib import Path

import anyio
import asyncpg
import uvicorn
from playwright.sync_api import sync_playwright

from dispatcher.console import ConsoleSettings, create_app
from dispatcher.core.models import Mutation, Op, RetryPolicy
from dispatcher.emit import Emitter
from dispatcher.flow import FlowControl
from dispatcher.triggers import TriggerRegistry

HERE = Path(__file__).parent
POLICY = {
    "kind": "exponential",
    "base_delay": 2.0,
    "factor": 2.0,
    "max_delay": 120.0,
    "jitter": 0.1,
    "max_attempts": 5,
    "max_event_age": None,
    "timeout": 30.0,
}
MESSAGES = [
    ("handler_error", "ValueError: card declined (insufficient funds)"),
    ("handler_error", "ValueError: card declined (expired card)"),
    ("timeout", "TimeoutError: payment gateway gave no reply in 10s"),
    ("handler_error", "KeyError: 'currency'"),
    ("timeout", "TimeoutError: payment gateway gave no reply in 10s"),
]


async def seed(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        registry = TriggerRegistry()
        if any(t.scope == "shop" for t in await registry.list(conn)):
            return
        charge = await registry.register(
            conn,
            scope="shop",
            name="charge",
            namespace="orders",
            key_pattern="orders/*",
            target="payments.charge",
            registered_by="user:billing-bot",
            retry=RetryPolicy(max_attempts=5, base_delay=2.0, max_delay=120.0),
            when="changed(status) and new.status == 'paid'",
        )
        await registry.register(
            conn,
            scope="shop",
            name="receipt",
            namespace="orders",
            key_pattern="orders/*",
            target="mail.receipt",
            registered_by="user:billing-bot",
        )
        for n, (reason, message) in enumerate(MESSAGES):
            payload = {
                "event_id": str(uuid.uuid4()),
                "scope": "shop",
                "namespace": "orders",
                "key": f"orders/{1041 + n}",
                "op": "put",
                "value": {"status": "paid", "total": 19.9 + n, "card": "[redacted]"},
                "old": {"status": "new", "total": 19.9 + n, "card": "[redacted]"},
                "depth": 0,
            }
            errors = [
                {"attempt": a, "kind": reason, "message": message, "at": None} for a in range(1, 6)
            ]
            await conn.execute(
                """
                INSERT INTO dispatcher.dead_letters (outbox_id, event_id, trigger_id, scope,
                    trigger_name, target, registered_by, payload, policy, depth, attempts,
                    reason, errors, event_created_at, dead_lettered_at)
                VALUES (0, $1, $2, 'shop', 'charge', 'payments.charge', 'user:billing-bot',
                    $3::jsonb, $4::jsonb, 0, 5, $5, $6::jsonb,
                    clock_timestamp() - make_interval(mins => $7 + 5),
                    clock_timestamp() - make_interval(mins => $7))""",
                uuid.UUID(payload["event_id"]),
                charge.id,
                json.dumps(payload),
                json.dumps(POLICY),
                reason,
                json.dumps(errors),
                90 * n + 7,
            )
        mutations = [
            Mutation("shop", "orders", f"orders/{2000 + n}", Op.PUT, {"status": "new"})
            for n in range(40)
        ]
        await Emitter().emit_many(conn, mutations, autocommit=True)
        await _blocked_key(conn, registry)
        await FlowControl().pause(conn, scope="demo", note="investigating billing errors")
        await conn.execute(
            """INSERT INTO dispatcher.breakers (trigger_id, state, failures, open_until,
                opened_at, opened_count)
            VALUES ($1, 'open', 5, clock_timestamp() + interval '30 seconds',
                clock_timestamp(), 1)""",
            charge.id,
        )
    finally:
        await conn.close()


async def _blocked_key(conn: asyncpg.Connection, registry: TriggerRegistry) -> None:
    """An ordered trigger whose head for customers/77 dead-lettered and blocks the key, two
    rows waiting behind it: written as the dispatcher writes them (the block before the
    head leaves the outbox, so nothing behind it is made due)."""
    sync = await registry.register(
        conn,
        scope="shop",
        name="crm-sync",
        namespace="customers",
        key_pattern="customers/*",
        target="crm.sync",
        registered_by="user:billing-bot",
        ordering="key",
    )
    mutations = [
        Mutation("shop", "customers", "customers/77", Op.PUT, {"tier": tier})
        for tier in ("silver", "gold", "platinum")
    ]
    await Emitter().emit_many(conn, mutations, autocommit=True)
    async with conn.transaction():
        head = await conn.fetchrow(
            "SELECT id, event_id, payload FROM dispatcher.outbox "
            "WHERE trigger_id = $1 AND key_seq = 1",
            sync.id,
        )
        errors = [{"attempt": 1, "kind": "permanent", "message": "unknown customer 77"}]
        letter = await conn.fetchval(
            """
            INSERT INTO dispatcher.dead_letters (outbox_id, event_id, trigger_id, scope,
                trigger_name, target, registered_by, payload, policy, depth, attempts,
                reason, errors, event_created_at, order_key, key_seq)
            VALUES ($1, $2, $3, 'shop', 'crm-sync', 'crm.sync', 'user:billing-bot', $4::jsonb,
                $5::jsonb, 0, 1, 'permanent', $6::jsonb, clock_timestamp(), 'customers/77', 1)
            RETURNING id""",
            head["id"],
            head["event_id"],
            sync.id,
            head["payload"],
            json.dumps(POLICY),
            json.dumps(errors),
        )
        await conn.execute(
            """INSERT INTO dispatcher.blocked_keys (trigger_id, order_key, scope, trigger_name,
                dead_letter_id, key_seq)
            VALUES ($1, 'customers/77', 'shop', 'crm-sync', $2, 1)""",
            sync.id,
            letter,
        )
        await conn.execute("DELETE FROM dispatcher.outbox WHERE id = $1", head["id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", default=os.environ.get("DATABASE_URL"))
    parser.add_argument("--chromium", default=shutil.which("chromium"))
    args = parser.parse_args()
    if not args.dsn or not args.chromium:
        parser.error("give --dsn (or set DATABASE_URL) and have chromium on the PATH")
    anyio.run(seed, args.dsn)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(create_app(ConsoleSettings(args.dsn)), log_level="warning")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1280, "height": 860})
            page.set_default_timeout(10_000)

            def shoot(name: str) -> None:
                page.screenshot(path=HERE / f"{name}.png", full_page=True)
                print(f"docs/console/{name}.png")

            page.goto(url + "/")
            shoot("overview")
            page.goto(url + "/dead-letters?scope=shop")
            page.locator("#count-open").wait_for()  # the counts load after the page
            shoot("dead-letters")
            page.locator("#letters tbody tr a").first.click()
            page.locator("#errors").wait_for()
            shoot("dead-letter")
            page.locator("#replay-original").click()
            page.locator("#confirm").wait_for()
            shoot("replay-preview")
            page.locator("#confirm").click()
            page.locator("#notice").wait_for()
            page.goto(url + "/dead-letters?scope=shop&reason=timeout")
            page.locator("#bulk-discard").click()
            page.locator("#preview-count").wait_for()
            shoot("bulk-preview")
            page.goto(url + "/triggers")
            shoot("triggers")
            page.goto(url + "/audit")
            shoot("audit")
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)


if __name__ == "__main__":
    main()
