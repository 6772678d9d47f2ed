"""Many SMTP client connections held by one thread: plain non-blocking sockets and one epoll,
not an asyncio transport each (100,000 of those cost more CPU and memory in the test process
than the server under test spends).

* :class:`IdleCrowd` opens ``count`` connections from several loopback source addresses (each
  address has ~28,000 ephemeral ports), reads each greeting, says EHLO, reads the reply, and
  then holds the connections silent until :meth:`IdleCrowd.close` resets them (an abortive
  close: no TIME_WAIT left on the source ports for the next run).
* :class:`CrowdFleet` spreads an :class:`IdleCrowd` over child processes, each within the
  per-process open-files limit (where the hard limit cannot be raised: a root without
  CAP_SYS_RESOURCE, as in this sandbox, where it is 20,000).
* :class:`Tricklers` are slowloris clients: each sends one byte every ``interval`` seconds of
  a command line that never ends (``command`` mode) or of a message line inside DATA that
  never ends (``data`` mode), and records when the server closed it and what it said.

Also the limits that decide how many connections fit (:func:`capacity`), raising the
open-files limit (:func:`raise_nofile`), and the memory of a server process tree
(:func:`tree_memory_kb`) and of the kernel's slab (:func:`slab_kb`).
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import resource
import select
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_LINGER_RESET = struct.pack("ii", 1, 0)


def loopback_sources(count: int, first: int = 2) -> list[str]:
    """``count`` loopback addresses 127.0.0.<first>, ... (all of 127/8 is loopback)."""
    assert first + count <= 255
    return [f"127.0.0.{first + i}" for i in range(count)]


# ------------------------------------------------------------------------------ limits


def raise_nofile(want: int) -> int:
    """Raise this process's open-files limit to ``want`` (the hard limit too, as root, up to
    ``/proc/sys/fs/nr_open``); return the soft limit now in force. Children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < want:
        with contextlib.suppress(ValueError, OSError):
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            hard_new = min(want, nr_open)
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, hard_new), hard_new))
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _read_int(path: str, default: int) -> int:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def ephemeral_ports() -> int:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range")
                     .read_text().split())
    except (OSError, ValueError):
        return 28_000
    return high - low + 1


@dataclass
class Capacity:
    """How many connections this machine lets one test hold, and the limit that decides."""

    connections: int
    limit: str
    figures: dict[str, int] = field(default_factory=dict)


def capacity(want: int, sources: int, reserve: int = 2000) -> Capacity:
    """The most of ``want`` connections that fit on this machine: the system-wide file
    table (client and server sockets are both here), the ephemeral ports of ``sources``
    source addresses, and memory. The per-process open-files limit is not one of them: the
    connections are spread over client processes and server workers that each fit it."""
    figures = {
        "fs.file-max / 2 (client + server sockets)":
            _read_int("/proc/sys/fs/file-max", 1 << 30) // 2 - reserve,
        "ephemeral ports × source addresses": ephemeral_ports() * sources - reserve,
        # ~10 KB of kernel slab per client + server socket pair, ~5 KB in the server, ~1 KB
        # in the client: 20 KB each, with room to spare
        "MemAvailable / 20 KB": _meminfo_kb("MemAvailable") // 20,
    }
    limit, most = min(figures.items(), key=lambda kv: kv[1])
    if most >= want:
        return Capacity(want, "", figures)
    return Capacity(max(most, 0), limit, figures)


# ------------------------------------------------------------------------------ memory


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry))
    return out


