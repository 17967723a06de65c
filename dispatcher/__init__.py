"""dispatcher: turn key/value mutations into reliable trigger executions through Postgres.

>>> import dispatcher
>>> await dispatcher.migrate(dsn)
>>> handlers = dispatcher.HandlerRegistry()
>>> @handlers.handler("welcome")
... async def welcome(ctx: dispatcher.HandlerContext) -> dict[str, bool]:
...     return {"sent": True}
>>> await dispatcher.Dispatcher(dsn, handlers).run_until_idle()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Bound at import, because each shares its name with its module: a later
# ``import dispatcher.emit`` elsewhere must not find the package attribute unset and put the
# module there instead of the function. (The ``_sync`` forms come along: the module is loaded.)
from dispatcher.emit import Emitter, Enqueued, emit, emit_many, emit_many_sync, emit_sync
from dispatcher.migrate import current_revision, migrate

if TYPE_CHECKING:
    from dispatcher.admin import (
        Admin,
        DeadLetterFilter,
        DeadLetterNotFound,
        ReplayReport,
        StatusReport,
        parse_duration,
    )
    from dispatcher.capture import Capture, CaptureNotFound, Captures
    from dispatcher.core.errors import (
        BacklogFull,
        DispatcherError,
        InvalidInput,
        LimitExceeded,
        TransactionRequired,
        TriggerExists,
        TriggerNotFound,
    )
    from dispatcher.core.models import (
        BackoffKind,
        Delivery,
        JsonValue,
        Mutation,
        OnDeadLetter,
        Op,
        Ordering,
        RetryPolicy,
        Trigger,
    )
    from dispatcher.core.outcomes import (
        DeadLetterReason,
        Failure,
        FailureKind,
        Resolution,
        Success,
    )
    from dispatcher.core.routing import HTTP_STATUS
    from dispatcher.flow import FlowControl
    from dispatcher.kv import KvEntry, KvStore, KvWrite
    from dispatcher.runtime.dispatcher import (
        Dispatcher,
        DispatcherConfig,
        InvokeTimeout,
        NotRunning,
    )
    from dispatcher.runtime.gate import ExecutionGate
    from dispatcher.runtime.handlers import (
        Executor,
        HandlerContext,
        HandlerRegistry,
        KvHandle,
        PermanentError,
        PermissionDenied,
        RateLimited,
        StoreUnavailable,
    )
    from dispatcher.runtime.inbox import InvokeResult
    from dispatcher.runtime.principals import (
        Principal,
        PrincipalDirectory,
        PrincipalResolver,
        RegisteredByResolver,
    )
    from dispatcher.runtime.stats import Phase, Stats, StatusSnapshot
    from dispatcher.schema import DEFAULT_SCHEMA
    from dispatcher.triggers import TriggerRegistry

# Everything else loads on first use: ``import dispatcher`` (and the pure core) stays light,
# and the runtime, the admin API and their dependencies load only when touched.
_LAZY: dict[str, str] = {
    "Admin": "dispatcher.admin",
    "BacklogFull": "dispatcher.core.errors",
    "BackoffKind": "dispatcher.core.models",
    "DEFAULT_SCHEMA": "dispatcher.schema",
    "DeadLetterFilter": "dispatcher.admin",
    "DeadLetterNotFound": "dispatcher.admin",
    "DeadLetterReason": "dispatcher.core.outcomes",
    "Dispatcher": "dispatcher.runtime.dispatcher",
    "DispatcherConfig": "dispatcher.runtime.dispatcher",
    "DispatcherError": "dispatcher.core.errors",
    "ExecutionGate": "dispatcher.runtime.gate",
    "Executor": "dispatcher.runtime.handlers",
    "Failure": "dispatcher.core.outcomes",
    "FailureKind": "dispatcher.core.outcomes",
    "FlowControl": "dispatcher.flow",
    "Capture": "dispatcher.capture",
    "CaptureNotFound": "dispatcher.capture",
    "Captures": "dispatcher.capture",
    "HTTP_STATUS": "dispatcher.core.routing",
    "HandlerContext": "dispatcher.runtime.handlers",
    "HandlerRegistry": "dispatcher.runtime.handlers",
    "InvalidInput": "dispatcher.core.errors",
    "InvokeResult": "dispatcher.runtime.inbox",
    "InvokeTimeout": "dispatcher.runtime.dispatcher",
    "JsonValue": "dispatcher.core.models",
    "KvEntry": "dispatcher.kv",
    "KvHandle": "dispatcher.runtime.handlers",
    "KvStore": "dispatcher.kv",
    "KvWrite": "dispatcher.kv",
    "LimitExceeded": "dispatcher.core.errors",
    "Mutation": "dispatcher.core.models",
    "NotRunning": "dispatcher.runtime.dispatcher",
    "Op": "dispatcher.core.models",
    "OnDeadLetter": "dispatcher.core.models",
    "Ordering": "dispatcher.core.models",
    "Delivery": "dispatcher.core.models",
    "PermanentError": "dispatcher.runtime.handlers",
    "PermissionDenied": "dispatcher.runtime.handlers",
    "Phase": "dispatcher.runtime.stats",
    "Principal": "dispatcher.runtime.principals",
    "PrincipalDirectory": "dispatcher.runtime.principals",
    "PrincipalResolver": "dispatcher.runtime.principals",
    "RateLimited": "dispatcher.runtime.handlers",
    "RegisteredByResolver": "dispatcher.runtime.principals",
    "ReplayReport": "dispatcher.admin",
    "Resolution": "dispatcher.core.outcomes",
    "RetryPolicy": "dispatcher.core.models",
    "Stats": "dispatcher.runtime.stats",
    "StatusReport": "dispatcher.admin",
    "StatusSnapshot": "dispatcher.runtime.stats",
    "StoreUnavailable": "dispatcher.runtime.handlers",
    "Success": "dispatcher.core.outcomes",
    "TransactionRequired": "dispatcher.core.errors",
    "Trigger": "dispatcher.core.models",
    "TriggerExists": "dispatcher.core.errors",
    "TriggerNotFound": "dispatcher.core.errors",
    "TriggerRegistry": "dispatcher.triggers",
    "parse_duration": "dispatcher.admin",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dispatcher' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "DEFAULT_SCHEMA",
    "HTTP_STATUS",
    "Admin",
    "BacklogFull",
    "BackoffKind",
    "Capture",
    "CaptureNotFound",
    "Captures",
    "DeadLetterFilter",
    "DeadLetterNotFound",
    "DeadLetterReason",
    "Delivery",
    "Dispatcher",
    "DispatcherConfig",
    "DispatcherError",
    "Emitter",
    "Enqueued",
    "ExecutionGate",
    "Executor",
    "Failure",
    "FailureKind",
    "FlowControl",
    "HandlerContext",
    "HandlerRegistry",
    "InvalidInput",
    "InvokeResult",
    "InvokeTimeout",
    "JsonValue",
    "KvEntry",
    "KvHandle",
    "KvStore",
    "KvWrite",
    "LimitExceeded",
    "Mutation",
    "NotRunning",
    "OnDeadLetter",
    "Op",
    "Ordering",
    "PermanentError",
    "PermissionDenied",
    "Phase",
    "Principal",
    "PrincipalDirectory",
    "PrincipalResolver",
    "RateLimited",
    "RegisteredByResolver",
    "ReplayReport",
    "Resolution",
    "RetryPolicy",
    "Stats",
    "StatusReport",
    "StatusSnapshot",
    "StoreUnavailable",
    "Success",
    "TransactionRequired",
    "Trigger",
    "TriggerExists",
    "TriggerNotFound",
    "TriggerRegistry",
    "current_revision",
    "emit",
    "emit_many",
    "emit_many_sync",
    "emit_sync",
    "migrate",
    "parse_duration",
]
