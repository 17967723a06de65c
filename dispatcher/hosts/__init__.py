"""The host connections an emit runs on: one thin adapter per kind of connection.

Every adapter runs the same statement (``dispatcher/sql/emit.py``: a call of the emit
functions of migration 0007) with the same arguments, which :class:`dispatcher.emit.Emitter`
has validated and encoded. An adapter does three things only: tell whether its connection is
inside a transaction (and say how to open one when it is not), write the statement's ``$n``
parameters in its driver's style, and return the one result row. Whatever the driver, a
refusal of the emit functions for a full backlog (SQLSTATE 54Q01) leaves as
:class:`~dispatcher.BacklogFull` (:data:`refusals`).

- async (``await dispatcher.emit``): asyncpg ``Connection`` (or a pool's), psycopg 3
  ``AsyncConnection``, SQLAlchemy ``AsyncConnection`` and ``AsyncSession``;
- sync (``dispatcher.emit_sync``): psycopg 3 ``Connection``, SQLAlchemy ``Connection`` and
  ``Session`` (a ``scoped_session`` too, as Flask-SQLAlchemy's ``db.session``), and a Django
  connection (``dispatcher.contrib.django`` picks it by alias).

SQLAlchemy's connections and sessions run the statement through SQLAlchemy itself, so it
joins the transaction SQLAlchemy manages, whatever the driver underneath.

No driver is imported here: a connection is recognised by its class, looked up among the
modules already loaded (a host holding a psycopg connection has imported psycopg), so
``import dispatcher`` loads none of them.

The parts, one job each:

- :mod:`~dispatcher.hosts.protocols`: what an emit takes (:data:`AsyncHost`,
  :data:`SyncHost`, :class:`DjangoConnection`) and what a runner does
  (:class:`AsyncRunner`, :class:`SyncRunner`);
- :mod:`~dispatcher.hosts.registry`: which adapter a connection gets
  (:func:`async_runner`, :func:`sync_runner`);
- :mod:`~dispatcher.hosts.backlog`: a full backlog's refusal as :class:`BacklogFull`,
  whatever the driver (:data:`refusals`, :func:`backlog_refusal`);
- :mod:`~dispatcher.hosts.params`: the statement in each driver's parameter style;
- :mod:`~dispatcher.hosts.asyncpg_host`, :mod:`~dispatcher.hosts.psycopg_host`,
  :mod:`~dispatcher.hosts.sqlalchemy_host`, :mod:`~dispatcher.hosts.django_host`: the
  adapters, one module per driver.
"""

from __future__ import annotations

from dispatcher.hosts.backlog import backlog_refusal, refusals
from dispatcher.hosts.protocols import (
    Args,
    AsyncHost,
    AsyncRunner,
    DjangoConnection,
    Row,
    SyncHost,
    SyncRunner,
)
from dispatcher.hosts.registry import async_runner, sync_runner

__all__ = [
    "Args",
    "AsyncHost",
    "AsyncRunner",
    "DjangoConnection",
    "Row",
    "SyncHost",
    "SyncRunner",
    "async_runner",
    "backlog_refusal",
    "refusals",
    "sync_runner",
]
