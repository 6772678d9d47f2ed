"""Plumbing shared by the throwaway test services: binaries, ports, scratch dirs, readiness, stop.

Every service is started by the tests themselves (never the machine's own instances) in its own
scratch directory, stopped by its PID (TERM, wait, KILL of its process group), and keeps its logs
so that a failed start or test can say why.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/lib/postfix/sbin")
# Keep scratch dirs after stop (for post-mortems) when this env var is set to a non-empty value.
KEEP_ENV = "PYMTA_TEST_KEEP_SERVICE_DIRS"
# Parent of every scratch dir (default: the system temp dir, e.g. /tmp).
TMP_ENV = "PYMTA_TEST_SERVICE_TMPDIR"


class ServiceError(RuntimeError):
    """A test service could not be set up, started or used; the message carries its log tail."""


def require_binary(name: str, package: str) -> str:
    """Absolute path of ``name`` (PATH plus the sbin dirs) or a ServiceError naming the package."""
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN_DIRS])
    found = shutil.which(name, path=path)
    if not found:
        raise ServiceError(
            f"{name!r} not found: install the Debian package {package!r} "
            f"(scripts/test.sh installs it: apt-get install {package})"
        )
    return found


def make_scratch_dir(name: str, base: str | os.PathLike[str] | None = None) -> Path:
    """A fresh 0755 directory (daemons running as other users must be able to traverse it)."""
    if base is None:
        base = os.environ.get(TMP_ENV) or tempfile.gettempdir()
    parent = Path(base)
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"pymta-{name}-", dir=parent))
    path.chmod(0o755)
    return path


def port_in_use(port: int, host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as s:
        if kind == socket.SOCK_STREAM:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def choose_port(env: str, default: int, explicit: int | None = None) -> tuple[int, bool]:
    """(port, fixed). An explicit argument or the env var is used as given (``fixed``: a busy port
    is then an error); otherwise the default, or a free port when the default is busy."""
    if explicit is not None:
        return explicit, True
    value = os.environ.get(env, "").strip()
    if value:
        try:
            return int(value), True
        except ValueError:
            raise ServiceError(f"{env}={value!r} is not a port number") from None
    if not port_in_use(default):
        return default, False
    return free_port(), False


def run(cmd: Sequence[str], *, input: str | bytes | None = None, check: bool = True,
        timeout: float = 60.0, env: dict[str, str] | None = None,
        tty: bool = False) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise ServiceError with its output.

    ``tty=True`` runs it under ``script`` so that tools which only print errors to a terminal
    (the ``postfix`` command) show them.
    """
    argv = list(cmd)
    if tty:
        argv = ["script", "-qec", shlex.join(argv), "/dev/null"]
    data = input.decode() if isinstance(input, bytes) else input
    try:
        proc = subprocess.run(argv, input=data, capture_output=True, text=True, timeout=timeout,
                              env=env, stdin=None if data is not None else subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise ServiceError(f"timed out after {timeout}s: {shlex.join(argv)}") from e
    if check and proc.returncode != 0:
        raise ServiceError(
            f"command failed (exit {proc.returncode}): {shlex.join(argv)}\n"
            f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}"
        )
    return proc


def tail(path: str | os.PathLike[str], lines: int = 40) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def read_pidfile(path: str | os.PathLike[str]) -> int | None:
    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05,
               what: str = "condition", on_timeout: Callable[[], str] | None = None) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = on_timeout() if on_timeout else ""
            raise ServiceError(f"{what}: not reached within {timeout}s\n{extra}")
        time.sleep(interval)


