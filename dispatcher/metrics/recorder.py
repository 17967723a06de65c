"""The recording half of :mod:`dispatcher.metrics`: :class:`PrometheusRecorder`, fed by the
dispatcher's recorder hook as claims and executions happen, and :func:`instrument`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from dispatcher.metrics.collector import NAMESPACE, OTHER, OUTCOMES, _Observable, _StatusCollector
from dispatcher.runtime.stats import Recorder

if TYPE_CHECKING:
    from dispatcher.runtime.dispatcher import Dispatcher

CLAIM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)
EXECUTION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


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
        self._claim_seconds = _histogram(
            reg, "claim_duration_seconds", "Time one claim statement took.", claim_buckets
        )
        self._claim_rows = _histogram(
            reg, "claim_batch_size", "Rows one claim statement returned.", batch_buckets
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
        self._backlog_due = _gauge(
            reg,
            "backlog_due_rows",
            "Outbox rows due now, at the latest backlog sample (counted up to 100000).",
        )
        self._backlog_oldest = _gauge(
            reg,
            "backlog_oldest_due_seconds",
            "How long the oldest due row has waited, at the latest backlog sample.",
        )
        self._backlog_sampled = _gauge(
            reg,
            "backlog_sample_timestamp_seconds",
            "Unix time of the latest backlog sample (stale when the sampler is stuck).",
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


def _histogram(
    registry: CollectorRegistry, name: str, help: str, buckets: Sequence[float]
) -> Histogram:
    return Histogram(name, help, namespace=NAMESPACE, buckets=buckets, registry=registry)


def _gauge(registry: CollectorRegistry, name: str, help: str) -> Gauge:
    return Gauge(name, help, namespace=NAMESPACE, registry=registry)


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
