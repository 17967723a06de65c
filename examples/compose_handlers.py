"""Handlers for the docker-compose worker: ``dispatcher run --handlers
examples.compose_handlers:handlers``.

They are the demo's handlers, so the worker and the ``producer`` service (which runs
``dispatcher demo`` against the same database) can execute each other's rows: the flaky
target recovers, the broken one ends in ``dead_letters`` and its dead-letter handler marks
it handled, the loop stops at the depth limit, and the quote target answers sync calls.

>>> from examples.compose_handlers import handlers
>>> handlers.targets()
['demo.broken', 'demo.flaky', 'demo.loop', 'demo.on_dead_letter', 'demo.quote']
"""

from __future__ import annotations

import random

from dispatcher.demo import build_handlers

handlers = build_handlers(random.Random())
