"""Flow control an operator drives: pause and resume, parked rows, circuit breakers, backlog
caps, blocked keys of ordered triggers.

Pauses and breakers live in Postgres, so every dispatcher process honours them. Nothing is
dropped: paused, held and parked rows stay in the outbox with their attempt counts. A backlog
cap refuses new rows for a scope (every producer's emit raises
:class:`~dispatcher.BacklogFull`) while the scope's pending rows are at the cap; it never
touches rows already queued.

>>> flow = FlowControl()
>>> await flow.pause(conn, scope="acme", note="upstream maintenance")
>>> await flow.resume(conn, scope="acme")
>>> await flow.unpark(conn, trigger_id=7, limit=500)
>>> await flow.set_backlog_cap(conn, "acme", 50_000)

An operator names a trigger by id or as ``SCOPE/NAME``: :func:`parse_trigger_ref` reads that,
:meth:`FlowControl.trigger_id` resolves it.
"""

# The parts, by seam: how targets are named (targets), what is read back (rows), backlog
# caps (backlog_caps), and the actions themselves (control). Every name stays importable
# from dispatcher.flow.
from dispatcher.flow.backlog_caps import (
    DEFAULT_RECOUNT_INTERVAL as DEFAULT_RECOUNT_INTERVAL,
)
from dispatcher.flow.backlog_caps import MAX_BACKLOG_CAP as MAX_BACKLOG_CAP
from dispatcher.flow.backlog_caps import BacklogCap as BacklogCap
from dispatcher.flow.backlog_caps import check_backlog_cap as check_backlog_cap
from dispatcher.flow.backlog_caps import parse_max_pending as parse_max_pending
from dispatcher.flow.backlog_caps import parse_recount_interval as parse_recount_interval
from dispatcher.flow.control import FlowControl as FlowControl
from dispatcher.flow.rows import MAX_UNPARK_BATCH as MAX_UNPARK_BATCH
from dispatcher.flow.rows import BlockedKey as BlockedKey
from dispatcher.flow.rows import Breaker as Breaker
from dispatcher.flow.rows import ParkedRow as ParkedRow
from dispatcher.flow.rows import ParkedSummary as ParkedSummary
from dispatcher.flow.rows import Pause as Pause
from dispatcher.flow.rows import _check_limit as _check_limit
from dispatcher.flow.targets import NoBreaker as NoBreaker
from dispatcher.flow.targets import NotPaused as NotPaused
from dispatcher.flow.targets import TriggerRef as TriggerRef
from dispatcher.flow.targets import _check_target as _check_target
from dispatcher.flow.targets import _target_text as _target_text
from dispatcher.flow.targets import parse_trigger_ref as parse_trigger_ref
