"""The metrics endpoint: ``PYMTA_METRICS_LISTEN`` serves ``/metrics`` (Prometheus text format)
from a thread of the process that owns the server.

One server process (``PYMTA_WORKERS=1``): its metrics (:mod:`pymta.metrics`) count in
memory and this module serves them. Several workers: the supervisor empties
``<state_dir>/metrics``, sets ``PROMETHEUS_MULTIPROC_DIR`` to it before it forks, each worker
turns its metrics on after the fork (:meth:`MetricsExporter.in_worker`: files of its own pid),
and a scrape of the supervisor adds up every worker's files (prometheus-client's
multiprocess mode); a worker that exits is marked dead (its open-sessions gauge stops
counting; its counters keep counting, so totals survive a worker's restart). The queue
gauges are counted at scrape time by the process that serves them
(:class:`pymta.queue.census.QueueCensus`), once, not per worker.

The address is bound when the exporter is made, before anything forks or listens for
mail: a port in use or an address that cannot be bound is a ConfigError naming the
variable. The HTTP thread starts after the first workers are forked (a later restart of a
crashed worker forks beside it: the child only closes its copy of the socket).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from pymta import metrics
from pymta.config.errors import ConfigError
from pymta.config.model import Config, ListenAddress
from pymta.queue.census import QueueCensus

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("pymta.metrics")

VARIABLE = "PYMTA_METRICS_LISTEN"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


SCRAPE_TIMEOUT = 10.0
"""Seconds a scraper has for each read and write; an idle or trickling client is dropped."""
MAX_SCRAPERS = 8
"""Connections served at once; more are closed unanswered (Prometheus scrapes one at a time
per target: anything beyond is not a scraper)."""


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape on stderr (the server's log is for mail)."""

    timeout = SCRAPE_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per connection, at most ``MAX_SCRAPERS`` of them: the endpoint must not
    let anyone who can reach it make threads without bound in the mail server."""

    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(MAX_SCRAPERS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A scraper that timed out or went away is no news; anything else is one log line
        (socketserver's default prints a traceback on stderr, the mail log)."""
        exc = sys.exc_info()[1]
        if not isinstance(exc, TimeoutError | ConnectionError):
            log.warning("metrics endpoint: request from %s failed: %r", client_address[0], exc)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Server6(_Server):
    address_family = socket.AF_INET6


class QueueCollector:
    """``pymta_queue_messages{queue=...}``: the queue census at scrape time (one scrape at a
    time: the census remembers what it read)."""

    def __init__(self, queue_root: str) -> None:
        self.census = QueueCensus(queue_root)
        self._lock = threading.Lock()

    def describe(self) -> list[Metric]:
        return []   # registering must not count the queue

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        with self._lock:
            counts = self.census.count()
        family = GaugeMetricFamily(
            "pymta_queue_messages", "messages in the queue by state: active (not tried yet), "
            "deferred (tried, waiting for a retry), hold, quarantine; unread: not classified "
            "yet (very large queue, read over the next scrapes)", labels=["queue"])
        for state, n in counts.items():
            family.add_metric([state], n)
        yield family


def metrics_dir(config: Config) -> str:
    return os.path.join(config.state_dir, "metrics")


class MetricsExporter:
    """The endpoint of one ``pymta serve`` (module docstring). ``multiprocess``: a supervisor
    whose workers count (else this process counts itself, turned on here)."""

    def __init__(self, config: Config, *, multiprocess: bool) -> None:
        assert config.metrics_listen is not None
        self.address: ListenAddress = config.metrics_listen
        self.multiprocess = multiprocess
        self.directory = metrics_dir(config) if multiprocess else None
        if self.directory is not None:
            _empty_dir(self.directory)
            os.environ[MULTIPROC_ENV] = self.directory   # before any worker makes a metric
        registry = self._registry(os.path.join(config.state_dir, "queue"))
        try:
            self._server = _bind(self.address, _app(registry))
        except ConfigError:
            if not multiprocess:
                metrics.disable()
            raise
        self._thread: threading.Thread | None = None

    def _registry(self, queue_root: str) -> CollectorRegistry:
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        if self.directory is not None:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.directory)
        else:
            registry = metrics.enable()
        registry.register(QueueCollector(queue_root))
        return registry

    @property
    def port(self) -> int:
        """The bound port (the one the kernel chose for port 0)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve scrapes from a daemon thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever,
                                            name="pymta-metrics", daemon=True)
            self._thread.start()

    def in_worker(self) -> None:
        """In a worker just forked: let go of the endpoint's socket (the supervisor serves
        it) and count into this worker's own files."""
        self._server.socket.close()
        metrics.enable()

    def worker_exited(self, pid: int) -> None:
        if self.directory is not None:
            from prometheus_client.multiprocess import mark_process_dead

            mark_process_dead(pid, self.directory)

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
        if not self.multiprocess:
            metrics.disable()


def for_config(config: Config, *, multiprocess: bool = False) -> MetricsExporter | None:
    """The exporter ``config`` asks for (not started), or None when metrics are off."""
    if config.metrics_listen is None:
        return None
    return MetricsExporter(config, multiprocess=multiprocess)


def _bind(address: ListenAddress, app: Callable[..., Iterable[bytes]]) -> _Server:
    server_class = _Server6 if ":" in address.host else _Server
    try:
        return make_server(address.host, address.port, app, server_class=server_class,
                           handler_class=_Quiet)
    except OSError as exc:
        raise ConfigError(f"{VARIABLE}: cannot listen on {address}: "
                          f"{exc.strerror or exc}") from None


def _app(registry: CollectorRegistry) -> Callable[..., Iterable[bytes]]:
    """``/metrics`` (prometheus-client's WSGI app); anything else a 404."""
    from prometheus_client import make_wsgi_app

    served = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") in ("/metrics", "/metrics/"):
            return served(environ, start_response)
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"pymta: metrics are at /metrics\n"]

    return app


def _empty_dir(path: str) -> None:
    """Make ``path`` (0700) and remove the count files a previous run left there."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        for name in os.listdir(path):
            if name.endswith(".db"):
                os.unlink(os.path.join(path, name))
    except OSError as exc:
        raise ConfigError(f"{VARIABLE}: cannot prepare {path}: {exc.strerror or exc}") from None
