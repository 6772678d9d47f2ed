"""pymta and Postfix side by side: the same load against each, interleaved, several rounds.

Scenarios (``python -m benchmarks --scenario NAME``; ``--all`` runs every one of them):

* ``accept`` / ``end-to-end``: a fresh server (pymta, or a throwaway Postfix from
  ``benchmarks/postfix.py``) on an empty spool takes ``--messages`` messages for
  ``box@example.com`` from 20 sessions, one 4 KiB message per session, from ``smtp-source``
  and from our ``loadgen``. **accept** = messages answered 250 / time until the client has its
  last 250 (every 250 means "fsynced in the queue" for both servers), with delivery paused on
  both: every message is put on hold (pymta ``PYMTA_HOLD_INCOMING=yes``, Postfix the ``HOLD``
  action, see ``postfix.HOLD_CF``). **end-to-end** = files in ``box/new`` / time from the first
  connection until the last file is there, in a separate run with delivery on. Every run also
  records the machine's CPU time per message (``benchmarks/floor.py``).
* ``floor``: the least CPU per message any server could spend on this machine
  (``benchmarks/floor.py``): smtp-source against smtp-sink, and the bare file-system work of
  a durable queue and of maildir delivery. With the CPU figures of the runs above, the report
  shows what each ratio target allows pymta to spend per message and whether that is above
  the floor at all.
* ``sweep``: accepted msg/s at 1, 5, 20, 50, 100 concurrent sessions (one message per
  session, ``smtp-source`` when installed), delivery paused as for ``accept``, both servers;
  the data of the PNG plot.
* ``latency``: ``loadgen`` paced at half of each server's own peak rate with delivery on (the
  loadgen end-to-end median of this run, or a quick peak run first); p50/p99 from the final
  ``.`` to the 250.
* ``relay-through``: the same load, both servers relaying every message to the same local
  SMTP sink (``benchmarks/relay.py``); relayed msg/s from the first connection until the
  sink took the last message.
* ``memory-idle`` / ``memory-large`` / ``memory-relay``: see ``benchmarks/memory.py`` (pymta
  only).

Order within a round alternates (pymta first in odd rounds, Postfix first in even ones), so a
noisy minute hits both; every figure reported is the median over rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import postfix as pf
from benchmarks.floor import CpuCost, CpuSample, fs_floor, sink_floor
from benchmarks.loadgen import run_load
from benchmarks.report import POSTFIX, PYMTA, Results, median
from benchmarks.scenarios import BenchmarkError, ServerProcess, free_port, server_python

SMTP_SOURCE = Path("/usr/sbin/smtp-source")
RECIPIENT = "box@example.com"
SENDER = "a@x.test"
SWEEP_LEVELS = (1, 5, 20, 50, 100)
COMPARE_SCENARIOS = ("accept", "end-to-end", "floor", "sweep", "latency", "relay-through",
                     "memory-idle", "memory-large", "memory-relay")
RELAY_SCENARIOS = ("relay-through", "memory-relay")
"""Issue 15's scenarios: their document is ``results/relay-through.md``; run alone, they
leave ``latest.md`` (the table of ``--all``) as it is."""


@dataclass(frozen=True, slots=True)
class CompareOptions:
    """What ``python -m benchmarks`` asked for; the defaults are the issue's load."""

    rounds: int = 5
    sessions: int = 20
    messages: int = 5000
    size: int = 4096
    workers: int | None = None          # PYMTA_WORKERS; None = the server's default
    deliver_timeout: float = 120.0
    sweep_levels: tuple[int, ...] = SWEEP_LEVELS
    sweep_messages: int = 2000          # cap per sweep point (fewer at low concurrency)
    sweep_rounds: int = 3
    sweep_delivery: bool = True         # the sweep with delivery running (issue 14's 1/5 rows)
    latency_seconds: float = 5.0        # length of one paced latency run
    latency_rounds: int = 3
    postfix: bool = True
    server_loop: str = "auto"           # "asyncio": hide uvloop from the pymta server


