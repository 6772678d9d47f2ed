"""Memory of a pymta server: idle connections held open, and very large messages in flight.

* ``memory-idle``: 10,000 connections (``--idle-connections``) that have read the 220 greeting
  and sent EHLO, then stay silent. They come from 127.0.0.2 … 127.0.0.11 (1,000 per address)
  so no source address runs short of ephemeral ports. The server gets
  ``PYMTA_MAX_CONNECTIONS=PYMTA_MAX_CONNECTIONS_PER_IP=20000`` and both processes raise their
  soft ``RLIMIT_NOFILE`` to the hard limit (the server inherits it from us). Reported: the
  RSS (and PSS) summed over every process of the server (supervisor and workers) before and
  with the connections open, and the difference divided by the number of connections.
* ``memory-large``: 50 sessions (``--large-sessions``) each send one 25 MiB message
  (``--large-size-mb``) at the same time, ``MESSAGE_SIZE_LIMIT`` raised to fit. RSS of the
  server's processes is sampled every 50 ms from before the load until every message is in the
  maildir; reported: baseline, peak, growth = peak − baseline.
* ``memory-relay``: the same load relayed to a ``benchmarks.sink`` process (which counts the
  bytes and keeps none) with ``relay-through``'s settings (``benchmarks/relay.py``), sampled
  until the sink has taken every accepted message: the relay client must stream each body
  from the queue, not hold it.

RSS is ``VmRSS`` from ``/proc/PID/status``; PSS (``/proc/PID/smaps_rollup``) splits pages the
forked workers share with the supervisor, so summed PSS does not count them twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.compare import CompareOptions, pymta_server, stop_server, wait_files, workdir
from benchmarks.loadgen import run_load
from benchmarks.scenarios import BenchmarkError, free_port

SOURCE_ADDRESSES = tuple(f"127.0.0.{i}" for i in range(2, 12))


def raise_nofile(want: int) -> int:
    """Raise the soft open-files limit towards ``want`` (at most the hard limit); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def group_pids(pgid: int) -> list[int]:
    """Every live process whose process group is ``pgid`` (the server and its workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may contain spaces, so split after ')'.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def worker_count(leader: int, pids: list[int]) -> int:
    """Worker processes under the supervisor ``leader``; 1 when the server is one process."""
    children = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == leader:
                children += 1
    return children or 1


def _status_kb(pid: int, key: str, path: str = "status") -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/{path}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def memory_kb(pgid: int) -> tuple[int, int, int]:
    """(RSS kB, PSS kB, processes) summed over the process group ``pgid``."""
    pids = group_pids(pgid)
    rss = sum(_status_kb(p, "VmRSS") for p in pids)
    pss = sum(_status_kb(p, "Pss", "smaps_rollup") for p in pids)
    return rss, pss, len(pids)


@dataclass
class _Idle:
    writers: list[asyncio.StreamWriter]
    failed: int = 0
    first_error: str = ""


async def _open_idle(port: int, source: str, state: _Idle, sem: asyncio.Semaphore) -> None:
    async with sem:
        try:
            async with asyncio.timeout(60):
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", port, local_addr=(source, 0))
                line = await reader.readline()
                if not line.startswith(b"220"):
                    raise OSError(f"greeting {line[:60]!r}")
                writer.write(b"EHLO idle.test\r\n")
                while True:  # multi-line EHLO reply
                    line = await reader.readline()
                    if not line.startswith(b"250"):
                        raise OSError(f"EHLO reply {line[:60]!r}")
                    if line[3:4] != b"-":
                        break
        except (OSError, TimeoutError) as exc:
            state.failed += 1
            state.first_error = state.first_error or f"{type(exc).__name__}: {exc}"
            return
        state.writers.append(writer)


async def idle_connections(opts: CompareOptions, connections: int = 10_000) -> dict[str, float]:
    """RSS of a pymta server holding ``connections`` idle sessions (see module docstring)."""
    limit = raise_nofile(connections + 1024)
    if limit < connections + 100:
        raise BenchmarkError(f"RLIMIT_NOFILE is {limit}: too low for {connections} connections "
                             "(raise the hard limit, e.g. ulimit -Hn)")
    with workdir("pymta-bench-idle-") as work:
        port = free_port()
        server = pymta_server(work, port, opts, PYMTA_IDLE_TIMEOUT="600")
        state = _Idle(writers=[])
        try:
            await server.start()
            assert server.proc is not None
            pgid = server.proc.pid
            await asyncio.sleep(1.0)
            base_rss, base_pss, procs = memory_kb(pgid)
            workers = worker_count(pgid, group_pids(pgid))
            sem = asyncio.Semaphore(200)
            t0 = time.perf_counter()
            await asyncio.gather(*(
                _open_idle(port, SOURCE_ADDRESSES[i % len(SOURCE_ADDRESSES)], state, sem)
                for i in range(connections)))
            opened = len(state.writers)
            print(f"memory-idle: {opened} connections open in {time.perf_counter() - t0:.1f} s"
                  f" ({state.failed} failed{': ' + state.first_error if state.failed else ''})",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(2.0)  # let the server settle (no allocation bursts mid-read)
            rss, pss, _ = memory_kb(pgid)
        finally:
            for w in state.writers:
                w.close()
            stop_server(server)
    opened = len(state.writers)
    per = max(opened, 1)
    return {
        "connections": float(opened), "failed": float(state.failed),
        "workers": float(procs), "server_workers": float(workers),
        "baseline_rss_mb": base_rss / 1024, "rss_mb": rss / 1024,
        "baseline_pss_mb": base_pss / 1024, "pss_mb": pss / 1024,
        "kb_per_conn_rss": (rss - base_rss) / per, "kb_per_conn_pss": (pss - base_pss) / per,
    }


async def large_messages(opts: CompareOptions, sessions: int = 50, size_mb: int = 25,
                         relay: bool = False) -> dict[str, float]:
    """Peak RSS growth while ``sessions`` messages of ``size_mb`` MiB arrive at once and are
    delivered (see module docstring); ``relay``: relayed to a ``benchmarks.sink`` process
    instead (``memory-relay``: the settings of ``relay-through``, ``benchmarks/relay.py``),
    done when the sink has taken every accepted message."""
    from benchmarks.relay import SinkProcess, SinkWait, pymta_relay_env

    size = size_mb * 1024 * 1024
    name = "memory-relay" if relay else "memory-large"
    with workdir(f"pymta-bench-{'relay' if relay else 'large'}-") as work:
        port = free_port()
        sink = SinkProcess(work) if relay else None
        extra = pymta_relay_env(sink.port) if sink is not None else {}
        server = pymta_server(work, port, opts, MESSAGE_SIZE_LIMIT=str(size + 1024 * 1024),
                              **extra)
        peak = [0]
        stop = asyncio.Event()
        waited: SinkWait | None = None

        async def sample(pgid: int) -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], memory_kb(pgid)[0])
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await stop.wait()

        try:
            if sink is not None:
                await sink.start()
            await server.start()
            assert server.proc is not None
            pgid = server.proc.pid
            await asyncio.sleep(1.0)
            base_rss = memory_kb(pgid)[0]
            sampler = asyncio.create_task(sample(pgid))
            started = time.perf_counter()
            mono_started = time.monotonic()
            r = await run_load("127.0.0.1", port, sessions=sessions, messages=sessions,
                               size=size, timeout=300.0)
            if sink is None:
                delivered, seconds = await wait_files(work / "mail" / "box" / "new",
                                                      r.accepted, started, opts.deliver_timeout)
            else:
                waited = await sink.wait_for(r.accepted, opts.deliver_timeout)
                delivered = waited.stats.messages
                seconds = waited.relay_seconds(mono_started) or 0.0
            stop.set()
            await sampler
        finally:
            stop.set()
            stop_server(server)
            if sink is not None:
                sink.stop()
    done = "relayed" if relay else "delivered"
    print(f"{name}: {r.accepted}/{sessions} accepted in {r.seconds:.1f} s, {delivered} "
          f"{done} after {seconds:.1f} s", file=sys.stderr, flush=True)
    figures = {
        "messages": float(sessions), "size_mb": float(size_mb), "accepted": float(r.accepted),
        "delivered": float(delivered), "failed": float(r.failed),
        "baseline_rss_mb": base_rss / 1024, "peak_rss_mb": peak[0] / 1024,
        "growth_mb": (peak[0] - base_rss) / 1024, "seconds": seconds,
    }
    if waited is not None:
        figures["relayed_mb"] = waited.stats.data_bytes / (1024 * 1024)
        figures["sink_connections"] = float(waited.connections)
        figures["longest_pause_s"] = waited.longest_pause
    return figures
