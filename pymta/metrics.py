"""Prometheus metrics: every metric object of the server, and the tiny functions the core calls.

Each call site is one line (``metrics.delivered(...)``) and costs one function call and one
test while metrics are off, which is the default and what an embedder (``pymta.MTA`` in its
own process) gets unless it calls :func:`enable`: the hot path does not move. ``pymta serve``
turns them on with ``PYMTA_METRICS_LISTEN`` (:mod:`pymta.exporter` serves them). prometheus-
client is imported only then.

With several worker processes each counts in its own files (prometheus-client's
multiprocess mode: ``PROMETHEUS_MULTIPROC_DIR`` is set by the supervisor before it forks, and
each worker calls :func:`enable` after the fork, so each writes files of its own pid); the
supervisor adds them up at scrape time, so every worker is counted once. One ``inc()`` costs
about 1.2 µs there (a lock and a write into a memory-mapped file), 0.4 µs in one process;
a message that is received and delivered costs about ten of them.

Label values are small fixed sets (never an address, a host or a domain), so the number of
series stays bounded whatever the traffic. The names and what they count are listed in
README.md ("Metrics") and in :data:`DESCRIPTIONS`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pymta.types import Reply

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

# Buckets: seconds from a client's final dot to our 250 (a group commit is ~1-10 ms here).
EOD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
               30.0, 60.0)
# One delivery agent call (a maildir write, an SMTP/LMTP transaction).
DELIVERY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    60.0, 300.0)
# Arrival to delivery (Postfix's delay=): retries make it minutes to days.
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                 14400.0, 86400.0, 432000.0)
# Messages made durable by one flush of the group committer.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

DESCRIPTIONS: dict[str, str] = {
    "pymta_connections_total": "SMTP connections taken from the kernel, by listener "
                               "(smtp, submission, submissions), refused ones included",
    "pymta_connections_refused_total": "connections refused with 421 by a limit: total "
                                       "(PYMTA_MAX_CONNECTIONS), per_ip, rate",
    "pymta_connections_open": "SMTP sessions open now (all workers)",
    "pymta_messages_accepted_total": "messages answered 250 at the end of data (queued)",
    "pymta_messages_rejected_total": "4xx/5xx answers by stage: mail (queue full), rcpt "
                                     "(one per refused recipient), data, end_of_data",
    "pymta_end_of_data_seconds": "time from the end of a message's data to its 250 "
                                 "(checks, queue commit)",
    "pymta_commit_batch_size": "messages made durable by one group commit flush",
    "pymta_deliveries_total": "recipients delivered (sent), deferred or bounced, by "
                              "delivery agent (local, lmtp, relay, smtp) per attempt",
    "pymta_delivery_seconds": "duration of one delivery agent call, by agent",
    "pymta_delivery_delay_seconds": "time from a message's arrival to a recipient's "
                                    "successful delivery",
    "pymta_errors_total": "faults by kind: lookup, auth, virus_scanner, spam_scanner, "
                          "pipeline, queue_write, delivery",
    "pymta_tls_handshakes_total": "completed TLS handshakes (STARTTLS and port 465) by version",
    "pymta_tls_handshake_failures_total": "STARTTLS handshakes that failed",
}


class _Metrics:
    """The metric objects of one enabled process (see :func:`enable`)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        d = DESCRIPTIONS
        kw: dict[str, Any] = {"registry": registry}
        self.connections = Counter("pymta_connections", d["pymta_connections_total"],
                                   ["listener"], **kw)
        self.refused = Counter("pymta_connections_refused", d["pymta_connections_refused_total"],
                               ["limit"], **kw)
        # livesum: a dead worker's sessions stop counting (exporter: mark_process_dead)
        self.open = Gauge("pymta_connections_open", d["pymta_connections_open"],
                          multiprocess_mode="livesum", **kw)
        self.accepted = Counter("pymta_messages_accepted", d["pymta_messages_accepted_total"],
                                **kw)
        self.rejected = Counter("pymta_messages_rejected", d["pymta_messages_rejected_total"],
                                ["stage", "class"], **kw)
        self.eod = Histogram("pymta_end_of_data_seconds", d["pymta_end_of_data_seconds"],
                             buckets=EOD_BUCKETS, **kw)
        self.batch = Histogram("pymta_commit_batch_size", d["pymta_commit_batch_size"],
                               buckets=BATCH_BUCKETS, **kw)
        self.deliveries = Counter("pymta_deliveries", d["pymta_deliveries_total"],
                                  ["agent", "status"], **kw)
        self.delivery_time = Histogram("pymta_delivery_seconds", d["pymta_delivery_seconds"],
                                       ["agent"], buckets=DELIVERY_BUCKETS, **kw)
        self.delay = Histogram("pymta_delivery_delay_seconds",
                               d["pymta_delivery_delay_seconds"], buckets=DELAY_BUCKETS, **kw)
        self.errors = Counter("pymta_errors", d["pymta_errors_total"], ["kind"], **kw)
        self.tls = Counter("pymta_tls_handshakes", d["pymta_tls_handshakes_total"],
                           ["version"], **kw)
        self.tls_failed = Counter("pymta_tls_handshake_failures",
                                  d["pymta_tls_handshake_failures_total"], **kw)
        # Children by label values, made once: ``labels()`` costs more than ``inc()`` itself.
        self.children: dict[tuple[Any, ...], Any] = {}

    def child(self, metric: Any, *values: str) -> Any:
        key = (id(metric), *values)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = metric.labels(*values)
        return found


