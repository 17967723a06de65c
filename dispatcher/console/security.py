"""Who is asking, and whether they may act: authentication, the loopback rule, CSRF and the
read-only mode, for every request of the console.

Authentication and the loopback rule are checked by :class:`Guard` before any route runs.
Every action (a POST) reads its form through :func:`action_form`, which refuses it in a
read-only console and without the CSRF token: the token is a random value set in a
``SameSite=Strict`` cookie and repeated in each form the console renders (a double-submit
token); a form posted from another site carries neither, and a request whose ``Origin`` is
another host is refused too.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
import secrets
from urllib.parse import urlsplit

from starlette.exceptions import HTTPException
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from dispatcher.console.settings import LOCAL_ACTOR, Auth, ConsoleSettings, is_loopback

CSRF_COOKIE = "dispatcher_csrf"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
_ACTOR = re.compile(r"[^\x00-\x1f\x7f]{1,100}")

# No script or style from anywhere but the console itself, no framing, no referrer leaks.
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def _equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def authenticate(header: str | None, auth: Auth) -> str | None:
    """The actor an ``Authorization`` header proves, or None.

    >>> authenticate("Bearer s3cret-s3cret-s3cret", Auth(token="s3cret-s3cret-s3cret"))
    'token'
    """
    if not header:
        return None
    kind, _, value = header.partition(" ")
    kind = kind.lower()
    if kind == "bearer":
        return "token" if auth.token is not None and _equal(value.strip(), auth.token) else None
    if kind != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not sep:
        return None
    # Both compared, whatever the first gives (&, not and): the time taken tells nothing.
    if (
        auth.user is not None
        and auth.password is not None
        and _equal(user, auth.user) & _equal(password, auth.password)
    ):
        return auth.user
    if auth.token is not None and _equal(password, auth.token):
        # A token proves knowledge of the secret, not a name: the name typed is kept as
        # given, marked as such.
        return f"token:{user}" if _ACTOR.fullmatch(user) else "token"
    return None


class Guard(BaseHTTPMiddleware):
    """Authenticate every request (401 with a basic-auth challenge when it fails), answer
    only loopback clients when no authentication is configured (403), hand each browser a
    CSRF token, and set the security headers."""

    def __init__(self, app: object, settings: ConsoleSettings) -> None:
        super().__init__(app)  # type: ignore[arg-type]
        self.settings = settings

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        auth = self.settings.auth
        if auth is None:
            client = request.client.host if request.client is not None else ""
            if not is_loopback(client):
                return _secured(
                    PlainTextResponse(
                        "This console has no authentication configured and answers local "
                        "requests only.\n",
                        status_code=403,
                    )
                )
            actor: str | None = LOCAL_ACTOR
        else:
            actor = authenticate(request.headers.get("authorization"), auth)
            if actor is None:
                return _secured(
                    PlainTextResponse(
                        "Authentication required.\n",
                        status_code=401,
                        headers={"www-authenticate": 'Basic realm="dispatcher console"'},
                    )
                )
        request.state.actor = actor
        cookie = request.cookies.get(CSRF_COOKIE)
        fresh = cookie is None or not _TOKEN.fullmatch(cookie)
        token = secrets.token_urlsafe(32) if fresh or cookie is None else cookie
        request.state.csrf = token
        response = await call_next(request)
        if fresh:
            response.set_cookie(
                CSRF_COOKIE,
                token,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path=request.scope.get("root_path") or "/",
            )
        return _secured(response)


def _secured(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


async def action_form(request: Request, settings: ConsoleSettings) -> dict[str, str]:
    """The fields of an action's form, once it is allowed: refused (403) in a read-only
    console, without the CSRF token of this browser, or from another origin."""
    if settings.read_only:
        raise HTTPException(403, "This console is read-only: actions are disabled.")
    origin = request.headers.get("origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.headers.get("host"):
        raise HTTPException(403, "Refused: the request came from another site.")
    form = await request.form()
    sent = form.get(CSRF_FIELD) or request.headers.get(CSRF_HEADER)
    cookie = request.cookies.get(CSRF_COOKIE)
    if not cookie or not isinstance(sent, str) or not _equal(sent, cookie):
        raise HTTPException(
            403, "Refused: the form's CSRF token is missing or stale. Reload the page and retry."
        )
    return {k: v for k, v in form.items() if isinstance(v, str)}
