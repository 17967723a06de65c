"""The console over HTTP (httpx's ASGI transport, a real Postgres): authentication, the
loopback rule, CSRF, read-only mode, scope limits, the audit log, keyset pages, previews.
The browser tests (tests/browser) drive the same pages in Chromium."""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from click.testing import CliRunner
from dead_letter_seed import add_trigger, dead_letter, enqueue

from dispatcher.admin import Admin, DeadLetterFilter, pages
from dispatcher.cli import main
from dispatcher.console import Auth, ConsoleSettings, UnsafeBind, check_bind, create_app

pytestmark = pytest.mark.anyio

TOKEN = "correct-horse-battery-staple"
LOCAL = ("127.0.0.1", 50000)
REMOTE = ("10.1.2.3", 50000)

Client = Callable[..., httpx.AsyncClient]


@pytest.fixture
async def client(dsn: str) -> AsyncIterator[Client]:
    """Clients of consoles over this test's database; every console is closed afterwards."""
    apps: list[Any] = []

    def make(peer: tuple[str, int] = LOCAL, **settings: Any) -> httpx.AsyncClient:
        app = create_app(ConsoleSettings(dsn, **settings))
        apps.append(app)
        transport = httpx.ASGITransport(app=app, client=peer)
        return httpx.AsyncClient(transport=transport, base_url="http://console.test")

    yield make
    for app in apps:
        await app.state.console.aclose()


async def _seed(conn: asyncpg.Connection) -> dict[str, int]:
    welcome = await add_trigger(conn, "welcome")
    other = await add_trigger(conn, "billing", scope="globex")
    ids = {
        "a": await dead_letter(conn, trigger_id=welcome, errors=[{"message": "smtp refused"}]),
        "b": await dead_letter(conn, trigger_id=welcome, reason="timeout"),
        "c": await dead_letter(
            conn, trigger_id=other, trigger_name="billing", scope="globex", reason="timeout"
        ),
    }
    return {"welcome": welcome, "billing": other, **ids}


async def _csrf(c: httpx.AsyncClient) -> str:
    """The CSRF token the console handed this client (its cookie, as its forms repeat it)."""
    page = await c.get("/")
    assert page.status_code == 200
    token = c.cookies.get("dispatcher_csrf")
    assert token
    if 'name="csrf"' in page.text:
        assert f'name="csrf" value="{token}"' in page.text
    return token


async def _resolution(conn: asyncpg.Connection, id: int) -> str:
    return str(
        await conn.fetchval("SELECT resolution FROM dispatcher.dead_letters WHERE id = $1", id)
    )