_m: _Metrics | None = None


def enabled() -> bool:
    return _m is not None


def enable(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """Create the metric objects in ``registry`` (a new one when None) and start counting;
    the registry, for whoever serves it. An embedder may pass prometheus_client's
    ``REGISTRY`` to have them served by its own exporter. With ``PROMETHEUS_MULTIPROC_DIR``
    set the values go to that directory (a worker process: call this after the fork)."""
    global _m
    from prometheus_client import CollectorRegistry, values

    multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    if getattr(values.ValueClass, "_multiprocess", False) != multiprocess:
        # prometheus_client was imported before the directory was set (or unset): it
        # chooses its kind of values at import, so it is asked again
        values.ValueClass = values.get_value_class()
    if registry is None:
        registry = CollectorRegistry()
    _m = _Metrics(registry)
    return registry


def disable() -> None:
    """Stop counting (tests; a worker's objects are dropped with the process anyway)."""
    global _m
    _m = None


def clock() -> float:
    """The clock the latency histograms use."""
    return time.monotonic()


# --------------------------------------------------------------------------- receiving


def connection(listener: str) -> None:
    """A connection arrived on a ``listener`` (smtp, submission, submissions)."""
    m = _m
    if m is not None:
        m.child(m.connections, listener).inc()


def refused(limit: str) -> None:
    """A connection was refused by a limit (total, per_ip, rate)."""
    m = _m
    if m is not None:
        m.child(m.refused, limit).inc()


def session_opened() -> None:
    m = _m
    if m is not None:
        m.open.inc()


def session_closed() -> None:
    m = _m
    if m is not None:
        m.open.dec()


def replied(stage: str, answer: Reply) -> Reply:
    """``answer``, what a client is told at ``stage`` (mail, rcpt, data); a 4xx/5xx is
    counted."""
    m = _m
    if m is not None and answer.code >= 400:
        m.child(m.rejected, stage, "5xx" if answer.code >= 500 else "4xx").inc()
    return answer


def end_of_data(started: float, answer: Reply) -> Reply:
    """``answer``, the reply to a message's final dot (``started``: :func:`clock` when the
    dot came): a 2xx is an accepted message and its latency, else a rejection."""
    m = _m
    if m is None:
        return answer
    code = answer.code
    if code < 400:
        m.accepted.inc()
        m.eod.observe(time.monotonic() - started)
    else:
        m.child(m.rejected, "end_of_data", "5xx" if code >= 500 else "4xx").inc()
    return answer


def tls_handshake(ssl_object: Any) -> None:
    """A completed handshake, by the version its ``ssl.SSLObject`` says (``TLSv1.3``)."""
    m = _m
    if m is not None:
        version = ssl_object.version() if ssl_object is not None else None
        m.child(m.tls, version or "unknown").inc()


def tls_failed() -> None:
    m = _m
    if m is not None:
        m.tls_failed.inc()


def error(kind: str, answer: Reply | None = None) -> None:
    """A fault of ``kind`` (lookup, auth, virus_scanner, spam_scanner, pipeline, queue_write,
    delivery): a backend that did not answer, or answered nonsense. ``answer``: the reply a
    backend gave instead, when there is one; a permanent one is a verdict, not a fault."""
    m = _m
    if m is not None and (answer is None or answer.code < 500):
        m.child(m.errors, kind).inc()


# --------------------------------------------------------------------------- the queue


def commit_batch(size: int) -> None:
    """One group commit flush made ``size`` messages durable."""
    m = _m
    if m is not None:
        m.batch.observe(size)


_STATUS = {"delivered": "sent", "temporary": "deferred", "permanent": "bounced"}


def delivered(key: str, kinds: Iterable[str], started: float,
              received_at: float | None = None) -> None:
    """One agent call ended: ``key`` the router's key (``local``, ``smtp:example.org``: only
    the part before ``:`` is a label), ``kinds`` each recipient's ``OutcomeKind.value``,
    ``started`` :func:`clock` before the call, ``received_at`` the message's arrival (wall
    clock) for the delay of the delivered ones."""
    m = _m
    if m is None:
        return
    agent = key.partition(":")[0]
    m.child(m.delivery_time, agent).observe(time.monotonic() - started)
    delay = None if received_at is None else max(time.time() - received_at, 0.0)
    for kind in kinds:
        status = _STATUS.get(kind, "deferred")
        m.child(m.deliveries, agent, status).inc()
        if status == "sent" and delay is not None:
            m.delay.observe(delay)