@dataclass(frozen=True, slots=True)
class Run:
    """One client against one fresh server."""

    server: str
    client: str
    messages: int
    accepted: int
    failed: int
    accept_seconds: float
    delivered: int | None = None
    deliver_seconds: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu: CpuCost | None = None          # machine CPU per accepted message over the run

    @property
    def accepted_per_s(self) -> float:
        return self.accepted / self.accept_seconds if self.accept_seconds > 0 else 0.0

    @property
    def delivered_per_s(self) -> float | None:
        if self.delivered is None or not self.deliver_seconds:
            return None
        return self.delivered / self.deliver_seconds


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A fresh temporary directory; kept when PYMTA_BENCH_KEEP is set."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if not os.environ.get("PYMTA_BENCH_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


# Like for like: the Postfix side runs no content checks, so pymta runs none either (the
# pipeline-cost scenario prices each check separately).
PIPELINE_OFF = {"PYMTA_SPF": "no", "PYMTA_DMARC": "no", "PYMTA_DKIM_VERIFY": "no",
                "PYMTA_ARC": "no", "PYMTA_DKIM_SIGN": "no", "SRS_ENABLE": "no",
                "PYMTA_BANNED_CHECK": "no", "PYMTA_BAD_HEADER_CHECK": "no"}


def pymta_server(work: Path, port: int, opts: CompareOptions, **extra: str) -> ServerProcess:
    """``python -m pymta serve`` for ``box@example.com`` → ``work/mail/box`` (maildir).

    Connection limits are raised so that neither the sweep's 100 sessions nor the memory
    scenario's 10,000 connections from 127.0.0.x are refused by policy.
    """
    env = dict(os.environ)
    env.update(
        PYMTA_STATE_DIR=str(work / "state"),
        PYMTA_MAIL_DIR=str(work / "mail"),
        MAIL_DOMAIN="example.com",
        MAIL_BOXES=f"{RECIPIENT}:box/",
        PYMTA_SMTP_LISTEN=f"127.0.0.1:{port}",
        PYMTA_MAX_CONNECTIONS="20000",
        PYMTA_MAX_CONNECTIONS_PER_IP="20000",
        SYSLOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
        # Like for like: the Postfix side runs no content checks, so neither does pymta here
        # (the pipeline-cost scenario measures each check's price separately).
        **PIPELINE_OFF,
    )
    if opts.workers is not None:
        env["PYMTA_WORKERS"] = str(opts.workers)
    if opts.server_loop == "asyncio":
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(_no_uvloop_shim(work)), env.get("PYTHONPATH", "")]))
    env.update(extra)
    argv = [server_python(), "-m", "pymta", "serve"]
    return ServerProcess("pymta", argv, env, port, work / "server.log")


def _no_uvloop_shim(work: Path) -> Path:
    """A directory whose ``uvloop`` package fails to import: pymta then runs on asyncio's
    default loop (it installs uvloop only when the import succeeds)."""
    shim = work / "no-uvloop"
    (shim / "uvloop").mkdir(parents=True, exist_ok=True)
    (shim / "uvloop" / "__init__.py").write_text(
        'raise ImportError("uvloop hidden by the benchmark (--server-loop asyncio)")\n')
    return shim


def make_server(kind: str, work: Path, port: int, opts: CompareOptions,
                size_limit: int | None = None, hold: bool = False) -> tuple[ServerProcess, Path]:
    """The server of ``kind`` and the maildir (``.../box``) it delivers to; ``hold``: it
    queues every message on hold and delivers nothing."""
    if kind == PYMTA:
        extra = {"MESSAGE_SIZE_LIMIT": str(size_limit)} if size_limit else {}
        if hold:
            extra["PYMTA_HOLD_INCOMING"] = "yes"
        return pymta_server(work, port, opts, **extra), work / "mail" / "box"
    if kind == POSTFIX:
        return pf.prepare_postfix(work, port, recipient=RECIPIENT,
                                  size_limit=size_limit or 10240000, hold=hold)
    raise BenchmarkError(f"unknown server {kind!r}")