def _kb(pid: int, key: str, name: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_memory_kb(pid: int) -> tuple[int, int, int]:
    """(RSS kB, PSS kB, processes) of ``pid`` and its children (the supervisor and its
    workers). PSS splits pages the workers share with the supervisor."""
    pids = [pid, *_children(pid)]
    return (sum(_kb(p, "VmRSS", "status") for p in pids),
            sum(_kb(p, "Pss", "smaps_rollup") for p in pids), len(pids))


def _meminfo_kb(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def slab_kb() -> int:
    """The kernel's slab memory (sockets, files, epoll entries live there), kB."""
    return _meminfo_kb("Slab")


def tcp_sockstat() -> str:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            return line
    return ""


# ------------------------------------------------------------------------------ clients


def _connect(port: int, source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    # the port is chosen at connect(), per destination: more than 28k per source address
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    sock.bind((source, 0))
    err = sock.connect_ex(("127.0.0.1", port))
    if err not in (0, errno.EINPROGRESS):
        sock.close()
        raise OSError(err, os.strerror(err))
    return sock


def established_to(port: int) -> int:
    """Established TCP sockets whose local port is ``port``: the server's side of the
    connections it holds (from /proc/net/tcp, so the server really has them)."""
    suffix = f":{port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split(None, 4)   # sl local_address rem_address st ...
            if fields[3] == "01" and fields[1].endswith(suffix):
                count += 1
    return count


def _reset(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


class IdleCrowd:
    """``count`` connections that have read the greeting and the EHLO reply, then stay
    silent (see the module docstring)."""

    def __init__(self, port: int, sources: Sequence[str], count: int,
                 in_flight: int = 1000) -> None:
        self.port = port
        self.sources = list(sources)
        self.count = count
        self.in_flight = in_flight
        self.held: list[socket.socket] = []
        self.failed = 0
        self.first_error = ""
        self.seconds = 0.0

    def _fail(self, why: str) -> None:
        self.failed += 1
        self.first_error = self.first_error or why

    def open(self, timeout: float = 120.0) -> int:
        """Open the connections (at most ``in_flight`` not yet greeted at a time, so the
        server's accept backlog never overflows); return how many are held."""
        ep = select.epoll()
        pending: dict[int, tuple[socket.socket, bytearray, int]] = {}   # fd -> sock, buf, step
        started = time.monotonic()
        deadline = started + timeout
        made = 0
        try:
            while (made < self.count or pending) and time.monotonic() < deadline:
                while made < self.count and len(pending) < self.in_flight:
                    source = self.sources[made % len(self.sources)]
                    made += 1
                    try:
                        sock = _connect(self.port, source)
                    except OSError as exc:
                        self._fail(f"connect from {source}: {exc}")
                        continue
                    pending[sock.fileno()] = (sock, bytearray(), 0)
                    ep.register(sock.fileno(), select.EPOLLIN)
                for fd, _ in ep.poll(0.5):
                    sock, buf, step = pending[fd]
                    try:
                        data = sock.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError as exc:
                        data = b""
                        why = str(exc)
                    else:
                        why = "closed by the server"
                    if not data:
                        ep.unregister(fd)
                        del pending[fd]
                        self._fail(f"{why} after {bytes(buf)[:80]!r}")
                        sock.close()
                        continue
                    buf += data
                    if not buf.endswith(b"\r\n") or (step == 1 and not _last_line_final(buf)):
                        continue
                    if not buf.startswith(b"220" if step == 0 else b"250"):
                        ep.unregister(fd)
                        del pending[fd]
                        self._fail(f"unexpected reply {bytes(buf)[:80]!r}")
                        _reset(sock)
                        continue
                    if step == 0:
                        pending[fd] = (sock, bytearray(), 1)
                        sock.send(b"EHLO idle.test\r\n")
                    else:
                        ep.unregister(fd)
                        del pending[fd]
                        self.held.append(sock)
            for sock, _, _ in pending.values():
                self._fail("no greeting in time")
                _reset(sock)
        finally:
            ep.close()
            self.seconds = time.monotonic() - started
        return len(self.held)

    def still_open(self) -> int:
        """How many held connections the server has not closed (a peek at each)."""
        alive = 0
        for sock in self.held:
            try:
                data = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                alive += 1
                continue
            except OSError:
                continue
            if data:
                alive += 1   # something to read (a 421?) but still open
        return alive

    def close(self) -> None:
        for sock in self.held:
            _reset(sock)
        self.held.clear()


def _last_line_final(buf: bytearray) -> bool:
    """A multi-line reply is complete when its last line has a space after the code."""
    start = buf.rfind(b"\r\n", 0, len(buf) - 2)
    start = 0 if start < 0 else start + 2
    return buf[start + 3:start + 4] == b" "


@dataclass
class _Trickler:
    sock: socket.socket
    mode: str
    next_at: float
    sent: int = 0
    buf: bytearray = field(default_factory=bytearray)
    step: int = 0
    closed_at: float | None = None


class Tricklers:
    """Slowloris clients in one thread (see the module docstring): ``count`` connections,
    half in ``command`` mode, half in ``data`` mode, one byte every ``interval`` seconds each
    (staggered), until :meth:`stop`."""

    SETUP = (b"EHLO slow.test\r\n", b"MAIL FROM:<slow@sender.test>\r\n",
             b"RCPT TO:<alice@example.com>\r\n", b"DATA\r\n")

    def __init__(self, port: int, sources: Sequence[str], count: int,
                 interval: float = 2.0) -> None:
        self.port = port
        self.sources = list(sources)
        self.count = count
        self.interval = interval
        self.conns: list[_Trickler] = []
        self.failed = 0
        self.first_error = ""
        self.started_at = 0.0
        self.trickling_since = 0.0
        self.bytes_sent = 0
        self.closing_replies: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True, name="tricklers")
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        for conn in self.conns:
            _reset(conn.sock)

    def open_count(self) -> int:
        return sum(1 for c in self.conns if c.closed_at is None)

    def _run(self) -> None:
        ep = select.epoll()
        by_fd: dict[int, _Trickler] = {}
        self.started_at = now = time.monotonic()
        for i in range(self.count):
            try:
                sock = _connect(self.port, self.sources[i % len(self.sources)])
            except OSError as exc:
                self.failed += 1
                self.first_error = self.first_error or str(exc)
                continue
            conn = _Trickler(sock, "command" if i % 2 == 0 else "data",
                             now + self.interval * i / self.count)
            self.conns.append(conn)
            by_fd[sock.fileno()] = conn
            ep.register(sock.fileno(), select.EPOLLIN)
        setup_deadline = time.monotonic() + 60
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                for fd, _ in ep.poll(0.05):
                    self._readable(by_fd[fd], ep, now)
                if not self.ready.is_set():
                    done = all(c.step >= self._steps(c) or c.closed_at is not None
                               for c in self.conns)
                    if done or now > setup_deadline:
                        self.trickling_since = time.monotonic()
                        self.ready.set()
                    continue
                for conn in self.conns:
                    if conn.closed_at is None and now >= conn.next_at:
                        conn.next_at = now + self.interval
                        with contextlib.suppress(OSError):
                            conn.sock.send(b"x" if conn.sent else
                                           (b"NOOP " if conn.mode == "command" else b"y"))
                            conn.sent += 1
                            self.bytes_sent += 1
        finally:
            self.ready.set()
            ep.close()

    def _steps(self, conn: _Trickler) -> int:
        return 2 if conn.mode == "command" else 1 + len(self.SETUP)

    def _readable(self, conn: _Trickler, ep: select.epoll, now: float) -> None:
        try:
            data = conn.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            conn.buf += data
        if not data:
            if conn.closed_at is None:
                conn.closed_at = now
                last = bytes(conn.buf).rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1][:9].decode(
                    "ascii", "replace")
                self.closing_replies[last] = self.closing_replies.get(last, 0) + 1
            with contextlib.suppress(OSError, ValueError):
                ep.unregister(conn.sock.fileno())
            return
        # the set-up dialogue: one command per complete reply
        while conn.step < self._steps(conn) and conn.buf.endswith(b"\r\n") and \
                _last_line_final(conn.buf):
            conn.buf.clear()
            if conn.step < self._steps(conn) - 1:
                conn.sock.send(self.SETUP[conn.step])
            conn.step += 1


def _fleet_member(conn, port: int, sources: list[str], count: int,
                  nofile: int, timeout: float) -> None:
    """A child process of :class:`CrowdFleet`: hold ``count`` idle connections until told."""
    raise_nofile(nofile)
    crowd = IdleCrowd(port, sources, count)
    held = crowd.open(timeout)
    conn.send((held, crowd.failed, crowd.first_error, crowd.seconds))
    with contextlib.suppress(EOFError):
        conn.recv()
    crowd.close()
    conn.send("closed")


class CrowdFleet:
    """``count`` idle connections held by ``processes`` child processes (see IdleCrowd)."""

    def __init__(self, port: int, sources: Sequence[str], count: int, processes: int,
                 nofile: int) -> None:
        self.port = port
        self.sources = list(sources)
        self.count = count
        self.processes = processes
        self.nofile = nofile
        self.held = 0
        self.failed = 0
        self.first_error = ""
        self.seconds = 0.0
        self._members: list[tuple[Any, Any]] = []   # (process, pipe end)

    def open(self, timeout: float = 300.0) -> int:
        ctx = multiprocessing.get_context("spawn")
        started = time.monotonic()
        share, extra = divmod(self.count, self.processes)
        for i in range(self.processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_fleet_member, daemon=True, args=(
                child, self.port, self.sources, share + (i < extra), self.nofile, timeout))
            proc.start()
            self._members.append((proc, parent))
        for _, parent in self._members:
            if not parent.poll(timeout + 30):
                self.first_error = self.first_error or "a fleet member did not report"
                continue
            held, failed, first_error, _ = parent.recv()
            self.held += held
            self.failed += failed
            self.first_error = self.first_error or first_error
        self.seconds = time.monotonic() - started
        return self.held

    def close(self) -> None:
        for _proc, parent in self._members:
            with contextlib.suppress(OSError):
                parent.send("close")
        for proc, parent in self._members:
            with contextlib.suppress(OSError, EOFError):
                if parent.poll(60):
                    parent.recv()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        self._members.clear()
