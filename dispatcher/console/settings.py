"""How a console is configured: where the tables are, who may use it and what they may do.

Authentication comes from the environment (never from the command line, where other users
of the machine could read it in the process list):

- ``DISPATCHER_CONSOLE_TOKEN``: a shared secret. A browser sends it as the password of HTTP
  basic auth (the user name typed is recorded in the audit log as given, not verified); an
  API client may send ``Authorization: Bearer <token>``.
- ``DISPATCHER_CONSOLE_USER`` and ``DISPATCHER_CONSOLE_PASSWORD``: HTTP basic auth for one
  user, recorded in the audit log under that name.

>>> settings = ConsoleSettings(dsn, scopes=("acme",), read_only=True)
>>> check_bind("0.0.0.0", settings)
Traceback (most recent call last):
dispatcher.console.settings.UnsafeBind: refusing to listen on 0.0.0.0 without authentication...
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from dispatcher.core.errors import DispatcherError, InvalidInput
from dispatcher.core.models import check_name
from dispatcher.names import DEFAULT_SCHEMA, check_schema_name

TOKEN_ENV = "DISPATCHER_CONSOLE_TOKEN"
USER_ENV = "DISPATCHER_CONSOLE_USER"
PASSWORD_ENV = "DISPATCHER_CONSOLE_PASSWORD"
MIN_SECRET_LENGTH = 16
# The actor recorded for a console without authentication (reachable from loopback only).
LOCAL_ACTOR = "local"


class UnsafeBind(DispatcherError):
    """A console without authentication was asked to listen beyond the loopback interface."""


@dataclass(frozen=True, slots=True)
class Auth:
    """Who may use the console: a shared ``token``, or one ``user`` with a ``password``
    (either or both). ``repr`` never shows the secrets."""

    token: str | None = field(default=None, repr=False)
    user: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.user is None) != (self.password is None):
            raise InvalidInput("auth", self.user, f"set both {USER_ENV} and {PASSWORD_ENV}")
        if self.token is None and self.user is None:
            raise InvalidInput("auth", None, "give a token, or a user and a password")
        for name, secret in (("token", self.token), ("password", self.password)):
            if secret is not None and len(secret) < MIN_SECRET_LENGTH:
                raise InvalidInput(
                    name, "<hidden>", f"must be at least {MIN_SECRET_LENGTH} characters"
                )
        if self.user is not None:
            check_name("user", self.user)
            if ":" in self.user:
                raise InvalidInput("user", self.user, "must not contain ':'")


def auth_from_env(environ: Mapping[str, str] | None = None) -> Auth | None:
    """The :class:`Auth` the environment configures; None when it configures none.

    >>> auth_from_env({"DISPATCHER_CONSOLE_TOKEN": "s3cret-s3cret-s3cret"})
    Auth(user=None)
    """
    env = os.environ if environ is None else environ
    token = env.get(TOKEN_ENV) or None
    user = env.get(USER_ENV) or None
    password = env.get(PASSWORD_ENV) or None
    if token is None and user is None and password is None:
        return None
    return Auth(token=token, user=user, password=password)


@dataclass(frozen=True, slots=True)
class ConsoleSettings:
    """A console over the tables of ``schema`` in the database at ``dsn``.

    ``auth`` None: no authentication, and only loopback clients are answered. ``read_only``:
    every page, no action. ``scopes``: the only scopes the operator sees and acts on (None:
    all); a pause of everything is then refused. ``refresh_seconds``: how often the pages
    refresh their counts. ``page_size``: dead letters per page.
    """

    dsn: str = field(repr=False)
    schema: str = DEFAULT_SCHEMA
    auth: Auth | None = None
    read_only: bool = False
    scopes: tuple[str, ...] | None = None
    refresh_seconds: float = 5.0
    page_size: int = 50
    pool_size: int = 4

    def __post_init__(self) -> None:
        check_schema_name(self.schema)
        if self.scopes is not None:
            raw: Sequence[str] = self.scopes
            scopes = tuple(sorted({check_name("scopes", s) for s in raw}))
            if not scopes:
                raise InvalidInput("scopes", raw, "must name at least one scope (None: all)")
            object.__setattr__(self, "scopes", scopes)
        if not 0.5 <= self.refresh_seconds <= 3600:
            raise InvalidInput("refresh_seconds", self.refresh_seconds, "must be 0.5 to 3600")
        if not 1 <= self.page_size <= 500:
            raise InvalidInput("page_size", self.page_size, "must be 1 to 500")
        if not 1 <= self.pool_size <= 50:
            raise InvalidInput("pool_size", self.pool_size, "must be 1 to 50")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) names only this machine.

    >>> is_loopback("127.0.0.1"), is_loopback("::1"), is_loopback("0.0.0.0")
    (True, True, False)
    """
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, settings: ConsoleSettings) -> None:
    """Refuse (:class:`UnsafeBind`) to serve a console without authentication anywhere but
    on the loopback interface."""
    if settings.auth is None and not is_loopback(host):
        raise UnsafeBind(
            f"refusing to listen on {host} without authentication: set {TOKEN_ENV} (at "
            f"least {MIN_SECRET_LENGTH} characters), or {USER_ENV} and {PASSWORD_ENV}, "
            "or listen on 127.0.0.1"
        )
