"""Prometheus metrics for a dispatcher (extra ``metrics``: ``pip install 'dispatcher[metrics]'``).

Two sources feed one registry, and neither queries the database when Prometheus scrapes:

- :class:`PrometheusRecorder` is the dispatcher's :class:`~dispatcher.runtime.stats.Recorder`:
  it receives claim and execution timings as they happen, and the backlog the dispatcher
  samples every ``DispatcherConfig.backlog_interval`` seconds.
- The collector behind :meth:`PrometheusRecorder.watch` reads each watched dispatcher's
  in-memory counters and status at scrape time.

Labels come from closed sets only (outcome, dead-letter reason, resolution, phase): never an
id, a key or a scope. Trigger names label two counters only when asked
(``PrometheusRecorder(per_trigger=N)``), the first N names seen, the rest as ``other``.

The HTTP server also answers ``/healthz`` (the process is alive) and ``/readyz`` (claims make
progress: :meth:`PrometheusRecorder.readiness`), for Kubernetes probes.

>>> from dispatcher.metrics import instrument, start_metrics_server
>>> d = Dispatcher(dsn, handlers)
>>> instrument(d)                              # the default registry
>>> server = start_metrics_server(9108)        # http://127.0.0.1:9108/metrics
>>> await d.run()

``dispatcher run --metrics-port 9108`` does the same from the command line.
"""

from __future__ import annotations

try:
    import prometheus_client  # noqa: F401  (checked here, before any part imports it)
except ImportError as exc:
    raise ImportError(
        "dispatcher.metrics needs prometheus_client, which is not installed; "
        "install the extra with: pip install 'dispatcher[metrics]'",
        name="prometheus_client",
    ) from exc

# The parts: the scrape-time collector (collector), the recorder fed by the dispatcher
# (recorder) and the HTTP endpoint (server). Every name stays importable from here.
from dispatcher.metrics.collector import _COUNTERS as _COUNTERS
from dispatcher.metrics.collector import _RESOLUTIONS as _RESOLUTIONS
from dispatcher.metrics.collector import EXPORTED_STATS as EXPORTED_STATS
from dispatcher.metrics.collector import NAMESPACE as NAMESPACE
from dispatcher.metrics.collector import OTHER as OTHER
from dispatcher.metrics.collector import OUTCOMES as OUTCOMES
from dispatcher.metrics.collector import REASONS as REASONS
from dispatcher.metrics.collector import _Counter as _Counter
from dispatcher.metrics.collector import _families as _families
from dispatcher.metrics.collector import _Observable as _Observable
from dispatcher.metrics.collector import _read as _read
from dispatcher.metrics.collector import _Reading as _Reading
from dispatcher.metrics.collector import _StatusCollector as _StatusCollector
from dispatcher.metrics.recorder import BATCH_BUCKETS as BATCH_BUCKETS
from dispatcher.metrics.recorder import CLAIM_BUCKETS as CLAIM_BUCKETS
from dispatcher.metrics.recorder import EXECUTION_BUCKETS as EXECUTION_BUCKETS
from dispatcher.metrics.recorder import PrometheusRecorder as PrometheusRecorder
from dispatcher.metrics.recorder import instrument as instrument
from dispatcher.metrics.recorder import recorder_for as recorder_for
from dispatcher.metrics.server import MetricsServer as MetricsServer
from dispatcher.metrics.server import start_metrics_server as start_metrics_server

__all__ = [
    "OUTCOMES",
    "MetricsServer",
    "PrometheusRecorder",
    "instrument",
    "start_metrics_server",
]
