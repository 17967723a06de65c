"""Emit from Django, on a database alias, inside ``transaction.atomic`` (extra ``django``:
``pip install 'dispatcher[django]'``).

>>> from django.db import transaction
>>> from dispatcher.contrib import django as dispatcher_django
>>> with transaction.atomic():
...     Account.objects.filter(pk=42).update(plan="pro")
...     dispatcher_django.emit(Mutation("acme", "users", "users/42", Op.PUT, {"plan": "pro"}))

The rows are written through the alias's connection, so they commit and roll back with the
atomic block. Outside one (Django's default autocommit mode) the call raises
:class:`~dispatcher.TransactionRequired` unless it passes ``autocommit=True``; a connection
whose autocommit the host turned off (``transaction.set_autocommit(False)``) is inside the
transaction its own ``commit()`` ends, and is accepted. The database must be PostgreSQL, on
either of Django's drivers (psycopg 3 or psycopg2), migrated with ``dispatcher migrate``.

Django's ORM is sync: from an async view, call these through ``asgiref``'s
``sync_to_async``, inside the same function as the atomic block.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from dispatcher.core.models import Mutation
from dispatcher.emit import Emitter, Enqueued

# Imported by name: Django ships no type information, so the connection is typed at the
# boundary (dispatcher.hosts.DjangoConnection) instead of by a stub package.
try:
    _db = importlib.import_module("django.db")
except ImportError as exc:
    raise ImportError(
        "dispatcher.contrib.django needs Django, which is not installed; "
        "install the extra with: pip install 'dispatcher[django]'",
        name="django",
    ) from exc

_DEFAULT = Emitter()


def emit(
    mutation: Mutation,
    *,
    using: str = "default",
    autocommit: bool = False,
    emitter: Emitter | None = None,
) -> list[Enqueued]:
    """Enqueue one row per matching trigger on the ``using`` database, in its atomic block.

    ``emitter`` gives another schema or other limits than the defaults.
    """
    return (emitter or _DEFAULT).emit_sync(_db.connections[using], mutation, autocommit=autocommit)


def emit_many(
    mutations: Sequence[Mutation],
    *,
    using: str = "default",
    autocommit: bool = False,
    emitter: Emitter | None = None,
) -> list[Enqueued]:
    """Bulk :func:`emit`: one statement for all mutations, all or nothing."""
    conn = _db.connections[using]
    return (emitter or _DEFAULT).emit_many_sync(conn, mutations, autocommit=autocommit)
