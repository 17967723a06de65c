"""Every SQL statement the library runs, grouped by the module that owns it, with the schema
name injected once.

- :mod:`~dispatcher.sql.triggers`: trigger registration (:mod:`dispatcher.triggers`);
- :mod:`~dispatcher.sql.emit`: fan-out (:mod:`dispatcher.emit`);
- :mod:`~dispatcher.sql.claim`: leasing rows (the poller, synchronous calls, backlog reads);
- :mod:`~dispatcher.sql.settle`: writing outcomes, fenced (``runtime/settle_writes.py``);
- :mod:`~dispatcher.sql.flow`: pauses, parked rows, breakers (:mod:`dispatcher.flow`);
- :mod:`~dispatcher.sql.kv`: the reference KV and the per-root budgets;
- :mod:`~dispatcher.sql.admin`: dead letters, abandoned executions, status;
- :mod:`~dispatcher.sql.health`: the progress verdict of ``dispatcher status``;
- :mod:`~dispatcher.sql.common`: the schema, the policy snapshot, the trigger-match predicate.

:class:`Sql` is every owner but the operator's in one object (``queries(schema).claim``), so
the runtime holds one; the operator statements come from
:func:`~dispatcher.sql.admin.admin_queries`. Statements take parameters only; no user text is
ever spliced into SQL.
"""

from __future__ import annotations

from functools import cache

from dispatcher.names import DEFAULT_SCHEMA
from dispatcher.sql.claim import ClaimSql
from dispatcher.sql.common import POLICY_COLUMNS
from dispatcher.sql.emit import EmitSql
from dispatcher.sql.flow import FlowSql
from dispatcher.sql.kv import KvSql
from dispatcher.sql.settle import SettleSql
from dispatcher.sql.triggers import TriggerSql

__all__ = [
    "POLICY_COLUMNS",
    "ClaimSql",
    "EmitSql",
    "FlowSql",
    "KvSql",
    "SettleSql",
    "Sql",
    "TriggerSql",
    "queries",
]


class Sql(TriggerSql, EmitSql, ClaimSql, SettleSql, FlowSql, KvSql):
    """The statements of every runtime owner for one schema. Build with :func:`queries`."""


@cache
def queries(schema: str = DEFAULT_SCHEMA) -> Sql:
    """The cached :class:`Sql` for ``schema``.

    >>> queries("dispatcher").channel
    'dispatcher_wake'
    """
    return Sql(schema)
