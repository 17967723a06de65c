"""The console as an operator uses it, in Chromium: each test clicks through the pages and
then checks the database."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from browser_support import Served, run
from console_seed import letter, shop
from playwright.sync_api import Browser, Page, expect

from dispatcher.console import Auth, ConsoleSettings, create_app

TIMEOUT = 10_000  # ms, for every wait on the page
TOKEN = "browser-test-token-0123456789"

Serve = Callable[..., Served]


def _open(browser: Browser, url: str, **context: Any) -> Page:
    # A context of its own (cookies, credentials); closed with the module's browser.
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(TIMEOUT)
    response = page.goto(url)
    assert response is not None
    return page


def _audit(db: str) -> list[tuple[Any, ...]]:
    async def fetch(conn: Any) -> list[tuple[Any, ...]]:
        rows = await conn.fetch(
            "SELECT actor, action, scope, target, count FROM dispatcher.audit_log ORDER BY id"
        )
        return [tuple(r) for r in rows]

    return run(fetch, db)


def _resolutions(db: str) -> dict[int, str]:
    async def fetch(conn: Any) -> dict[int, str]:
        return dict(await conn.fetch("SELECT id, resolution FROM dispatcher.dead_letters"))

    return run(fetch, db)


def test_filter_open_preview_and_replay_one(browser: Browser, db: str, serve: Serve) -> None:
    ids = run(shop, db)
    console = serve(create_app(ConsoleSettings(db)))
    page = _open(browser, console.url + "/")
    expect(page.locator("#count-open")).to_have_text("6")

    page.get_by_role("link", name="Dead letters", exact=True).click()
    page.get_by_label("Text").fill("no reply")
    page.get_by_role("button", name="Filter").click()
    rows = page.locator("#letters tbody tr")
    expect(rows).to_have_count(2)
    # Newest first: timeout1 was dead-lettered after timeout0.
    expect(rows.first).to_have_attribute("data-id", str(ids["timeout1"]))

    rows.first.get_by_role("link").click()
    expect(page.locator("h1")).to_contain_text(f"Dead letter {ids['timeout1']}")
    expect(page.locator("#errors")).to_contain_text("TimeoutError: no reply in 10s")
    expect(page.locator("#new-value")).to_contain_text('"status": "paid"')
    expect(page.locator("#old-value")).to_contain_text('"status": "new"')

    page.locator("#replay-original").click()
    expect(page.locator("#preview-summary")).to_contain_text("Would enqueue it again")
    assert _resolutions(db)[ids["timeout1"]] == "open"  # the preview changed nothing
    page.locator("#confirm").click()

    expect(page.locator("#notice")).to_contain_text("replayed as event")
    expect(page.locator("#resolution")).to_have_text("replayed")

    async def check(conn: Any) -> tuple[Any, ...]:
        replayed_as = await conn.fetchval(
            "SELECT replayed_as FROM dispatcher.dead_letters WHERE id = $1", ids["timeout1"]
        )
        queued = await conn.fetchval(
            "SELECT count(*) FROM dispatcher.outbox WHERE event_id = $1", replayed_as
        )
        return replayed_as, queued

    replayed_as, queued = run(check, db)
    assert replayed_as is not None
    assert queued == 1
    expect(page.locator("#replayed-as")).to_have_text(str(replayed_as))
    others = {k: v for k, v in _resolutions(db).items() if k != ids["timeout1"]}
    assert set(others.values()) == {"open"}
    assert _audit(db) == [
        ("local", "dead_letters.replay", "shop", f"dead letter {ids['timeout1']}", 1)
    ]


def test_bulk_discard_by_filter(browser: Browser, db: str, serve: Serve) -> None:
    ids = run(shop, db)
    console = serve(create_app(ConsoleSettings(db)))
    page = _open(browser, console.url + "/dead-letters")
    page.get_by_label("Trigger").fill("shop/charge")
    page.get_by_label("Reason").select_option("handler_error")
    page.get_by_role("button", name="Filter").click()
    expect(page.locator("#letters tbody tr")).to_have_count(3)

    page.locator("#bulk-discard").click()
    expect(page.locator("#preview-count")).to_have_text("3")
    expect(page.locator("#preview-triggers")).to_contain_text("shop/charge")
    assert set(_resolutions(db).values()) == {"open"}  # the preview changed nothing
    page.locator("#confirm").click()

    expect(page.locator("#notice")).to_contain_text("discarded 3 dead letters")
    expect(page.locator("#no-letters")).to_be_visible()  # the filter (open) is now empty
    resolutions = _resolutions(db)
    assert {resolutions[ids[f"declined{n}"]] for n in range(3)} == {"discarded"}
    untouched = [ids["timeout0"], ids["timeout1"], ids["smtp"]]
    assert {resolutions[i] for i in untouched} == {"open"}
    [(actor, action, scope, target, count)] = _audit(db)
    assert (actor, action, scope, target, count) == (
        "local",
        "dead_letters.bulk_discard",
        "shop",
        None,
        3,
    )
    page.get_by_role("link", name="Audit", exact=True).click()
    expect(page.locator("#audit tbody tr")).to_have_count(1)
    expect(page.locator("#audit")).to_contain_text("dead_letters.bulk_discard")


def test_pause_and_resume_a_trigger(browser: Browser, db: str, serve: Serve) -> None:
    ids = run(shop, db)
    console = serve(create_app(ConsoleSettings(db)))
    page = _open(browser, console.url + "/triggers")
    charge = ids["charge"]

    page.locator(f"#pause-{charge}").click()
    expect(page.locator("#notice")).to_contain_text(f"paused trigger {charge} (charge)")
    expect(page.locator(f"#paused-{charge}")).to_be_visible()

    def pauses() -> list[tuple[Any, ...]]:
        async def fetch(conn: Any) -> list[tuple[Any, ...]]:
            rows = await conn.fetch("SELECT scope, trigger_id FROM dispatcher.pauses")
            return [tuple(r) for r in rows]

        return run(fetch, db)

    assert pauses() == [(None, charge)]
    page.get_by_role("link", name="Overview", exact=True).click()
    expect(page.locator("#pauses")).to_contain_text(f"trigger {charge} (charge)")

    page.get_by_role("link", name="Triggers", exact=True).click()
    page.locator(f"#resume-{charge}").click()
    expect(page.locator("#notice")).to_contain_text(f"resumed trigger {charge} (charge)")
    expect(page.locator(f"#pause-{charge}")).to_be_visible()
    assert pauses() == []
    assert [a[1] for a in _audit(db)] == ["flow.pause", "flow.resume"]


def test_read_only_session_cannot_act(browser: Browser, db: str, serve: Serve) -> None:
    ids = run(shop, db)
    console = serve(create_app(ConsoleSettings(db, read_only=True)))
    page = _open(browser, f"{console.url}/dead-letters/{ids['smtp']}")
    expect(page.locator("#read-only")).to_be_visible()
    expect(page.locator("#errors")).to_contain_text("SMTPError")
    expect(page.locator("#letter-actions")).to_have_count(0)
    page.get_by_role("link", name="Triggers", exact=True).click()
    expect(page.locator("#triggers")).to_contain_text("shop/charge")
    expect(page.get_by_role("button")).to_have_count(0)

    # Even posted by hand, with this browser's own CSRF token, an action is refused.
    csrf = next(c["value"] for c in page.context.cookies() if c["name"] == "dispatcher_csrf")
    response = page.request.post(
        f"{console.url}/dead-letters/{ids['smtp']}/act",
        form={"csrf": csrf, "action": "discard"},
    )
    assert response.status == 403
    assert "read-only" in response.text()
    assert set(_resolutions(db).values()) == {"open"}
    assert _audit(db) == []


def test_action_without_csrf_token_is_refused(browser: Browser, db: str, serve: Serve) -> None:
    ids = run(shop, db)
    console = serve(create_app(ConsoleSettings(db)))
    page = _open(browser, f"{console.url}/dead-letters/{ids['smtp']}/preview?action=discard")
    expect(page.locator("#confirm")).to_be_visible()
    # What a forged form lacks: the token. Remove it from the real form and submit.
    page.locator("#confirm-form input[name=csrf]").evaluate("e => e.remove()")
    page.locator("#confirm").click()
    expect(page.locator("#error")).to_contain_text("CSRF token is missing")
    assert set(_resolutions(db).values()) == {"open"}
    assert _audit(db) == []


def test_non_local_bind_refuses_requests_without_auth(
    browser: Browser, db: str, serve: Serve
) -> None:
    run(shop, db)
    console = serve(create_app(ConsoleSettings(db, auth=Auth(token=TOKEN))), host="0.0.0.0")
    anonymous = browser.new_context()
    response = anonymous.request.get(console.url + "/")
    assert response.status == 401
    assert response.headers["www-authenticate"].startswith("Basic")
    denied = anonymous.request.post(console.url + "/flow/pause", form={"scope": "shop"})
    assert denied.status == 401
    anonymous.close()

    page = _open(
        browser, console.url + "/", http_credentials={"username": "ops", "password": TOKEN}
    )
    expect(page.locator(".actor")).to_have_text("token:ops")
    page.locator("#pause-scope button").click()
    expect(page.locator("#notice")).to_contain_text("paused scope shop")

    async def scopes(conn: Any) -> list[Any]:
        return [r[0] for r in await conn.fetch("SELECT scope FROM dispatcher.pauses")]

    assert run(scopes, db) == ["shop"]
    assert _audit(db) == [("token:ops", "flow.pause", "shop", "scope shop", 1)]


def test_counts_refresh_without_reload(browser: Browser, db: str, serve: Serve) -> None:
    ids = run(shop, db)
    console = serve(create_app(ConsoleSettings(db, refresh_seconds=0.5)))
    page = _open(browser, console.url + "/")
    expect(page.locator("#count-open")).to_have_text("6")
    page.evaluate("window.notReloaded = true")

    async def more(conn: Any) -> int:
        return await letter(conn, ids["email"], "email")

    run(more, db)
    expect(page.locator("#count-open")).to_have_text("7")
    assert page.evaluate("window.notReloaded") is True