def read_greeting(host: str, port: int, timeout: float = 1.0) -> bytes:
    """The first bytes a server sends after connect (b"" when nothing comes or connect fails)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            data = s.recv(4096)
    except OSError:
        return b""
    return data


def wait_for_greeting(host: str, port: int, prefix: bytes, timeout: float,
                      alive: Callable[[], bool] | None = None,
                      on_fail: Callable[[], str] | None = None,
                      what: str = "service") -> None:
    """Poll until a connection to host:port is greeted with ``prefix`` (e.g. b"220", b"* OK")."""
    deadline = time.monotonic() + timeout
    last = b""
    while True:
        last = read_greeting(host, port)
        if last.startswith(prefix):
            return
        if alive is not None and not alive():
            raise ServiceError(f"{what} exited during start-up\n{on_fail() if on_fail else ''}")
        if time.monotonic() > deadline:
            raise ServiceError(
                f"{what}: no {prefix!r} greeting on {host}:{port} within {timeout}s "
                f"(last: {last[:100]!r})\n{on_fail() if on_fail else ''}"
            )
        time.sleep(0.05)


def signal_pid(pid: int | None, sig: int) -> None:
    if pid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_gone(pid: int | None, timeout: float,
              popen: subprocess.Popen[bytes] | None = None) -> bool:
    if not pid:
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=0.05)
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def kill_hard(pid: int | None, popen: subprocess.Popen[bytes] | None = None) -> None:
    """SIGKILL the process and its process group (all our daemons lead their own group)."""
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
    signal_pid(pid, signal.SIGKILL)
    wait_gone(pid, 5.0, popen)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the test process dies (even by SIGKILL), so
    a killed pytest leaves no daemons behind (Linux ``PR_SET_PDEATHSIG``)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


class Service:
    """Base: subclasses implement ``_start()`` and set ``self.pid`` (+ ``self._popen`` when the
    daemon is our child); ``start()``/``stop()``/``terminate()``/``wait_stopped()`` are shared.

    ``stop()`` = ``terminate()`` (SIGTERM, non-blocking) + ``wait_stopped()`` (wait, then SIGKILL
    of the group). Stopping several services: terminate all first, then wait (much faster).
    """

    name = "service"
    stop_timeout = 10.0

    def __init__(self, base_dir: str | os.PathLike[str] | None = None) -> None:
        self._base_dir = base_dir
        self.dir: Path = Path()
        self.pid: int | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self.running = False
        self.ports_fixed = False  # set by _start: True when a port came from an argument/env var
        self._atexit_registered = False

    # subclass hooks ------------------------------------------------------------------------
    def _start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_paths(self) -> Iterable[Path]:
        return ()

    def children(self) -> Iterable[Service]:
        """Helper services owned by this one (stopped together with it)."""
        return ()

    # shared ---------------------------------------------------------------------------------
    def logs(self, lines: int = 40) -> str:
        parts = [f"--- {p} ---\n{tail(p, lines)}" for p in self.log_paths()]
        return "\n".join(parts)

    def start(self) -> Service:
        if self.running:
            return self
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True
        for attempt in range(3):
            self.dir = make_scratch_dir(self.name, self._base_dir)
            self.ports_fixed = False
            try:
                self._start()
            except ServiceError as e:
                # Lost a race for a default/free port with another process: pick again.
                retry = attempt < 2 and not self.ports_fixed and addr_in_use(str(e))
                self.stop()
                if retry:
                    continue
                raise
            except BaseException:
                self.stop()
                raise
            break
        self.running = True
        return self

    def terminate(self) -> None:
        """Send SIGTERM to this service (and its helpers) without waiting."""
        for child in self.children():
            child.terminate()
        signal_pid(self.pid, signal.SIGTERM)

    def wait_stopped(self) -> None:
        """Wait for the TERMed service to exit; SIGKILL its process group when it takes too long."""
        if self.pid and not wait_gone(self.pid, self.stop_timeout, self._popen):
            kill_hard(self.pid, self._popen)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=1)
        self.pid = None
        self._popen = None
        self.running = False
        for child in self.children():
            child.wait_stopped()
        if self.dir != Path() and not os.environ.get(KEEP_ENV):
            shutil.rmtree(self.dir, ignore_errors=True)

    def stop(self) -> None:
        self.terminate()
        self.wait_stopped()

    def __enter__(self) -> Service:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _spawn(self, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        """Start a foreground daemon as our child in its own session, output appended to ``log``."""
        with open(log, "ab") as out:
            self._popen = subprocess.Popen(
                list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, env=env, cwd=self.dir, preexec_fn=_die_with_parent,
            )
        self.pid = self._popen.pid

    def _child_alive(self) -> bool:
        return self._popen is None or self._popen.poll() is None


def stop_all(services: Iterable[Service]) -> None:
    """TERM every service first, then wait for each: shutdowns overlap."""
    services = [s for s in services if s is not None]
    for s in services:
        with contextlib.suppress(Exception):
            s.terminate()
    for s in services:
        s.wait_stopped()


def addr_in_use(text: str) -> bool:
    t = text.lower()
    return "address already in use" in t or "errno 98" in t or "eaddrinuse" in t
