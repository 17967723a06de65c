"""Prometheus metrics for a dispatcher (extra ``metrics``: ``pip install 'dispatcher[metrics]'``).

Two sources feed one registry, and neither queries the database when Prometheus scrapes:

- :class:`PrometheusRecorder` is the dispatcher's :class:`~dispatcher.runtime.stats.Recorder`:
  it receives claim and execution timings as they happen, and the backlog the dispatcher
  samples every ``DispatcherConfig.backlog_interval`` seconds.
- The collector behind :meth:`PrometheusRecorder.watch` reads each watched dispatcher's
  in-memory counters and status at scrape time.

Labels come from closed sets only (outcome, dead-letter reason, resolution, phase): never an
id, a key, a scope or a trigger name.

>>> from dispatcher.metrics import instrument, start_metrics_server
>>> d = Dispatcher(dsn, handlers)
>>> instrument(d)                              # the default registry
>>> server = start_metrics_server(9108)        # http://127.0.0.1:9108/metrics
>>> await d.run()

``dispatcher run --metrics-port 9108`` does the same from the command line.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client import start_http_server as _start_http_server
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
except ImportError as exc:
    raise ImportError(
        "dispatcher.metrics needs prometheus_client, which is not installed; "
        "install the extra with: pip install 'dispatcher[metrics]'",
        name="prometheus_client",
    ) from exc

from dispatcher.core.outcomes import DeadLetterReason, FailureKind
from dispatcher.runtime.stats import Phase, Recorder, Stats, StatusSnapshot

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from dispatcher.runtime.dispatcher import Dispatcher

__all__ = [
    "OUTCOMES",
    "MetricsServer",
    "PrometheusRecorder",
    "instrument",
    "start_metrics_server",
]

NAMESPACE = "dispatcher"

# Execution outcomes: ``success`` or a failure kind. Anything else (a bug) is counted as
# ``other`` so that a label value can never come from outside this set.
OUTCOMES: tuple[str, ...] = ("success", *(kind.value for kind in FailureKind))
REASONS: tuple[str, ...] = tuple(reason.value for reason in DeadLetterReason)
OTHER = "other"

CLAIM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)
EXECUTION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Counter:
    field: str  # the Stats field
    name: str  # without the namespace and the ``_total`` suffix
    help: str


# Every Stats field, exported under a stable name (a unit test checks none is missing).
# handled and handler_failed share one family, labelled by resolution.
_COUNTERS: tuple[_Counter, ...] = (
    _Counter("claims", "claims", "Claim statements run."),
    _Counter("claimed_rows", "claimed_rows", "Outbox rows claimed (leased)."),
    _Counter("executed", "executions_started", "Executions started (after admission)."),
    _Counter("succeeded", "completed", "Async rows completed successfully and removed."),
    _Counter("retried", "retries", "Failed attempts rescheduled with backoff (attempt used)."),
    _Counter(
        "rescheduled",
        "rescheduled",
        "Rows offered again without using an attempt (rate limited, gate saturated).",
    ),
    _Counter(
        "depth_exceeded",
        "depth_exceeded",
        "Rows stopped at the trigger depth limit (kept in depth_cutoffs).",
    ),
    _Counter(
        "gate_saturated", "gate_saturated", "Claimed rows that found the execution gate full."
    ),
    _Counter("stale", "stale_results", "Results dropped because the lease was lost (fenced)."),
    _Counter("replies", "sync_replies", "Synchronous replies delivered to a waiting caller."),
    _Counter(
        "abandoned",
        "abandoned_executions",
        "Synchronous results written to abandoned_executions (caller gone).",
    ),
    _Counter(
        "released",
        "leases_released",
        "Leases given back unexecuted (shutdown, a trigger held back by this process).",
    ),
    _Counter(
        "executions_abandoned",
        "executions_abandoned",
        "Executions that would not stop at shutdown: left running, leases left to expire.",
    ),
    _Counter("parked", "parked", "Rows parked (kept, unclaimed) instead of dead-lettered."),
    _Counter("unparked", "unparked", "Parked rows released to run again."),
    _Counter("breakers_opened", "breakers_opened", "Trigger circuit breakers opened."),
    _Counter("breakers_closed", "breakers_closed", "Trigger circuit breakers closed again."),
    _Counter(
        "budget_exceeded",
        "budget_exceeded",
        "Rows not enqueued because their root event's execution budget was spent.",
    ),
    _Counter("db_errors", "db_errors", "Database or connection errors (never handler failures)."),
    _Counter(
        "undecodable",
        "undecodable_rows",
        "Claimed rows that could not be decoded (dead-lettered as undecodable).",
    ),
    _Counter(
        "unstorable",
        "unstorable_outcomes",
        "Outcomes Postgres refused to store (their rows dead-lettered as unstorable).",
    ),
    _Counter(
        "held",
        "held_rows",
        "Claimed rows given back unrun: their trigger was held by this process (breaker "
        "tripped, rate limit, cautious window full).",
    ),
    _Counter(
        "rate_limit_holds",
        "rate_limit_holds",
        "Triggers held by a target's rate limit (all their rows, in every process).",
    ),
    _Counter(
        "retry_after_clamped",
        "retry_after_clamped",
        "Retry-After values longer than max_retry_after, cut to it.",
    ),
    _Counter(
        "internal_errors",
        "internal_errors",
        "Errors of the dispatcher's own code caught in the poll loop or an execution.",
    ),
)
_RESOLUTIONS: tuple[tuple[str, str], ...] = (
    ("handled", "handled"),
    ("handler_failed", "handler_failed"),
)

EXPORTED_STATS: frozenset[str] = frozenset(
    [c.field for c in _COUNTERS]
    + [f for f, _ in _RESOLUTIONS]
    # dispatcher_dead_letters_total{reason}: by reason, summing to dead_lettered.
    + ["dead_lettered", "dead_letters_by_reason"]
)
"""The :class:`~dispatcher.runtime.stats.Stats` fields the collector exports."""


class _Observable(Protocol):
    stats: Stats

    def status(self) -> StatusSnapshot: ...


@dataclass(frozen=True, slots=True)
class _Reading:
    status: StatusSnapshot
    dead_letters_by_reason: dict[str, int]


def _read(target: _Observable) -> _Reading:
    # A scrape runs in the HTTP server's thread while the event loop updates the counters.
    # Reading an int is atomic and dict() copies the reason counter in one C-level step, but
    # status() deep-copies the stats in Python: an insert racing it (the first dead letter
    # of a reason) can make it raise once; the next read sees the settled dictionary.
    try:
        status = target.status()
    except RuntimeError:  # "dictionary changed size during iteration"
        status = target.status()
    return _Reading(status, dict(target.stats.dead_letters_by_reason))


def _families(include: Sequence[_Reading] | None) -> Iterator[Metric]:
    """The scrape-time families; values summed over ``include`` (None: names only)."""
    readings = include or ()
    snaps = [r.status for r in readings]
    for c in _COUNTERS:
        family = CounterMetricFamily(f"{NAMESPACE}_{c.name}", c.help)
        if include is not None:
            family.add_metric([], sum(s.stats.get(c.field, 0) for s in snaps))
        yield family
    dead = CounterMetricFamily(
        f"{NAMESPACE}_dead_letters",
        "Rows moved to dead_letters, by reason.",
        labels=["reason"],
    )
    if include is not None:
        by_reason = dict.fromkeys(REASONS, 0)
        for r in readings:
            for reason, n in r.dead_letters_by_reason.items():
                label = reason if reason in by_reason else OTHER
                by_reason[label] = by_reason.get(label, 0) + n
        for reason, n in by_reason.items():
            dead.add_metric([reason], n)
    yield dead
    resolved = CounterMetricFamily(
        f"{NAMESPACE}_dead_letter_handler_results",
        "Dead-letter handler runs by the resolution they wrote.",
        labels=["resolution"],
    )
    if include is not None:
        for stat, label in _RESOLUTIONS:
            resolved.add_metric([label], sum(s.stats.get(stat, 0) for s in snaps))
    yield resolved

    def gauge(name: str, help: str, value: float | None) -> GaugeMetricFamily:
        family = GaugeMetricFamily(f"{NAMESPACE}_{name}", help)
        if include is not None and value is not None:
            family.add_metric([], value)
        return family

    yield gauge("in_flight", "Executions running now.", sum(s.in_flight for s in snaps))
    yield gauge(
        "gate_capacity", "Execution gate permits in total.", sum(s.gate_capacity for s in snaps)
    )
    yield gauge("gate_free", "Execution gate permits free now.", sum(s.gate_free for s in snaps))
    yield gauge(
        "consecutive_db_failures",
        "Database errors since the last success (0 when healthy).",
        max((s.consecutive_failures for s in snaps), default=0),
    )
    claims = [s.last_claim_at.timestamp() for s in snaps if s.last_claim_at is not None]
    yield gauge(
        "last_claim_timestamp_seconds",
        "Unix time of the latest successful claim statement (absent before the first).",
        max(claims) if claims else None,
    )
    phase = GaugeMetricFamily(
        f"{NAMESPACE}_phase",
        "Dispatchers in each phase (1 for the current phase of a single dispatcher).",
        labels=["phase"],
    )
    if include is not None:
        for p in Phase:
            phase.add_metric([p.value], sum(1 for s in snaps if s.phase is p))
    yield phase


class _StatusCollector:
    """Exports the watched dispatchers' counters and status; in memory, no database."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watched: list[_Observable] = []

    def add(self, target: _Observable) -> None:
        with self._lock:
            if not any(w is target for w in self._watched):
                self._watched.append(target)

    def remove(self, target: _Observable) -> None:
        with self._lock:
            self._watched = [w for w in self._watched if w is not target]

    def describe(self) -> Iterable[Metric]:
        return list(_families(None))

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            watched = list(self._watched)
        if not watched:
            return []
        return list(_families([_read(w) for w in watched]))


