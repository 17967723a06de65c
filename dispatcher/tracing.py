"""OpenTelemetry tracing, off unless enabled (extra ``otel``: ``pip install
'dispatcher[otel]'``).

With tracing on, ``emit`` (every host, single and bulk) stores the caller's current trace
context, as a W3C ``traceparent``, on each outbox row it enqueues, and the dispatcher runs
every execution of the row in a span that continues that trace: one span per attempt (a
retry is a new span of the same trace), with the trigger, scope, attempt, depth and outcome
as attributes, a failure's message as the span's error status, and an event when the row is
dead-lettered. The span is current while the handler runs, so the handler's own spans nest
under it. A dead letter keeps the context: its handlers' executions and a replay are spans
of the same trace. ``Dispatcher.invoke`` opens a span around the call, which its execution
continues.

>>> from opentelemetry.sdk.trace import TracerProvider
>>> dispatcher.tracing.enable(TracerProvider())    # or enable(): the global provider
>>> dispatcher.tracing.disable()

Nothing here imports OpenTelemetry until :func:`enable` is called, and with tracing off the
hot path pays one check of a module variable per emit and per execution.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispatcher.core.errors import DispatcherError

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

__all__ = [
    "ExecutionSpan",
    "current_traceparent",
    "disable",
    "enable",
    "enabled",
    "execution_span",
    "invoke_span",
]

INSTRUMENTATION = "dispatcher"
INSTALL_HINT = "tracing needs the OpenTelemetry API: pip install 'dispatcher[otel]'"


@dataclass
class _State:
    tracer: Tracer | None = None


_STATE = _State()


def enable(tracer_provider: TracerProvider | None = None) -> None:
    """Turn tracing on, with ``tracer_provider`` (default: OpenTelemetry's global one, as the
    application configured it). Raises :class:`DispatcherError` naming the extra when the
    OpenTelemetry API is not installed."""
    try:
        from opentelemetry import trace
    except ImportError as exc:
        raise DispatcherError(INSTALL_HINT) from exc
    from importlib.metadata import PackageNotFoundError, version

    try:
        ours = version("dispatcher")
    except PackageNotFoundError:
        ours = None
    _STATE.tracer = trace.get_tracer(INSTRUMENTATION, ours, tracer_provider=tracer_provider)


def disable() -> None:
    """Turn tracing off: nothing is recorded or stored from the next emit and execution."""
    _STATE.tracer = None


def enabled() -> bool:
    return _STATE.tracer is not None


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the caller's current span, or None (tracing off, or no
    valid span is current)."""
    if _STATE.tracer is None:
        return None
    return _traceparent_of_current()


def _traceparent_of_current() -> str | None:
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def _parent(traceparent: str | None) -> Any:
    """The OpenTelemetry context a stored ``traceparent`` names (None: a new trace). A
    malformed one (written by another client) starts a new trace rather than failing."""
    if not traceparent:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator().extract({"traceparent": traceparent})


class ExecutionSpan:
    """One execution's span, current while the handler runs (see :func:`execution_span`)."""

    def __init__(self, span: Span) -> None:
        self._span = span

    def outcome(self, outcome: str, decision: str, error: str | None) -> None:
        """What the attempt ended in (``success`` or a failure kind) and what was decided
        (``complete``, ``retry``, ``dead_letter``, …); ``error`` sets the error status."""
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("dispatcher.outcome", outcome)
        self._span.set_attribute("dispatcher.decision", decision)
        if error is not None:
            self._span.set_status(Status(StatusCode.ERROR, error))
        if decision == "dead_letter":
            self._span.add_event("dispatcher.dead_lettered", {"dispatcher.reason": outcome})


@contextlib.contextmanager
def execution_span(
    traceparent: str | None, trigger: str, attributes: Mapping[str, str | int]
) -> Iterator[ExecutionSpan | None]:
    """The span of one execution, continuing ``traceparent``'s trace; yields None when
    tracing is off."""
    tracer = _STATE.tracer
    if tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    with tracer.start_as_current_span(
        f"execute {trigger}",
        context=_parent(traceparent),
        kind=SpanKind.CONSUMER,
        attributes=dict(attributes),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        yield ExecutionSpan(span)


@contextlib.contextmanager
def invoke_span(trigger_id: int) -> Iterator[None]:
    """A span around a synchronous call (a child of the caller's current span), current
    while the call writes its row; a no-op when tracing is off."""
    tracer = _STATE.tracer
    if tracer is None:
        yield
        return
    from opentelemetry.trace import SpanKind

    with tracer.start_as_current_span(
        "invoke", kind=SpanKind.PRODUCER, attributes={"dispatcher.trigger_id": trigger_id}
    ):
        yield
