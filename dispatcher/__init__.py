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

from dispatcher.admin import (
    Admin,
    DeadLetterFilter,
    DeadLetterNotFound,
    ReplayReport,
    StatusReport,
    parse_duration,
)
from dispatcher.core.errors import (
    DispatcherError,
    InvalidInput,
    LimitExceeded,
    TriggerExists,
    TriggerNotFound,
)
from dispatcher.core.models import BackoffKind, JsonValue, Mutation, Op, RetryPolicy, Trigger
from dispatcher.core.outcomes import (
    DeadLetterReason,
    Failure,
    FailureKind,
    Resolution,
    Success,
)
from dispatcher.core.routing import HTTP_STATUS
from dispatcher.emit import Emitter, Enqueued, emit, emit_many
from dispatcher.flow import FlowControl
from dispatcher.kv import KvEntry, KvStore, KvWrite
from dispatcher.migrate import current_revision, migrate
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

__all__ = [
    "DEFAULT_SCHEMA",
    "HTTP_STATUS",
    "Admin",
    "BackoffKind",
    "DeadLetterFilter",
    "DeadLetterNotFound",
    "DeadLetterReason",
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
    "Op",
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
    "Trigger",
    "TriggerExists",
    "TriggerNotFound",
    "TriggerRegistry",
    "current_revision",
    "emit",
    "emit_many",
    "migrate",
    "parse_duration",
]
