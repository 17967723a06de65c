"""The operator console: a web page over dead letters, backlog and flow control.

Server-rendered (Starlette, Jinja2, htmx; every asset inside the package, nothing fetched
at run time), safe by default: no authentication means loopback clients only, every action
needs the CSRF token of the page it came from, a read-only mode, a scope limit, and an audit
log of every action (:mod:`dispatcher.admin.audit`). Needs the ``web`` extra::

    pip install 'dispatcher[web]'

>>> from dispatcher.console import ConsoleSettings, auth_from_env, create_app
>>> app = create_app(ConsoleSettings(dsn, auth=auth_from_env()))
>>> host_app.mount("/dispatcher", app)
"""

from __future__ import annotations

try:
    import jinja2  # noqa: F401
    import starlette  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"dispatcher.console needs the 'web' extra ({exc.name} is missing): "
        "pip install 'dispatcher[web]'"
    ) from exc

from dispatcher.console.app import create_app
from dispatcher.console.settings import (
    Auth,
    ConsoleSettings,
    UnsafeBind,
    auth_from_env,
    check_bind,
    is_loopback,
)

__all__ = [
    "Auth",
    "ConsoleSettings",
    "UnsafeBind",
    "auth_from_env",
    "check_bind",
    "create_app",
    "is_loopback",
]
