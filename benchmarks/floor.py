"""What a message costs the machine, and the least any server could make it cost here.

Both servers, the load generator and the kernel share the same cores, and on a 2-core machine
a throughput race is decided by CPU time per message: msg/s ≈ busy cores / CPU s per message.
So every side-by-side run also records **machine CPU per message** (``/proc/stat``, all
processes: server, load generator, kernel threads), split into user and system time, plus the
idle time per message (time the cores waited, e.g. for a flush).

A ratio target then turns into a budget: pymta at 3× Postfix's rate on the same cores needs at
most a third of Postfix's CPU per message. Whether any server could stay within that budget is
answered by the **floor**, measured here with no MTA at all:

* ``smtp-sink``: Postfix's ``smtp-source`` against Postfix's ``smtp-sink`` (both C): the load
  generator, loopback TCP and the barest SMTP answering, nothing stored;
* ``python sink`` (not part of the floor, for comparison): the same against
  ``benchmarks/sink.py``, a do-nothing ``asyncio.Protocol`` SMTP responder on uvloop: what
  answering SMTP from Python costs before any MTA work;
* ``queue files``: the file-system work of a durable queue in the leanest form (one file per
  message: create, write, ``fdatasync`` in batches of ``sessions`` as a group commit would,
  one directory fsync per batch), from a tight loop with almost no user-space work;
* ``queue + maildir``: the same plus what delivery into a maildir must do (a new file written,
  fsynced and renamed into ``new/``) and the removal of the queue file.

``smtp-sink`` + ``queue files`` is the least CPU any durable server can spend per accepted
message on this machine; ``smtp-sink`` + ``queue + maildir`` the least for one delivered into
a maildir. A budget below its floor cannot be met by any implementation, in any language.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SMTP_SINK = Path("/usr/sbin/smtp-sink")


@dataclass(frozen=True, slots=True)
class CpuSample:
    """Cumulative machine CPU time (seconds) from ``/proc/stat``'s ``cpu`` line."""

    user: float     # user + nice
    system: float   # system + irq + softirq
    idle: float     # idle + iowait

    @classmethod
    def now(cls) -> CpuSample:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        ticks = [int(x) for x in fields]
        hz = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq = ticks[:7]
        return cls((user + nice) / hz, (system + irq + softirq) / hz, (idle + iowait) / hz)


@dataclass(frozen=True, slots=True)
class CpuCost:
    """Machine CPU per message, in milliseconds, over one run."""

    user_ms: float
    system_ms: float
    idle_ms: float

    @property
    def busy_ms(self) -> float:
        return self.user_ms + self.system_ms

    @classmethod
    def between(cls, before: CpuSample, after: CpuSample, messages: int) -> CpuCost:
        n = max(1, messages)
        return cls(1000 * (after.user - before.user) / n,
                   1000 * (after.system - before.system) / n,
                   1000 * (after.idle - before.idle) / n)


def fs_floor(directory: Path, messages: int, batch: int, size: int, deliver: bool) -> CpuCost:
    """CPU per message of the least file-system work of a durable queue (and, with
    ``deliver``, of maildir delivery), done in ``directory`` (the servers' file system)."""
    root = Path(tempfile.mkdtemp(prefix="pymta-floor-", dir=directory))
    try:
        queue, tmp, new = root / "q", root / "m" / "tmp", root / "m" / "new"
        for d in (queue, tmp, new):
            d.mkdir(parents=True)
        body = b"x" * size
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        before = CpuSample.now()
        for first in range(0, messages, batch):
            names = [str(i) for i in range(first, min(messages, first + batch))]
            fds = []
            for name in names:
                fd = os.open(queue / name, flags, 0o600)
                os.write(fd, body)
                fds.append(fd)
            for fd in fds:
                os.fdatasync(fd)
                os.close(fd)
            with _dir_fd(queue) as dfd:
                os.fsync(dfd)
            if deliver:
                for name in names:
                    fd = os.open(tmp / name, flags, 0o600)
                    os.write(fd, body)
                    os.fsync(fd)
                    os.close(fd)
                    os.rename(tmp / name, new / name)
                    os.unlink(queue / name)
        return CpuCost.between(before, CpuSample.now(), messages)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _dir_fd(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


def sink_floor(source_argv: Callable[[int], list[str]], messages: int,
               server_argv: Callable[[int], list[str]] | None = None) -> CpuCost:
    """CPU per message of ``smtp-source`` (``source_argv(port)``) against ``smtp-sink``, or
    against the server ``server_argv(port)`` starts."""
    from benchmarks.scenarios import BenchmarkError, free_port

    if server_argv is None and not SMTP_SINK.exists():
        raise BenchmarkError(f"{SMTP_SINK} is not installed (Debian package postfix)")
    port = free_port()
    sink = subprocess.Popen((server_argv or sink_argv)(port), cwd=Path(__file__).parents[1],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        before = CpuSample.now()
        proc = subprocess.run(source_argv(port), capture_output=True, text=True, timeout=600)
        after = CpuSample.now()
        if proc.returncode:
            raise BenchmarkError(f"smtp-source against a sink failed: {proc.stdout.strip()}")
        return CpuCost.between(before, after, messages)
    finally:
        sink.kill()
        sink.wait()


def sink_argv(port: int) -> list[str]:
    """``smtp-sink`` on loopback; as root it must be told whom to run as."""
    argv = [str(SMTP_SINK)]
    if os.geteuid() == 0:
        argv += ["-u", "nobody"]
    return [*argv, "-c", f"127.0.0.1:{port}", "256"]


def wait_listening(port: int, timeout: float = 10.0) -> None:
    """Until a sink accepts connections on loopback ``port`` (it has no greeting to wait for
    that would tell us sooner); OSError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
