"""The exposition half of :mod:`dispatcher.metrics`: ``/metrics`` over HTTP from a background
thread."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import start_http_server as _start_http_server

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer


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
