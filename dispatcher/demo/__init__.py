"""``dispatcher demo``: the whole flow on a real Postgres in a few seconds.

Registers five triggers in the scope ``demo`` (a flaky one that recovers, an always-failing
one, a dead-letter handler for it, a self-triggering loop and a synchronous quote), writes KV
mutations, makes synchronous calls, runs a dispatcher with a live table until every row is
done, and reads the outcome back through :class:`~dispatcher.admin.Admin`. Everything goes
through the library's public functions, in the schema given.

>>> result = await run_demo(dsn, Console(), orders=20)
>>> (result.dead_letters, result.handled, result.abandoned)
(3, 3, 1)
"""

from __future__ import annotations

from dispatcher.demo.board import _MEANINGS as _MEANINGS
from dispatcher.demo.board import _THIS_RUN as _THIS_RUN
from dispatcher.demo.board import _Board as _Board

# The parts: the scenario (triggers, handlers, set-up and clean-up), playing it (play) and
# what it shows (board). Every name stays importable from here.
from dispatcher.demo.board import _intro as _intro
from dispatcher.demo.board import _shown as _shown
from dispatcher.demo.play import _check_not_held as _check_not_held
from dispatcher.demo.play import _database as _database
from dispatcher.demo.play import _play as _play
from dispatcher.demo.play import _quotes as _quotes
from dispatcher.demo.play import _single_error as _single_error
from dispatcher.demo.play import _until_done as _until_done
from dispatcher.demo.play import run_demo as run_demo
from dispatcher.demo.scenario import BILLING_ACCOUNTS as BILLING_ACCOUNTS
from dispatcher.demo.scenario import MAX_DEPTH as MAX_DEPTH
from dispatcher.demo.scenario import MAX_ORDERS as MAX_ORDERS
from dispatcher.demo.scenario import NAMESPACES as NAMESPACES
from dispatcher.demo.scenario import QUICK as QUICK
from dispatcher.demo.scenario import SCOPE as SCOPE
from dispatcher.demo.scenario import SLOW_QUOTE_LIMIT as SLOW_QUOTE_LIMIT
from dispatcher.demo.scenario import SLOW_QUOTE_TAKES as SLOW_QUOTE_TAKES
from dispatcher.demo.scenario import TRIGGERS as TRIGGERS
from dispatcher.demo.scenario import DemoError as DemoError
from dispatcher.demo.scenario import DemoResult as DemoResult
from dispatcher.demo.scenario import _clean_up as _clean_up
from dispatcher.demo.scenario import _install_triggers as _install_triggers
from dispatcher.demo.scenario import _remove as _remove
from dispatcher.demo.scenario import _same as _same
from dispatcher.demo.scenario import _Spec as _Spec
from dispatcher.demo.scenario import build_handlers as build_handlers
