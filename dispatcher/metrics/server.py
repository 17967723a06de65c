"""The exposition half of :mod:`dispatcher.metrics`: ``/metrics``, ``/healthz`` and ``/readyz``
over HTTP from a background thread."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from dispatcher.core.health import Readiness
from dispatcher.metrics.recorder import recorder_for

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from dispatcher.metrics.recorder import PrometheusRecorder


@dataclass(slots=True)
class MetricsServer:
    """The HTTP endpoint serving ``/metrics``, ``/healthz`` and ``/readyz`` from a background
    thread; :meth:`close` it.

    >>> with start_metrics_server(0) as server:   # port 0: any free port
    ...     print(server.url)
    http://127.0.0.1:41234/metrics
    """

    host: str
    port: int
    _server: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/metrics"

    def close(self) -> None:
        """Stop serving and free the port (blocks for up to half a second)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Server(ThreadingMixIn, WSGIServer):
    """One thread a request, so a slow scrape never holds a probe; threads do not keep the
    process alive."""

    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Probes every few seconds would flood stderr; the library writes nothing there."""


def _server_class(host: str) -> type[_Server]:
    """A server of the address family ``host`` resolves to (IPv6 literals and names too)."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family = infos[0][0] if infos else socket.AF_INET

    class Server(_Server):
        address_family = family

    return Server


def health_app(
    registry: CollectorRegistry, readiness: Callable[[], Readiness] | None
) -> WSGIApplication:
    """The WSGI application: ``/metrics`` (the registry), ``/healthz`` (200 while the
    process answers), ``/readyz`` (200 when ``readiness()`` says ready, else 503; the reason
    in the body either way; 503 when there is nothing to judge)."""
    metrics = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok")
        if path == "/readyz":
            if readiness is None:
                return _text(
                    start_response, "503 Service Unavailable", "not ready: no dispatcher watched"
                )
            verdict = readiness()
            if verdict.ready:
                return _text(start_response, "200 OK", f"ready: {verdict.reason}")
            return _text(start_response, "503 Service Unavailable", f"not ready: {verdict.reason}")
        if path in ("/metrics", "/"):
            scraped: Iterable[bytes] = metrics(environ, start_response)
            return scraped
        return _text(start_response, "404 Not Found", "not found: /metrics, /healthz, /readyz")

    return app


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = (body + "\n").encode()
    start_response(
        status,
        [
            ("Content-Type", "text/plain; charset=utf-8"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ],
    )
    return [data]


def start_metrics_server(
    port: int,
    host: str = "127.0.0.1",
    registry: CollectorRegistry | None = None,
    *,
    recorder: PrometheusRecorder | None = None,
) -> MetricsServer:
    """Serve ``registry`` (default: the global one) at ``http://host:port/metrics``, and the
    probes ``/healthz`` and ``/readyz``.

    ``/readyz`` asks ``recorder`` (default: the :class:`PrometheusRecorder` created on the
    registry) for :meth:`~PrometheusRecorder.readiness`. Binds to the loopback interface
    unless told otherwise: expose it deliberately (e.g. ``host="0.0.0.0"`` inside a
    container). Raises :class:`OSError` when the port is taken.

    >>> server = start_metrics_server(9108)
    >>> server.close()
    """
    if registry is None:
        registry = REGISTRY if recorder is None else recorder.registry
    elif recorder is not None and recorder.registry is not registry:
        raise ValueError("recorder reports to another registry than the one given")
    found = recorder if recorder is not None else recorder_for(registry)
    app = health_app(registry, None if found is None else found.readiness)
    server = make_server(host, port, app, _server_class(host), _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="dispatcher-metrics")
    thread.start()
    return MetricsServer(host, int(server.server_address[1]), server, thread)
