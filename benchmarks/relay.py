"""Relaying side by side (issue 15): pymta and Postfix accept the same load and relay every
message to the same local SMTP sink.

* ``relay-through``: a fresh server (pymta, or a throwaway Postfix from
  ``benchmarks/postfix.py``) takes ``--messages`` messages for ``box@example.com`` from 20
  sessions, one 4 KiB message per session, from ``smtp-source`` and from ``loadgen`` (the
  load of ``accept`` / ``end-to-end``), and relays them to a ``benchmarks.sink`` process of
  its own. Neither server has ``example.com`` as a local domain and the clients are in
  their trusted networks, so every recipient is relayed to the smart host:

  - pymta: ``MAIL_DOMAIN=pymta-bench.test`` (and no mailboxes), ``MYNETWORKS=127.0.0.0/8``,
    ``SMTP_RELAY_HOSTAUTH=[127.0.0.1]:PORT``, ``SMTP_TLS_SECURITY_LEVEL=none``;
  - Postfix: empty ``mydestination``, no virtual domains, ``mynetworks = 127.0.0.0/8``,
    ``relayhost = [127.0.0.1]:PORT``, ``default_transport = smtp``,
    ``smtp_tls_security_level = none`` (``postfix.RELAY_CF``).

  Queue durability, connection caching and destination concurrency stay at each server's
  defaults (both fsync before the 250; both reuse connections to the smart host; both at
  most 20 parallel deliveries to it). **relayed msg/s** = messages the sink took / time from
  the start of the load (the first connection) until the sink took the last one: the sink
  notes the ``time.monotonic()`` of every message and the benchmark asks for it
  (``XSTATS``), so polling adds no delay to the figure.
* ``memory-relay``: pymta only, ``memory-large``'s load (50 sessions × one 25 MiB message
  at once) relayed to the sink instead of delivered to a maildir; RSS growth of the server's
  processes (``benchmarks/memory.py``). The sink counts bytes and discards them.

The sink runs as a process of its own (``python -m benchmarks.sink``, on uvloop when
installed) rather than in the benchmark's event loop, so that it shares no loop with
``loadgen``; each run gets a fresh one, hence fresh counters.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import postfix as pf
from benchmarks.compare import (
    CompareOptions,
    Run,
    _clients,
    _load_label,
    _note,
    _servers,
    pymta_server,
    run_client,
    stop_server,
    workdir,
)
from benchmarks.floor import CpuCost, CpuSample
from benchmarks.report import POSTFIX, PYMTA, Results
from benchmarks.scenarios import BenchmarkError, ServerProcess, free_port, server_python
from benchmarks.sink import SinkStats

METRIC = "relay-through"
SINK_HOST = "127.0.0.1"
PYMTA_LOCAL_DOMAIN = "pymta-bench.test"
"""pymta's own domain in the relay scenarios: not the recipient's, so nothing is local."""
POLL = 0.01


def relayhost(sink_port: int) -> str:
    """The smart host in the syntax both servers take (Postfix's ``relayhost``, pymta's
    ``SMTP_RELAY_HOSTAUTH``): brackets, no MX lookup."""
    return f"[{SINK_HOST}]:{sink_port}"


def pymta_relay_env(sink_port: int) -> dict[str, str]:
    """pymta's settings for relaying everything to the sink (the counterpart of
    ``postfix.RELAY_CF``): the recipient's domain is not local, the loopback clients may
    relay, the smart host is the sink, no TLS."""
    return {
        "MAIL_DOMAIN": PYMTA_LOCAL_DOMAIN,
        "MAIL_BOXES": "",
        "MYNETWORKS": "127.0.0.0/8",
        "SMTP_RELAY_HOSTAUTH": relayhost(sink_port),
        "SMTP_TLS_SECURITY_LEVEL": "none",
    }


@dataclass(frozen=True, slots=True)
class SinkWait:
    """What waiting for the sink saw: its last counters, and the longest time without a new
    message while some were still outstanding (a stall, or retries, on the relaying side)."""

    stats: SinkStats
    longest_pause: float
    own_connections: int = 0

    @property
    def connections(self) -> int:
        """Connections the relaying server opened to the sink."""
        return self.stats.connections - self.own_connections

    def relay_seconds(self, started: float) -> float | None:
        """Seconds from ``started`` (``time.monotonic()``) to the last message the sink
        took; None when it took none."""
        if not self.stats.messages:
            return None
        return max(0.0, self.stats.last_at - started)


class SinkProcess:
    """``python -m benchmarks.sink`` on a loopback port of its own, asked for its counters
    over one connection kept open (``XSTATS``)."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        argv = [server_python(), "-m", "benchmarks.sink", "--listen", f"{SINK_HOST}:{self.port}"]
        self.server = ServerProcess("benchmarks.sink", argv, dict(os.environ), self.port,
                                    work / "sink.log")
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.own_connections = 0

    async def start(self) -> None:
        await self.server.start()
        reader, writer = await asyncio.open_connection(SINK_HOST, self.port)
        greeting = await reader.readline()
        if not greeting.startswith(b"220"):
            raise BenchmarkError(f"sink greeting {greeting[:80]!r}")
        self._conn = reader, writer
        self.own_connections = (await self.stats()).connections   # start()'s probe and ours

    async def stats(self) -> SinkStats:
        if self._conn is None:
            raise BenchmarkError("sink not started")
        reader, writer = self._conn
        writer.write(b"XSTATS\r\n")
        async with asyncio.timeout(10):
            line = await reader.readline()
        try:
            return SinkStats.parse(line)
        except ValueError as exc:
            raise BenchmarkError(f"sink: {exc}") from None

    async def wait_for(self, want: int, timeout: float) -> SinkWait:
        """Poll until the sink has taken ``want`` messages, for at most ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        stats = await self.stats()
        changed, longest = time.monotonic(), 0.0
        while stats.messages < want and time.monotonic() < deadline:
            await asyncio.sleep(POLL)
            now_stats = await self.stats()
            now = time.monotonic()
            if now_stats.messages != stats.messages:
                longest = max(longest, now - changed)
                changed = now
            stats = now_stats
        if stats.messages < want:
            longest = max(longest, time.monotonic() - changed)
        return SinkWait(stats, longest, self.own_connections)

    def stop(self) -> None:
        if self._conn is not None:
            self._conn[1].close()
            self._conn = None
        stop_server(self.server)


def make_relay_server(kind: str, work: Path, port: int, opts: CompareOptions, sink_port: int,
                      size_limit: int | None = None) -> ServerProcess:
    """The server of ``kind`` relaying everything to the sink on ``sink_port``."""
    if kind == PYMTA:
        extra = pymta_relay_env(sink_port)
        if size_limit:
            extra["MESSAGE_SIZE_LIMIT"] = str(size_limit)
        return pymta_server(work, port, opts, **extra)
    if kind == POSTFIX:
        server, _ = pf.prepare_postfix(work, port, size_limit=size_limit or 10240000,
                                       relayhost=relayhost(sink_port))
        return server
    raise BenchmarkError(f"unknown server {kind!r}")


def log_excerpt(kind: str, work: Path, lines: int = 8) -> str:
    """The server's log lines that say something went wrong with relaying (deferred,
    bounced, timeouts, tracebacks): what the report should look at after a slow run."""
    log = work / ("postfix.log" if kind == POSTFIX else "server.log")
    try:
        text = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(suspicious_lines(text)[:lines])


SUSPICIOUS = ("status=deferred", "status=bounced", "Traceback", "error", "timed out",
              "timeout", "lost connection", "refused", "warning")


def suspicious_lines(lines: list[str]) -> list[str]:
    """Log lines with one of ``SUSPICIOUS`` in them (case-insensitive)."""
    wanted = tuple(w.lower() for w in SUSPICIOUS)
    return [ln for ln in lines if any(w in ln.lower() for w in wanted)]


async def measure_relay(kind: str, client: str, opts: CompareOptions) -> tuple[Run, SinkWait]:
    """One fresh server of ``kind`` and a fresh sink; the load; wait for every accepted
    message at the sink."""
    with workdir(f"pymta-bench-relay-{kind}-") as work:
        sink = SinkProcess(work)
        try:
            await sink.start()
            port = free_port()
            server = make_relay_server(kind, work, port, opts, sink.port)
            try:
                await server.start()
                await asyncio.sleep(0.2)    # let start-up work finish, as in measure()
                before = CpuSample.now()
                started = time.monotonic()
                accepted, failed, seconds, p50, p99 = await run_client(
                    client, port, opts.sessions, opts.messages, opts.size)
                waited = await sink.wait_for(accepted, opts.deliver_timeout)
                cpu = CpuCost.between(before, CpuSample.now(), accepted)
            finally:
                stop_server(server)
            if waited.stats.messages < accepted or waited.longest_pause > 1.0:
                excerpt = log_excerpt(kind, work)
                if excerpt:
                    _note(f"{METRIC} {kind}/{client}: from its log:\n{excerpt}")
        finally:
            sink.stop()
    run = Run(kind, client, opts.messages, accepted, failed, seconds,
              delivered=waited.stats.messages, deliver_seconds=waited.relay_seconds(started),
              p50_ms=p50, p99_ms=p99, cpu=cpu)
    return run, waited


async def relay_through(results: Results, opts: CompareOptions) -> None:
    """``relay-through``: every client, every server, ``rounds`` times, interleaved."""
    for n in range(1, opts.rounds + 1):
        for client in _clients():
            for kind in _servers(opts, n):
                r, waited = await measure_relay(kind, client, opts)
                label = _load_label(client, opts)
                results.add_throughput(METRIC, label, kind, r.delivered_per_s)
                if r.cpu is not None:
                    results.add_cpu(METRIC, label, kind, r.cpu)
                results.add_errors(f"{METRIC} {kind}/{client}: not accepted", r.failed)
                results.add_errors(f"{METRIC} {kind}/{client}: accepted, not relayed in "
                                   f"{opts.deliver_timeout:.0f} s",
                                   r.accepted - (r.delivered or 0))
                _note(f"round {n}/{opts.rounds} {METRIC} {kind:7} {client:11}: "
                      f"{r.delivered_per_s or 0:8,.0f}/s relayed "
                      f"({r.accepted_per_s:,.0f}/s accepted), "
                      f"CPU {r.cpu.busy_ms if r.cpu else 0:.2f} ms/msg "
                      f"(accepted {r.accepted}/{r.messages}, relayed {r.delivered}, "
                      f"{waited.connections} connections to the sink, longest "
                      f"pause {waited.longest_pause:.2f} s)")