async def _audit(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    return await conn.fetch("SELECT * FROM dispatcher.audit_log ORDER BY id")


async def test_local_console_answers_loopback_only(
    client: Client, conn: asyncpg.Connection
) -> None:
    await _seed(conn)
    async with client() as c:
        page = await c.get("/")
        assert page.status_code == 200
        assert "open dead letters" in page.text
        assert page.headers["x-frame-options"] == "DENY"
        assert "script-src 'self'" in page.headers["content-security-policy"]
    async with client(REMOTE) as c:
        refused = await c.get("/")
        assert refused.status_code == 403
        assert "local requests only" in refused.text
        assert (await c.get("/static/htmx.min.js")).status_code == 403


async def test_authentication_is_required_when_configured(
    client: Client, conn: asyncpg.Connection
) -> None:
    auth = Auth(token=TOKEN, user="alice", password="alice-password-1234")
    async with client(REMOTE, auth=auth) as c:
        anonymous = await c.get("/")
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Basic")
        wrong = await c.get("/", auth=("alice", "not-her-password!!"))
        assert wrong.status_code == 401
        assert (await c.get("/", headers={"authorization": "Bearer nope"})).status_code == 401
        assert (await c.get("/", auth=("alice", "alice-password-1234"))).status_code == 200
        bearer = await c.get("/", headers={"authorization": f"Bearer {TOKEN}"})
        assert bearer.status_code == 200
        # A browser sends the token as a basic-auth password; the name is kept, marked.
        c.auth = httpx.BasicAuth("bob", TOKEN)
        await _seed(conn)
        token = await _csrf(c)
        done = await c.post("/flow/pause", data={"csrf": token, "scope": "acme", "note": "deploy"})
        assert done.status_code == 303
    [row] = await _audit(conn)
    assert (row["actor"], row["action"], row["scope"]) == ("token:bob", "flow.pause", "acme")


def test_bind_beyond_loopback_needs_auth() -> None:
    settings = ConsoleSettings("postgresql://unused")
    check_bind("127.0.0.1", settings)
    check_bind("::1", settings)
    with pytest.raises(UnsafeBind, match="DISPATCHER_CONSOLE_TOKEN"):
        check_bind("0.0.0.0", settings)
    check_bind("0.0.0.0", ConsoleSettings("postgresql://unused", auth=Auth(token=TOKEN)))


def test_cli_refuses_a_public_bind_without_auth(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("DISPATCHER_CONSOLE_TOKEN", "DISPATCHER_CONSOLE_USER"):
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(
        main, ["console", "--dsn", "postgresql://unused", "--host", "0.0.0.0"]
    )
    assert result.exit_code == 1
    assert "refusing to listen on 0.0.0.0 without authentication" in result.output
    monkeypatch.setenv("DISPATCHER_CONSOLE_TOKEN", "short")
    result = CliRunner().invoke(main, ["console", "--dsn", "postgresql://unused"])
    assert result.exit_code == 1
    assert "at least 16 characters" in result.output


def test_cli_says_how_to_install_the_web_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    result = CliRunner().invoke(main, ["console", "--dsn", "postgresql://unused"])
    assert result.exit_code == 1
    assert "pip install 'dispatcher[web]' (uvicorn is missing)" in result.output


async def test_actions_need_the_csrf_token(client: Client, conn: asyncpg.Connection) -> None:
    ids = await _seed(conn)
    async with client() as c:
        token = await _csrf(c)
        forged = await c.post(f"/dead-letters/{ids['a']}/act", data={"action": "discard"})
        assert forged.status_code == 403
        assert "CSRF" in forged.text
        wrong = await c.post(
            f"/dead-letters/{ids['a']}/act", data={"action": "discard", "csrf": "x" * 43}
        )
        assert wrong.status_code == 403
        cross = await c.post(
            f"/dead-letters/{ids['a']}/act",
            data={"action": "discard", "csrf": token},
            headers={"origin": "http://evil.example"},
        )
        assert cross.status_code == 403
        # Every action the console has refuses a request without the token.
        app = c._transport.app  # type: ignore[attr-defined]
        posts = [r for r in app.routes if "POST" in (getattr(r, "methods", None) or ())]
        assert len(posts) >= 7
        for route in posts:
            path = route.path.replace("{id:int}", str(ids["a"]))
            assert (await c.post(path, data={"action": "discard"})).status_code == 403, path
    assert (
        await conn.fetchval(
            "SELECT resolution FROM dispatcher.dead_letters WHERE id = $1", ids["a"]
        )
        == "open"
    )
    assert await _audit(conn) == []

    async with client() as c:
        token = await _csrf(c)
        done = await c.post(
            f"/dead-letters/{ids['a']}/act", data={"action": "discard", "csrf": token}
        )
        assert done.status_code == 303
        assert "notice=discarded" in done.headers["location"]
    assert (
        await conn.fetchval(
            "SELECT resolution FROM dispatcher.dead_letters WHERE id = $1", ids["a"]
        )
        == "discarded"
    )
    [row] = await _audit(conn)
    assert (row["actor"], row["action"], row["target"], row["count"]) == (
        "local",
        "dead_letters.discard",
        f"dead letter {ids['a']}",
        1,
    )


async def test_read_only_console_cannot_act(client: Client, conn: asyncpg.Connection) -> None:
    ids = await _seed(conn)
    async with client(read_only=True) as c:
        token = await _csrf(c)
        page = await c.get(f"/dead-letters/{ids['a']}")
        assert page.status_code == 200
        assert "Replay…" not in page.text
        assert "read-only" in page.text
        refused = await c.post(
            f"/dead-letters/{ids['a']}/act", data={"action": "replay", "csrf": token}
        )
        assert refused.status_code == 403
        assert "read-only" in refused.text
        paused = await c.post("/flow/pause", data={"csrf": token, "scope": "acme"})
        assert paused.status_code == 403
    assert (
        await conn.fetchval(
            "SELECT resolution FROM dispatcher.dead_letters WHERE id = $1", ids["a"]
        )
        == "open"
    )
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.pauses") == 0
    assert await _audit(conn) == []


async def test_scope_limit(client: Client, conn: asyncpg.Connection) -> None:
    ids = await _seed(conn)
    async with client(scopes=("acme",)) as c:
        listed = await c.get("/dead-letters")
        assert f'data-id="{ids["a"]}"' in listed.text
        assert f'data-id="{ids["c"]}"' not in listed.text
        assert (await c.get(f"/dead-letters/{ids['c']}")).status_code == 404
        assert (await c.get("/dead-letters?scope=globex")).status_code == 400
        token = await _csrf(c)
        assert (
            await c.post(f"/dead-letters/{ids['c']}/act", data={"action": "discard", "csrf": token})
        ).status_code == 404
        assert (
            await c.post("/flow/pause", data={"csrf": token, "scope": "globex"})
        ).status_code == 404
        assert (
            await c.post("/flow/pause", data={"csrf": token, "everything": "1"})
        ).status_code == 403
        assert (
            await c.post("/flow/pause", data={"csrf": token, "trigger_id": str(ids["billing"])})
        ).status_code == 404
        # A bulk discard of "everything" discards this scope's letters only.
        preview = await c.get("/dead-letters/preview?resolution=any&action=discard")
        assert 'id="preview-count">2<' in preview.text
        done = await c.post(
            "/dead-letters/bulk",
            data={"csrf": token, "resolution": "any", "action": "discard", "expected": "2"},
        )
        assert done.status_code == 303
        triggers = await c.get("/triggers")
        assert "acme/welcome" in triggers.text
        assert "globex/billing" not in triggers.text
    resolutions = dict(await conn.fetch("SELECT id, resolution FROM dispatcher.dead_letters"))
    assert resolutions == {ids["a"]: "discarded", ids["b"]: "discarded", ids["c"]: "open"}
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.pauses") == 0
    [row] = await _audit(conn)
    assert (row["action"], row["count"], row["scope"]) == ("dead_letters.bulk_discard", 2, "acme")


async def test_bulk_acts_on_at_most_what_was_previewed(
    client: Client, conn: asyncpg.Connection
) -> None:
    ids = await _seed(conn)
    async with client() as c:
        token = await _csrf(c)
        preview = await c.get("/dead-letters/preview?reason=timeout&action=replay&policy=current")
        assert 'id="preview-count">2<' in preview.text
        assert "acme/welcome" in preview.text
        assert "globex/billing" in preview.text
        assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 0
        # One more letter matches after the preview; the confirmation names 2.
        late = await dead_letter(conn, trigger_id=ids["welcome"], reason="timeout")
        fields = dict(re.findall(r'name="([a-z_]+)" value="([^"]*)"', preview.text))
        assert fields["expected"] == "2"
        assert fields["csrf"] == token
        done = await c.post("/dead-letters/bulk", data=fields)
        assert done.status_code == 303
    rows = dict(await conn.fetch("SELECT id, resolution FROM dispatcher.dead_letters"))
    assert rows == {ids["a"]: "open", ids["b"]: "replayed", ids["c"]: "replayed", late: "open"}
    assert await conn.fetchval("SELECT count(*) FROM dispatcher.outbox") == 2
    [row] = await _audit(conn)
    assert row["action"] == "dead_letters.bulk_replay"
    assert row["count"] == 2
    assert '"reason": "timeout"' in row["filter"]
    assert '"policy": "current"' in row["detail"]


async def test_keyset_pages_and_text_search(client: Client, conn: asyncpg.Connection) -> None:
    welcome = await add_trigger(conn, "welcome")
    ids = [
        await dead_letter(
            conn,
            trigger_id=welcome,
            age=timedelta(minutes=60 - n),
            errors=[{"message": f"error number {n}{' needle' if n % 3 == 0 else ''}"}],
        )
        for n in range(8)
    ]
    async with client(page_size=3) as c:
        seen: list[int] = []
        url: str | None = "/dead-letters"
        while url is not None:
            page = await c.get(url)
            assert page.status_code == 200
            seen += [int(i) for i in re.findall(r'<tr data-id="(\d+)"', page.text)]
            nxt = re.search(r'id="next-page" href="([^"]+)"', page.text)
            url = None if nxt is None else nxt.group(1).replace("&amp;", "&")
        assert seen == list(reversed(ids))
        found = await c.get("/dead-letters?text=NEEDLE")
        assert [int(i) for i in re.findall(r'<tr data-id="(\d+)"', found.text)] == [
            ids[6],
            ids[3],
            ids[0],
        ]
        # LIKE's wildcards are searched as text.
        assert "No dead letters match" in (await c.get("/dead-letters?text=%25_")).text


async def test_pages_render(client: Client, conn: asyncpg.Connection) -> None:
    ids = await _seed(conn)
    async with client() as c:
        for path in (
            "/",
            "/counts",
            "/dead-letters",
            f"/dead-letters/{ids['a']}",
            "/triggers",
            "/audit",
        ):
            page = await c.get(path)
            assert page.status_code == 200, (path, page.text[:500])
        assert (await c.get("/dead-letters/999999")).status_code == 404
        assert (await c.get("/dead-letters?since=soon")).status_code == 400
        assert (await c.get("/dead-letters?after=garbage")).status_code == 400


async def test_text_search_reads_a_bounded_scan(
    conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    welcome = await add_trigger(conn, "welcome")
    ids = [
        await dead_letter(
            conn,
            trigger_id=welcome,
            age=timedelta(minutes=60 - n),
            errors=[{"message": "needle" if n % 3 == 0 else "hay"}],
        )
        for n in range(8)
    ]
    monkeypatch.setattr(pages, "SEARCH_BUDGET", 3)
    admin, f = Admin(), DeadLetterFilter(text="needle")
    found, limited, after = [], [], None
    while True:
        page = await admin.dead_letter_page(conn, f, after=after, limit=5)
        found.append([d.id for d in page.letters])
        limited.append(page.scan_limited)
        if page.next_cursor is None:
            break
        after = page.next_cursor
    # Newest first, three letters read a page: 7 6 5 | 4 3 2 | 1 0.
    assert found == [[ids[6]], [ids[3]], [ids[0]]]
    assert limited == [True, True, False]


async def test_mounted_in_a_host_app(dsn: str, conn: asyncpg.Connection) -> None:
    from starlette.applications import Starlette
    from starlette.routing import Mount

    ids = await _seed(conn)
    console = create_app(ConsoleSettings(dsn))
    host = Starlette(routes=[Mount("/ops/dispatcher", app=console)])
    transport = httpx.ASGITransport(app=host, client=LOCAL)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://host.test") as c:
            page = await c.get("/ops/dispatcher/dead-letters")
            assert page.status_code == 200
            # Every link and asset stays under the mount point.
            assert 'href="http://host.test/ops/dispatcher/static/console.css"' in page.text
            assert f'href="http://host.test/ops/dispatcher/dead-letters/{ids["a"]}"' in page.text
            assert (await c.get("/ops/dispatcher/static/htmx.min.js")).status_code == 200
            assert c.cookies.get("dispatcher_csrf")
            token = c.cookies["dispatcher_csrf"]
            done = await c.post(
                f"/ops/dispatcher/dead-letters/{ids['a']}/act",
                data={"action": "discard", "csrf": token},
            )
            assert done.status_code == 303
            assert done.headers["location"].startswith(
                f"http://host.test/ops/dispatcher/dead-letters/{ids['a']}?notice="
            )
    finally:
        await console.state.console.aclose()
    assert await _resolution(conn, ids["a"]) == "discarded"


async def test_unmigrated_schema_says_so(client: Client) -> None:
    async with client(schema="not_migrated") as c:
        page = await c.get("/dead-letters")
        assert page.status_code == 500
        assert "dispatcher migrate" in page.text


async def test_unpark_reset_breaker_and_disable_from_the_pages(
    client: Client, conn: asyncpg.Connection
) -> None:
    welcome = await add_trigger(conn, "welcome")
    rows = await enqueue(conn, "users/1", "users/2")
    await conn.execute(
        """UPDATE dispatcher.outbox SET parked_at = clock_timestamp(), due_at = 'infinity',
            parked_reason = 'permission_denied' WHERE id = ANY ($1)""",
        rows,
    )
    await conn.execute(
        """INSERT INTO dispatcher.breakers (trigger_id, state, failures, open_until, opened_at,
            opened_count)
        VALUES ($1, 'open', 5, clock_timestamp() + interval '1 hour', clock_timestamp(), 1)""",
        welcome,
    )
    async with client() as c:
        overview = await c.get("/")
        assert 'id="parked"' in overview.text
        assert 'id="breakers"' in overview.text
        token = await _csrf(c)
        unparked = await c.post("/flow/unpark", data={"csrf": token, "trigger_id": str(welcome)})
        assert unparked.status_code == 303
        assert "un-parked+2+rows" in unparked.headers["location"]
        reset = await c.post(
            "/flow/breaker-reset", data={"csrf": token, "trigger_id": str(welcome)}
        )
        assert reset.status_code == 303
        disabled = await c.post(
            f"/triggers/{welcome}/enabled", data={"csrf": token, "enabled": "0"}
        )
        assert disabled.status_code == 303
        assert "No breaker is open" in (await c.get("/")).text
        assert "Enable</button>" in (await c.get("/triggers")).text
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM dispatcher.outbox WHERE parked_at IS NULL AND due_at < 'infinity'"
        )
        == 2
    )
    assert await conn.fetchval(
        "SELECT state FROM dispatcher.breakers WHERE trigger_id = $1", welcome
    ) in (None, "closed")
    assert (
        await conn.fetchval("SELECT enabled FROM dispatcher.triggers WHERE id = $1", welcome)
        is False
    )
    assert [(r["action"], r["count"]) for r in await _audit(conn)] == [
        ("flow.unpark", 2),
        ("flow.reset_breaker", 1),
        ("triggers.disable", 1),
    ]
