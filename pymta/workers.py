"""The supervisor: several identical worker processes sharing the listening ports and the spool.

Python runs one core per process, so ``PYMTA_WORKERS`` processes are what lets pymta use the
machine. Implementation summary. The supervisor binds every listening address once per worker
with ``SO_REUSEPORT`` (the kernel spreads new connections evenly) *before* forking, so the
sockets outlive any one worker: connections that arrive while a worker restarts wait in its
socket's backlog instead of being refused. Each worker is a complete server (`serve_async`)
with its own event loop and queue manager over the shared spool; the queue store's per-message
``flock`` makes sure only one process attempts a message at a time, and a worker's crash
releases its locks. Workers die with the supervisor (``PR_SET_PDEATHSIG``), so ``kill -9`` of
the supervisor cannot leave orphans holding the port. The supervisor restarts a worker that
exits unexpectedly (with a pause so a crash loop does not spin), forwards SIGTERM (drain and
stop), SIGINT (stop now) and SIGUSR1 (rescan the queue) to all workers, and owns the pid file.

SIGHUP (reload, :mod:`pymta.reload`): the supervisor loads the configuration again and
checks it; a bad one is logged once and goes no further. A good one becomes the supervisor's
own (its reloadable part: the workers it forks later start from it) and SIGHUP goes to every
worker, which loads and applies the same (a starting worker once it has started, see below).

SIGUSR1's and SIGHUP's default action is to terminate, and a worker installs its real
handlers only once it has started (``serve_async``), so from the fork until then a worker
records a SIGUSR1 (``pymta queue flush``/``release`` during its start-up) or a SIGHUP and
sends it to itself again as soon as the real handler is in place: the request is neither
fatal nor lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any

from pymta import app, exporter, servertls, wiring
from pymta.config.errors import ConfigError
from pymta.config.model import Config, ListenAddress
from pymta.queue.choice import resolve
from pymta.reload import plan
from pymta.tls import server_ssl_context

log = logging.getLogger("pymta")

PR_SET_PDEATHSIG = 1
RESTART_PAUSE = 1.0
STARTUP_POLL = 0.05     # how often a starting worker looks whether its handler is in place


def _bind(addresses: tuple[ListenAddress, ...], copies: int) -> list[list[socket.socket]]:
    """For each worker, one socket per address; all copies share the port (SO_REUSEPORT)."""
    per_worker: list[list[socket.socket]] = [[] for _ in range(copies)]
    for addr in addresses:
        host = addr.host or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        port = addr.port
        if port:
            _probe(family, host, port)
        for i in range(copies):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None
            sock.listen(1024)
            sock.setblocking(False)
            port = sock.getsockname()[1]  # port 0: the copies take the port the first got
            per_worker[i].append(sock)
    return per_worker


def _probe(family: int, host: str, port: int) -> None:
    """Refuse a port another server already listens on. SO_REUSEPORT would otherwise let a
    second pymta (same user) bind it too and silently take half of the connections."""
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from None


class Supervisor:
    def __init__(self, config: Config,
                 reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.reload_config = reload_config
        self.children: dict[int, int] = {}   # pid -> worker index
        self.stopping = False
        self.sockets: list[dict[str, list[socket.socket]]] = []
        self.tls_on = False
        self.exporter: exporter.MetricsExporter | None = None   # PYMTA_METRICS_LISTEN

    # ------------------------------------------------------------------ set-up

    def _prepare(self) -> None:
        """Everything that can fail on bad configuration happens here, before any fork, so
        the CLI reports it once (ConfigError → exit 2) and nothing listens."""
        config = self.config
        wiring.check(config)              # every adapter's settings, nothing built
        os.makedirs(config.state_dir, mode=0o700, exist_ok=True)
        resolve(os.path.join(config.state_dir, "queue"), config.queue_store)  # no way back
        ssl_ctx = server_ssl_context(config)  # generates the self-signed pair once
        self.tls_on = ssl_ctx is not None    # what a reload compares with (pymta.reload)
        self.exporter = exporter.for_config(config, multiprocess=True)   # bound, not serving
        n = config.workers
        kinds = {"smtp": _bind(config.smtp_listen, n)}
        if config.sasl_methods and ssl_ctx is not None:
            kinds["submission"] = _bind(config.submission_listen, n)
            kinds["submissions"] = _bind(config.submissions_listen, n)
        self.sockets = [{kind: socks[i] for kind, socks in kinds.items()} for i in range(n)]

    # ------------------------------------------------------------------ workers

    def _spawn(self, index: int) -> None:
        pid = os.fork()
        if pid:
            self.children[pid] = index
            return
        code = 1
        try:
            # First of all: the parent's handlers would forward signals to our siblings.
            self.children = {}
            early = _EarlySignals()
            signal.signal(signal.SIGUSR1, early)
            signal.signal(signal.SIGHUP, early)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _die_with_parent()
            if self.exporter is not None:
                self.exporter.in_worker()   # its own count files; the endpoint is ours
            for i, socks in enumerate(self.sockets):
                if i != index:
                    for sock in (s for group in socks.values() for s in group):
                        sock.close()
            app.install_uvloop()
            code = asyncio.run(early.replayed(
                app.serve_async(self.config, sockets=self.sockets[index], pid_file=False,
                                reload_config=self.reload_config)))
        except BaseException:  # a worker must never return into the parent's code
            log.exception("worker %d failed", index)
        finally:
            logging.shutdown()
            os._exit(code)

    def _forward(self, signum: int) -> None:
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _on_stop(self, signum: int, frame: object) -> None:
        self.stopping = True
        self._forward(signum)    # SIGTERM drains, SIGINT stops at once
        # Our copies of the listening sockets would keep the ports open while the workers
        # drain: new clients would wait in the backlog and then be reset. Closed, they are
        # refused at once (and a balancer sees the port closed).
        for socks in self.sockets:
            for sock in (s for group in socks.values() for s in group):
                sock.close()

    def _on_hup(self, signum: int, frame: object) -> None:
        try:
            new = (self.reload_config or app.load_from_environment)()
            step = plan(self.config, new, tls_running=self.tls_on)
            wiring.check(step.config)
            servertls.check(step.config)    # the certificates, as the workers will (no writes)
        except ConfigError as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            return
        except Exception:     # a handler must not raise into the waitpid loop
            log.exception("reload failed, the running configuration stays")
            return
        self.config = step.config
        self._forward(signal.SIGHUP)

    def _on_usr1(self, signum: int, frame: object) -> None:
        self._forward(signal.SIGUSR1)

    def run(self) -> int:
        self._prepare()
        pid_path = os.path.join(self.config.state_dir, "pymta.pid")
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGUSR1, self._on_usr1)
        signal.signal(signal.SIGHUP, self._on_hup)
        for first in range(self.config.workers):
            self._spawn(first)
        if self.exporter is not None:
            self.exporter.start()     # a thread: after the first forks
        with open(pid_path, "w") as f:
            f.write(f"{os.getpid()}\n")
        log.log(25, "pymta started: %d workers (supervisor pid %d)", self.config.workers,
                os.getpid())
        started: dict[int, float] = {}
        exit_code = 0
        try:
            while self.children:
                try:
                    pid, status = os.waitpid(-1, 0)
                except ChildProcessError:
                    break
                index = self.children.pop(pid, None)
                if index is None:
                    continue
                if self.exporter is not None:
                    self.exporter.worker_exited(pid)
                code = os.waitstatus_to_exitcode(status)
                if self.stopping:
                    continue
                log.error("worker %d (pid %d) exited with status %d; restarting", index, pid,
                          code)
                last = started.get(index, 0.0)
                if time.monotonic() - last < RESTART_PAUSE:
                    time.sleep(RESTART_PAUSE)
                started[index] = time.monotonic()
                if not self.stopping:
                    self._spawn(index)
        finally:
            self.stopping = True
            self._forward(signal.SIGTERM)
            for pid in list(self.children):
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
            with contextlib.suppress(OSError):
                os.unlink(pid_path)
            if self.exporter is not None:
                self.exporter.close()
            log.log(25, "pymta stopped")
        return exit_code


class _EarlySignals:
    """A starting worker's SIGUSR1 and SIGHUP handler: records the requests (see the module
    docstring).

    The real handlers are installed by ``serve_async`` (``loop.add_signal_handler``) once the
    server has started; ``replayed`` runs it and sends each signal that arrived before to
    this process once, as soon as that signal's real handler is in place. (Polling, every
    ``STARTUP_POLL`` seconds during start-up only: ``serve_async`` offers no hook for
    "started".)
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGHUP)

    def __init__(self) -> None:
        self.requested: set[int] = set()

    def __call__(self, signum: int, frame: object) -> None:
        self.requested.add(signum)

    async def replayed(self, serve: Coroutine[Any, Any, int]) -> int:
        task = asyncio.ensure_future(serve)
        waiting = list(self.SIGNALS)
        while waiting and not task.done():
            for signum in list(waiting):
                if signal.getsignal(signum) is not self:    # the real one is in place
                    waiting.remove(signum)
                    if signum in self.requested:
                        os.kill(os.getpid(), signum)
            if waiting:
                await asyncio.wait({task}, timeout=STARTUP_POLL)
        return await task


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() == 1:  # the parent died before prctl took effect
            os._exit(1)