class PrometheusRecorder(Recorder):
    """Prometheus histograms and gauges fed by the dispatcher's recorder hook, plus the
    counters and status of every dispatcher passed to :meth:`watch`, read at scrape time.

    Create one per registry (metric names are registered once); one recorder may serve
    several dispatchers of a process, whose counters are then summed.

    >>> registry = CollectorRegistry()
    >>> recorder = PrometheusRecorder(registry)
    >>> d = Dispatcher(dsn, handlers, recorder=recorder)
    >>> recorder.watch(d)
    >>> prometheus_client.generate_latest(registry)  # dispatcher_claims_total, ...
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        claim_buckets: Sequence[float] = CLAIM_BUCKETS,
        batch_buckets: Sequence[float] = BATCH_BUCKETS,
        execution_buckets: Sequence[float] = EXECUTION_BUCKETS,
    ) -> None:
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        reg = self.registry
        self._claim_seconds = Histogram(
            "claim_duration_seconds",
            "Time one claim statement took.",
            namespace=NAMESPACE,
            buckets=claim_buckets,
            registry=reg,
        )
        self._claim_rows = Histogram(
            "claim_batch_size",
            "Rows one claim statement returned.",
            namespace=NAMESPACE,
            buckets=batch_buckets,
            registry=reg,
        )
        self._execution_seconds = Histogram(
            "execution_duration_seconds",
            "Time one execution took, by outcome (success or the failure kind).",
            ["outcome"],
            namespace=NAMESPACE,
            buckets=execution_buckets,
            registry=reg,
        )
        self._executions = Counter(
            "executions",
            "Executions finished, by outcome (success or the failure kind).",
            ["outcome"],
            namespace=NAMESPACE,
            registry=reg,
        )
        self._backlog_due = Gauge(
            "backlog_due_rows",
            "Outbox rows due now, at the latest backlog sample (counted up to 100000).",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._backlog_oldest = Gauge(
            "backlog_oldest_due_seconds",
            "How long the oldest due row has waited, at the latest backlog sample.",
            namespace=NAMESPACE,
            registry=reg,
        )
        self._backlog_sampled = Gauge(
            "backlog_sample_timestamp_seconds",
            "Unix time of the latest backlog sample (stale when the sampler is stuck).",
            namespace=NAMESPACE,
            registry=reg,
        )
        # Every label value exists from the start, so rate() and absent() behave.
        for outcome in OUTCOMES:
            self._execution_seconds.labels(outcome=outcome)
            self._executions.labels(outcome=outcome)
        self._collector = _StatusCollector()
        reg.register(self._collector)

    # ----- Recorder -----

    def claim(self, seconds: float, rows: int) -> None:
        self._claim_seconds.observe(seconds)
        self._claim_rows.observe(rows)

    def execution(self, seconds: float, outcome: str) -> None:
        label = outcome if outcome in OUTCOMES else OTHER
        self._execution_seconds.labels(outcome=label).observe(seconds)
        self._executions.labels(outcome=label).inc()

    def backlog(self, due: int, oldest_due_seconds: float) -> None:
        self._backlog_due.set(due)
        self._backlog_oldest.set(oldest_due_seconds)
        self._backlog_sampled.set(time.time())

    # ----- scrape-time status -----

    def watch(self, dispatcher: _Observable) -> None:
        """Export ``dispatcher``'s counters and status gauges from this recorder's registry.

        >>> recorder.watch(d)   # d = Dispatcher(dsn, handlers, recorder=recorder)
        """
        self._collector.add(dispatcher)

    def unwatch(self, dispatcher: _Observable) -> None:
        """Stop exporting ``dispatcher`` (its counts leave the sums: a counter reset)."""
        self._collector.remove(dispatcher)


def instrument(
    dispatcher: Dispatcher,
    registry: CollectorRegistry | None = None,
    *,
    recorder: PrometheusRecorder | None = None,
) -> PrometheusRecorder:
    """Make ``dispatcher`` report to Prometheus; return the recorder.

    Creates a :class:`PrometheusRecorder` on ``registry`` (default: prometheus_client's global
    registry), installs it as the dispatcher's recorder and watches the dispatcher. Pass
    ``recorder`` instead of ``registry`` to add a second dispatcher to an existing recorder.
    Call it before :meth:`~dispatcher.Dispatcher.run`.

    >>> recorder = instrument(Dispatcher(dsn, handlers), CollectorRegistry())
    """
    if recorder is None:
        recorder = PrometheusRecorder(registry)
    elif registry is not None and registry is not recorder.registry:
        raise ValueError("pass either registry or recorder, not both")
    dispatcher.recorder = recorder
    recorder.watch(dispatcher)
    return recorder


@dataclass(slots=True)
class MetricsServer:
    """The HTTP endpoint serving ``/metrics`` from a background thread; :meth:`close` it.

    >>> with start_metrics_server(0) as server:   # port 0: any free port
    ...     print(server.url)
    http://127.0.0.1:41234/metrics
    """

    host: str
    port: int
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port (blocks for up to half a second)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_metrics_server(
    port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None
) -> MetricsServer:
    """Serve ``registry`` (default: the global one) at ``http://host:port/metrics``.

    Binds to the loopback interface unless told otherwise: expose it deliberately (e.g.
    ``host="0.0.0.0"`` inside a container). Raises :class:`OSError` when the port is taken.

    >>> server = start_metrics_server(9108)
    >>> server.close()
    """
    server, thread = _start_http_server(
        port, addr=host, registry=REGISTRY if registry is None else registry
    )
    return MetricsServer(host, int(server.server_address[1]), server, thread)
