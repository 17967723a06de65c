"""The recording half of :mod:`dispatcher.metrics`: :class:`PrometheusRecorder`, fed by the
dispatcher's recorder hook as claims and executions happen, and :func:`instrument`."""

from __future__ import annotations

import platform
import time
import weakref
from collections.abc import Iterable, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

from dispatcher.core.health import DEFAULT_READY_WINDOW, Readiness, combined, process_readiness
from dispatcher.metrics.collector import (
    NAMESPACE,
    OTHER,
    OUTCOMES,
    _Observable,
    _read,
    _StatusCollector,
)
from dispatcher.runtime.config import positive
from dispatcher.runtime.stats import Recorder

if TYPE_CHECKING:
    from dispatcher.runtime.dispatcher import Dispatcher

CLAIM_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (0, 1, 2, 5, 10, 25, 50, 100, 250, 500, 1000)
EXECUTION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip

# The recorder of each registry (one per registry: metric names are registered once), so that
# start_metrics_server(registry=...) finds the readiness of what the registry exports. Weak
# both ways: a recorder refers to its registry, so a strong value would keep both forever.
_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, weakref.ref[PrometheusRecorder]] = (
    weakref.WeakKeyDictionary()
)


def recorder_for(registry: CollectorRegistry) -> PrometheusRecorder | None:
    """The live :class:`PrometheusRecorder` created on ``registry``, if any."""
    ref = _BY_REGISTRY.get(registry)
    return None if ref is None else ref()


def _package_version() -> str:
    try:
        return version("dispatcher")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


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

    ``per_trigger``: how many trigger names get their own ``trigger`` label in
    ``dispatcher_trigger_executions_total`` and ``dispatcher_trigger_dead_letters_total``
    (the first names seen; later ones share ``other``); 0, the default, exports neither.
    ``ready_window``: seconds without a successful claim, while rows are due, after which
    :meth:`readiness` (``/readyz``, ``dispatcher_ready``) says not ready.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        claim_buckets: Sequence[float] = CLAIM_BUCKETS,
        batch_buckets: Sequence[float] = BATCH_BUCKETS,
        execution_buckets: Sequence[float] = EXECUTION_BUCKETS,
        per_trigger: int = 0,
        ready_window: float = DEFAULT_READY_WINDOW,
    ) -> None:
        if not isinstance(per_trigger, int) or isinstance(per_trigger, bool) or per_trigger < 0:
            raise ValueError(f"per_trigger must be an int >= 0, got {per_trigger!r}")
        positive("ready_window", ready_window)
        self.registry: CollectorRegistry = REGISTRY if registry is None else registry
        self.per_trigger = per_trigger
        self.ready_window = float(ready_window)
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
        self._blocked_keys = _gauge(
            reg,
            "blocked_keys",
            "Keys of ordered triggers held by a dead head (dispatcher keys blocked), at the "
            "latest backlog sample.",
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
        build = Gauge(
            "build_info",
            "Always 1: the dispatcher version and the Python version, as labels.",
            ["version", "python"],
            namespace=NAMESPACE,
            registry=reg,
        )
        build.labels(version=_package_version(), python=platform.python_version()).set(1)
        # The latest backlog sample: (time.monotonic() when taken, due rows).
        self._sample: tuple[float, int] | None = None
        self._trigger_names: set[str] = set()
        self._other_created = False
        self._trigger_executions: Counter | None = None
        self._trigger_dead_letters: Counter | None = None
        if per_trigger:
            self._trigger_executions = Counter(
                "trigger_executions",
                f"Executions finished, by trigger name (the first {per_trigger} names seen; "
                "later ones as other) and outcome.",
                ["trigger", "outcome"],
                namespace=NAMESPACE,
                registry=reg,
            )
            self._trigger_dead_letters = Counter(
                "trigger_dead_letters",
                "Executions whose row was decided to be dead-lettered, by trigger name "
                "(capped as trigger_executions_total).",
                ["trigger"],
                namespace=NAMESPACE,
                registry=reg,
            )
        self._collector = _StatusCollector()
        reg.register(self._collector)
        reg.register(_ReadyCollector(self))
        _BY_REGISTRY[reg] = weakref.ref(self)

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
        self._sample = (time.monotonic(), due)

    def blocked_keys(self, count: int) -> None:
        self._blocked_keys.set(count)

    def trigger_execution(self, trigger: str, outcome: str, dead_lettered: bool) -> None:
        executions, dead = self._trigger_executions, self._trigger_dead_letters
        if executions is None or dead is None:
            return
        label = self._trigger_label(trigger, executions, dead)
        executions.labels(trigger=label, outcome=outcome if outcome in OUTCOMES else OTHER).inc()
        if dead_lettered:
            dead.labels(trigger=label).inc()

    def _trigger_label(self, trigger: str, executions: Counter, dead: Counter) -> str:
        """The name itself while fewer than ``per_trigger`` names have one, else ``other``.
        A name's series are all created at once, at zero, so increase() sees its first
        failure."""
        if trigger in self._trigger_names:
            return trigger
        if len(self._trigger_names) >= self.per_trigger:
            if self._other_created:
                return OTHER
            self._other_created = True
            trigger = OTHER
        else:
            self._trigger_names.add(trigger)
        for outcome in OUTCOMES:
            executions.labels(trigger=trigger, outcome=outcome)
        dead.labels(trigger=trigger)
        return trigger

    # ----- readiness -----

    def readiness(self) -> Readiness:
        """Whether every watched dispatcher's claims make progress: a claim succeeded within
        ``ready_window`` seconds, or the latest backlog sample, taken within it, found
        nothing due (:func:`dispatcher.core.health.process_readiness`)."""
        now = time.monotonic()
        sample = self._sample
        since_sample = None if sample is None else now - sample[0]
        due = None if sample is None else sample[1]
        verdicts = []
        for target in self._collector.watched():
            status = _read(target).status
            claimed = status.last_claim_monotonic
            verdicts.append(
                process_readiness(
                    phase=status.phase.value,
                    since_claim=None if claimed is None else now - claimed,
                    due=due,
                    since_sample=since_sample,
                    window=self.ready_window,
                )
            )
        return combined(verdicts)

    # ----- scrape-time status -----

    def watch(self, dispatcher: _Observable) -> None:
        """Export ``dispatcher``'s counters and status gauges from this recorder's registry.

        >>> recorder.watch(d)   # d = Dispatcher(dsn, handlers, recorder=recorder)
        """
        self._collector.add(dispatcher)

    def unwatch(self, dispatcher: _Observable) -> None:
        """Stop exporting ``dispatcher`` (its counts leave the sums: a counter reset)."""
        self._collector.remove(dispatcher)

    @property
    def watching(self) -> bool:
        """Whether any dispatcher is watched."""
        return bool(self._collector.watched())


class _ReadyCollector:
    """``dispatcher_ready``: the verdict of :meth:`PrometheusRecorder.readiness` at scrape
    time, for alerts."""

    def __init__(self, recorder: PrometheusRecorder) -> None:
        self._recorder = weakref.ref(recorder)

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        recorder = self._recorder()
        family = self._family()
        if recorder is not None and recorder.watching:
            family.add_metric([], 1.0 if recorder.readiness().ready else 0.0)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            f"{NAMESPACE}_ready",
            "1 while claims make progress (a claim succeeded within the ready window, or "
            "nothing was due at a recent backlog sample), else 0; absent with no dispatcher.",
        )


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