def stop_server(server: ServerProcess) -> None:
    """Stop, then wait (≤ 5 s) until every process of its group is gone (Postfix's children
    exit a moment after the master)."""
    server.stop()
    if server.proc is None:
        return
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            os.killpg(server.proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def count_files(directory: Path) -> int:
    try:
        with os.scandir(directory) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


async def wait_files(new: Path, want: int, started: float, timeout: float) -> tuple[int, float]:
    """Poll ``new`` until ``want`` files; (count, seconds since ``started`` at the last one)."""
    deadline = time.monotonic() + timeout
    count = count_files(new)
    seen_at = time.perf_counter()
    while count < want and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        n = count_files(new)
        if n != count:
            count, seen_at = n, time.perf_counter()
    return count, (seen_at if count < want else time.perf_counter()) - started


def smtp_source_argv(port: int, sessions: int, messages: int, size: int) -> list[str]:
    """``smtp-source -s S -m N -l SIZE``: S sessions at a time, one message per session (no
    ``-d``), N messages in total, as in performance-baseline.md."""
    return [str(SMTP_SOURCE), "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]


async def run_client(client: str, port: int, sessions: int, messages: int, size: int,
                     rate: float | None = None, timeout: float = 30.0
                     ) -> tuple[int, int, float, float | None, float | None]:
    """Load ``port``; return (accepted, failed, seconds, p50 ms, p99 ms)."""
    if client == "loadgen":
        r = await run_load("127.0.0.1", port, sessions=sessions, messages=messages,
                           size=size, sender=SENDER, recipient=RECIPIENT, rate=rate,
                           timeout=timeout)
        return r.accepted, r.failed, r.seconds, r.p50_ms, r.p99_ms
    if client == "smtp-source":
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *smtp_source_argv(port, sessions, messages, size),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        seconds = time.perf_counter() - start
        # smtp-source prints nothing on success and one warning/fatal line per failed session.
        complaints = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
        failed = min(messages, len(complaints) + (1 if proc.returncode else 0))
        return messages - failed, failed, seconds, None, None
    raise BenchmarkError(f"unknown client {client!r}")


async def measure(kind: str, client: str, opts: CompareOptions, *, sessions: int,
                  messages: int, deliver: bool, rate: float | None = None,
                  hold: bool = False) -> Run:
    """One fresh server of ``kind``, one load, optionally waiting for every delivery.
    ``hold``: delivery paused (every message queued on hold)."""
    with workdir(f"pymta-bench-{kind}-") as work:
        port = free_port()
        server, box = make_server(kind, work, port, opts, hold=hold)
        try:
            await server.start()
            await asyncio.sleep(0.2)    # let start-up work (workers, spool set-up) finish
            before = CpuSample.now()
            started = time.perf_counter()
            accepted, failed, seconds, p50, p99 = await run_client(
                client, port, sessions, messages, opts.size, rate=rate)
            delivered = deliver_s = None
            if deliver:
                delivered, deliver_s = await wait_files(box / "new", accepted, started,
                                                        opts.deliver_timeout)
            cpu = CpuCost.between(before, CpuSample.now(), accepted)
        finally:
            stop_server(server)
        return Run(kind, client, messages, accepted, failed, seconds, delivered, deliver_s,
                   p50, p99, cpu)


def _servers(opts: CompareOptions, round_no: int) -> list[str]:
    servers = [PYMTA, POSTFIX] if opts.postfix else [PYMTA]
    return servers if round_no % 2 else servers[::-1]


def _clients() -> list[str]:
    return (["smtp-source"] if SMTP_SOURCE.exists() else []) + ["loadgen"]


def _load_label(client: str, opts: CompareOptions) -> str:
    if client == "smtp-source":
        return f"smtp-source -s {opts.sessions} -m {opts.messages} -l {opts.size}"
    return f"loadgen {opts.sessions} sessions × 1 msg, {opts.messages} × {opts.size} B"


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def throughput(results: Results, opts: CompareOptions, names: list[str]) -> None:
    """``accept`` (delivery paused) and ``end-to-end`` (delivery on, a run of its own): every
    client, every server, ``rounds`` times."""
    metrics = [m for m in ("accept", "end-to-end") if m in names]
    for n in range(1, opts.rounds + 1):
        for metric in metrics:
            for client in _clients():
                for kind in _servers(opts, n):
                    r = await _throughput_run(results, opts, metric, client, kind)
                    rate = (r.delivered_per_s if metric == "end-to-end" else r.accepted_per_s)
                    _note(f"round {n}/{opts.rounds} {metric:10} {kind:7} {client:11}: "
                          f"{rate or 0:8,.0f}/s, CPU {r.cpu.busy_ms if r.cpu else 0:.2f} ms/msg "
                          f"(accepted {r.accepted}/{r.messages}, delivered {r.delivered})")


async def _throughput_run(results: Results, opts: CompareOptions, metric: str, client: str,
                          kind: str) -> Run:
    deliver = metric == "end-to-end"
    r = await measure(kind, client, opts, sessions=opts.sessions, messages=opts.messages,
                      deliver=deliver, hold=not deliver)
    label = _load_label(client, opts)
    results.add_throughput(metric, label, kind,
                           r.delivered_per_s if deliver else r.accepted_per_s)
    if r.cpu is not None:
        results.add_cpu(metric, label, kind, r.cpu)
    results.add_errors(f"{metric} {kind}/{client}: not accepted", r.failed)
    if deliver:
        results.add_errors(f"{kind}/{client}: accepted, not delivered in "
                           f"{opts.deliver_timeout:.0f} s", r.accepted - (r.delivered or 0))
    return r


async def floor(results: Results, opts: CompareOptions) -> None:
    """The least CPU per message on this machine (``benchmarks/floor.py``), ``rounds``
    times: smtp-source against smtp-sink, and the bare file-system work."""
    spool_fs = Path(tempfile.gettempdir())   # where every server's spool and maildir live

    def source(port: int) -> list[str]:
        return smtp_source_argv(port, opts.sessions, opts.messages, opts.size)

    def python_sink(port: int) -> list[str]:
        return [server_python(), "-m", "benchmarks.sink", "--listen", f"127.0.0.1:{port}"]
    for n in range(1, opts.rounds + 1):
        for name, measure_floor in (
                ("smtp-sink", lambda: sink_floor(source, opts.messages)),
                ("python sink", lambda: sink_floor(source, opts.messages, python_sink)),
                ("queue files", lambda: fs_floor(spool_fs, opts.messages, opts.sessions,
                                                 opts.size, deliver=False)),
                ("queue + maildir", lambda: fs_floor(spool_fs, opts.messages, opts.sessions,
                                                     opts.size, deliver=True))):
            cost = await asyncio.to_thread(measure_floor)
            results.floor.setdefault(name, []).append(cost)
            _note(f"floor round {n}/{opts.rounds} {name:15}: user {cost.user_ms:.3f} "
                  f"+ system {cost.system_ms:.3f} ms/msg")


def sweep_messages(sessions: int, cap: int) -> int:
    """Messages per sweep point: enough for ~1 s or more, fewer at low concurrency."""
    return max(1, min(cap, max(300, 100 * sessions)))


async def sweep(results: Results, opts: CompareOptions) -> None:
    """Accepted msg/s at each concurrency level (``smtp-source`` if installed), with
    delivery running unless ``--sweep-held``."""
    client = "smtp-source" if SMTP_SOURCE.exists() else "loadgen"
    results.sweep_client = client
    for n in range(1, opts.sweep_rounds + 1):
        for sessions in opts.sweep_levels:
            messages = sweep_messages(sessions, opts.sweep_messages)
            for kind in _servers(opts, n):
                r = await measure(kind, client, opts, sessions=sessions, messages=messages,
                                  deliver=opts.sweep_delivery, hold=not opts.sweep_delivery)
                results.add_sweep(sessions, kind, r.accepted_per_s)
                results.add_errors(f"sweep {kind}/{sessions}: not accepted", r.failed)
                _note(f"sweep round {n}/{opts.sweep_rounds} {kind:7} {sessions:3} sessions: "
                      f"{r.accepted_per_s:8,.0f}/s ({r.accepted}/{messages})")


async def latency(results: Results, opts: CompareOptions) -> None:
    """p50/p99 end-of-DATA latency with loadgen paced at half of each server's peak."""
    peaks: dict[str, float] = {}
    for kind in _servers(opts, 1):
        # The peak a server sustains with delivery on (as in these runs): its end-to-end rate.
        label = _load_label("loadgen", opts)
        peak = median(results.throughput.get(("end-to-end", label), {}).get(kind, []))
        if peak is None:  # end-to-end was not run: measure the peak once, quickly
            r = await measure(kind, "loadgen", opts, sessions=opts.sessions,
                              messages=min(opts.messages, 2000), deliver=True)
            peak = r.delivered_per_s or r.accepted_per_s
            _note(f"latency: {kind} peak (loadgen, {r.accepted} msgs) {peak:,.0f}/s")
        peaks[kind] = peak
    for n in range(1, opts.latency_rounds + 1):
        for kind in _servers(opts, n):
            rate = max(1.0, peaks[kind] / 2)
            messages = max(200, int(rate * opts.latency_seconds))
            r = await measure(kind, "loadgen", opts, sessions=opts.sessions, messages=messages,
                              deliver=False, rate=rate)
            results.latency.setdefault(kind, []).append(
                {"rate": rate, "achieved": r.accepted_per_s, "p50_ms": r.p50_ms or 0.0,
                 "p99_ms": r.p99_ms or 0.0})
            results.add_errors(f"latency {kind}: not accepted", r.failed)
            _note(f"latency round {n}/{opts.latency_rounds} {kind:7}: offered {rate:,.0f}/s, "
                  f"got {r.accepted_per_s:,.0f}/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms")


def server_loop_name(opts: CompareOptions) -> str:
    """Whether the server interpreter can use uvloop (pymta installs it when importable)."""
    if opts.server_loop == "asyncio":
        return "asyncio (uvloop hidden: --server-loop asyncio)"
    try:
        proc = subprocess.run([server_python(), "-c", "import uvloop"], capture_output=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return "uvloop" if proc.returncode == 0 else "asyncio (uvloop not installed)"


async def server_workers(opts: CompareOptions) -> str:
    """How many worker processes a pymta server starts with these options (counted)."""
    from benchmarks.memory import group_pids, worker_count

    with workdir("pymta-bench-workers-") as work:
        port = free_port()
        server = pymta_server(work, port, opts)
        try:
            await server.start()
            assert server.proc is not None
            await asyncio.sleep(0.3)
            count = worker_count(server.proc.pid, group_pids(server.proc.pid))
        finally:
            stop_server(server)
    setting = (f"PYMTA_WORKERS={opts.workers}" if opts.workers is not None
               else "PYMTA_WORKERS unset: server default")
    return f"{count} ({setting})"


RESULTS_DIR = Path(__file__).resolve().parent / "results"


async def run_selected(names: list[str], opts: CompareOptions, *, idle_connections: int,
                       large_sessions: int, large_size_mb: int) -> Results:
    """Run the named comparison scenarios in a fixed order (throughput first: latency uses
    its peaks)."""
    from benchmarks import memory, relay

    results = Results()
    if "accept" in names or "end-to-end" in names:
        await throughput(results, opts, names)
    if "floor" in names:
        await floor(results, opts)
    if "sweep" in names:
        await sweep(results, opts)
    if "latency" in names:
        await latency(results, opts)
    if "relay-through" in names:
        await relay.relay_through(results, opts)
    if "memory-idle" in names:
        results.memory["idle"] = await memory.idle_connections(opts, idle_connections)
        results.add_errors("memory-idle: connections that failed",
                           int(results.memory["idle"]["failed"]))
    if "memory-large" in names:
        results.memory["large"] = await memory.large_messages(opts, large_sessions,
                                                              large_size_mb)
        big = results.memory["large"]
        results.add_errors("memory-large: not accepted", int(big["failed"]))
        results.add_errors("memory-large: accepted, not delivered",
                           int(big["accepted"] - big["delivered"]))
    if "memory-relay" in names:
        results.memory["relay"] = await memory.large_messages(opts, large_sessions,
                                                              large_size_mb, relay=True)
        big = results.memory["relay"]
        results.add_errors("memory-relay: not accepted", int(big["failed"]))
        results.add_errors("memory-relay: accepted, not relayed",
                           int(big["accepted"] - big["delivered"]))
    return results


def main_compare(names: list[str], opts: CompareOptions, *, client_loop: str, command: str,
                 results_dir: Path = RESULTS_DIR, idle_connections: int = 10_000,
                 large_sessions: int = 50, large_size_mb: int = 25,
                 run: Callable[[Coroutine[Any, Any, Any]], Any] = asyncio.run) -> int:
    """Run, print the markdown, write ``results/<date>.md``, ``latest.md`` and the plot."""
    from benchmarks import report

    needs_postfix = any(n in names for n in ("accept", "end-to-end", "sweep", "latency",
                                             "relay-through"))
    if opts.postfix and needs_postfix and not pf.ensure_postfix():
        opts = dataclasses.replace(opts, postfix=False)
    started = time.monotonic()
    workers = run(server_workers(opts))
    results = run(run_selected(names, opts, idle_connections=idle_connections,
                               large_sessions=large_sessions, large_size_mb=large_size_mb))
    elapsed = time.monotonic() - started
    load = [f"Scenarios: {', '.join(names)}; took {elapsed / 60:.1f} min."]
    if results.throughput or results.sweep or results.latency:
        load.append(f"Load: {opts.sessions} sessions, one {opts.size}-byte message per "
                    f"session, {opts.messages} messages per run; medians of {opts.rounds} "
                    f"rounds (sweep {opts.sweep_rounds}, latency {opts.latency_rounds}), "
                    "pymta and Postfix interleaved, a fresh server and spool for every run.")
    if "idle" in results.memory:
        load.append(f"Memory: {idle_connections} idle connections.")
    if "large" in results.memory or "relay" in results.memory:
        relayed = " (memory-relay: relayed to the sink)" if "relay" in results.memory else ""
        load.append(f"Memory: {large_sessions} sessions × one {large_size_mb} MiB "
                    f"message{relayed}.")
    header = [" ".join(load), "",
              *report.machine_info(client_loop=client_loop, server_loop=server_loop_name(opts),
                                   workers=workers,
                                   postfix=pf.postfix_version() if opts.postfix else "")]
    doc = report.render(results, header=header, command=command)
    print(doc)
    results_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if any(n in RELAY_SCENARIOS for n in names):
        # the document README.md points at for relaying (issue 15)
        (results_dir / "relay-through.md").write_text(doc)
        written.append(results_dir / "relay-through.md")
    if not set(names) <= set(RELAY_SCENARIOS):
        # a run of the relay scenarios alone leaves the table of the others as it is
        day = time.strftime("%Y-%m-%d")
        dated = results_dir / f"{day}.md"
        dated.write_text(doc.replace("(latest.png)", f"({day}.png)"))
        (results_dir / "latest.md").write_text(doc)
        written += [dated, results_dir / "latest.md"]
    png = report.plot(results, results_dir / f"{time.strftime('%Y-%m-%d')}.png")
    if png is not None:
        shutil.copyfile(png, results_dir / "latest.png")
        written += [png, results_dir / "latest.png"]
    elif results.sweep:
        _note("matplotlib not installed (pip install '.[bench]'): no plot written")
    _note("written: " + ", ".join(str(p) for p in written))
    return 0

