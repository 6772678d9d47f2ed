"""Run ``python -m pymta serve`` as a subprocess for integration tests.

``ServerProc`` picks a free loopback port, builds a clean environment (only the variables the
test gives, never the developer's own ``MAIL_*``/``PYMTA_*``), waits for the ``220`` greeting,
collects stderr in a background thread (a pipe, so a file-size rlimit on the server does not
hit its log) and always ends the process: ``stop()`` sends SIGTERM, ``kill()`` SIGKILL, and the
``server`` fixture's finalizer kills whatever is left.

Also here: a tiny blocking SMTP client (``smtp_send``), the queue CLI runner (``cli``) and
polling with a deadline (``wait_until``), so every wait in the tests is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from pymta.config.load import _SETTINGS
from pymta.queue.choice import KINDS as QUEUE_STORES
from pymta.queue.choice import detect

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
START_TIMEOUT = 30.0
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 60.0

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect((host, port))
        except OSError:
            return False
        return True


def dead_relay() -> str:
    """An ``SMTP_RELAY_HOSTAUTH`` value naming a loopback port nothing listens on: every
    forward to a foreign domain is then deferred (``451 4.4.1 ... connect ... failed``), which
    keeps such a message in the queue for as long as a test wants it there. (Without a relay
    host the domain's MX is looked up, and ``remote.test`` has none: a bounce.)"""
    return f"[127.0.0.1]:{free_port()}"


def clean_environ(**env: str) -> dict[str, str]:
    """os.environ minus every pymta setting (and PYMTA_CONFIG), plus ``env``."""
    names = {s.env for s in _SETTINGS} | {"PYMTA_CONFIG", "PYMTA_TRACEBACK"}
    out = {k: v for k, v in os.environ.items() if k not in names}
    out.update(env)
    return out


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.1,
               what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class ServerProc:
    """One ``pymta serve`` subprocess on ``127.0.0.1:<port>`` with its own state and mail dirs."""

    def __init__(self, base: Path, *, port: int | None = None,
                 preexec_fn: Callable[[], None] | None = None, python: str = PYTHON,
                 **env: str) -> None:
        """``python``: the interpreter that runs ``-m pymta serve`` (one another uid can
        run, for a server that must not be root); ``preexec_fn`` runs in the child before
        it (e.g. to drop privileges)."""
        self.base = Path(base)
        self.state_dir = self.base / "state"
        self.mail_dir = self.base / "mail"
        self.mail_dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.preexec_fn = preexec_fn
        self.python = python
        self.env: dict[str, str] = {
            "MYHOSTNAME": "mx.example.com",
            "MAIL_DOMAIN": "example.com",
            "MAIL_BOXES": "alice@example.com:alice/ bob@example.com:bob",
            "MAIL_ALIASES": "fwd:someone@remote.test",
            "PYMTA_STATE_DIR": str(self.state_dir),
            "PYMTA_MAIL_DIR": str(self.mail_dir),
            "PYMTA_SMTP_LISTEN": f"127.0.0.1:{self.port}",
            "PYMTA_SUBMISSION_LISTEN": "none",
            "PYMTA_SUBMISSIONS_LISTEN": "none",
            "PYMTA_RETRY_FIRST": "0.5",
            "PYMTA_RETRY_MAX": "2",
            "SYSLOG_LEVEL": "7",
        }
        self.env.update(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self._stderr: list[str] = []
        self._reader: threading.Thread | None = None
        self._lock = threading.Lock()
        self.runs = 0

    # ------------------------------------------------------------------ lifecycle

    def environ(self) -> dict[str, str]:
        return clean_environ(**self.env)

    def start(self, wait: bool = True, timeout: float = START_TIMEOUT) -> ServerProc:
        """Start the server (again, on the same state dir and port, after a stop or kill)."""
        assert self.proc is None or self.proc.poll() is not None, "server already running"
        self.runs += 1
        with self._lock:
            self._stderr.append(f"----- run {self.runs} -----\n")
        self.proc = subprocess.Popen(
            [self.python, "-m", "pymta", "serve"], cwd=REPO, env=self.environ(),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=self.preexec_fn)
        self._reader = threading.Thread(target=self._collect, args=(self.proc,), daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def _collect(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            with self._lock:
                self._stderr.append(raw.decode("utf-8", "replace"))
        proc.stderr.close()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until a connection gets the ``220`` greeting (fails early if the process exits)."""
        deadline = time.monotonic() + timeout
        last = "no attempt"
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise AssertionError(
                    f"server exited with {self.proc and self.proc.returncode} before its "
                    f"greeting; stderr:\n{self.stderr[-4000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2.0) as s:
                    s.settimeout(5.0)
                    banner = s.makefile("rb").readline()
                    if banner.startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
                    last = repr(banner)
            except OSError as exc:
                last = str(exc)
            time.sleep(0.05)
        raise AssertionError(f"no 220 greeting within {timeout:g}s ({last}); "
                             f"stderr:\n{self.stderr[-4000:]}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        """The exit status; kills the process (and fails) if it does not exit in time."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"server did not exit within {timeout:g}s; stderr:\n"
                                 f"{self.stderr[-4000:]}") from None
        if self._reader is not None:
            self._reader.join(5)
        return rc

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait: the exit status."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> int:
        """SIGKILL and reap: the (negative) exit status."""
        self.signal(signal.SIGKILL)
        return self.wait(10)

    def cleanup(self) -> None:
        """For finalizers: make sure no process is left, whatever state the test left."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(10)
        if self._reader is not None:
            self._reader.join(5)

    @property
    def stderr(self) -> str:
        with self._lock:
            return "".join(self._stderr)

    # ------------------------------------------------------------------ the queue

    @property
    def queue_dir(self) -> Path:
        return self.state_dir / "queue"

    @property
    def queue_store(self) -> str:
        """The store the queue directory holds: ``sqlite`` once ``queue.db`` exists."""
        return detect(str(self.queue_dir))

    def queue_files(self, sub: str) -> list[str]:
        """The names in ``queue/<sub>``, the same for either queue store: ``env`` lists the
        queued messages (the SQLite store's rows, read-only, beside any ``env/`` files a
        conversion has not taken yet; AssertionError when there is neither, so a check
        that the queue is empty cannot pass for want of a queue), ``data`` the stored
        bodies (``data/`` files, and the ids of rows holding their body inline), ``corrupt``
        adds the ids of the rows the SQLite store set aside; other folders as they are."""
        path = self.queue_dir / sub
        names = set(os.listdir(path)) if path.is_dir() else set()
        database = self.queue_dir / "queue.db"
        if sub == "env":
            if not path.is_dir() and not database.exists():
                raise AssertionError(f"no queue at {self.queue_dir}: neither env/ nor "
                                     "queue.db exists")
            names.update(self._queue_rows("SELECT qid FROM messages"))
        elif sub == "data":
            names.update(self._queue_rows("SELECT qid FROM messages WHERE body IS NOT NULL"))
        elif sub == "corrupt":
            names.update(self._queue_rows("SELECT qid FROM set_aside"))
        return sorted(names)

    def _queue_rows(self, query: str) -> list[str]:
        """The first column of ``query`` in ``queue/queue.db`` (read-only), [] without it."""
        database = self.queue_dir / "queue.db"
        if not database.exists():
            return []
        uri = f"file:{urllib.parse.quote(str(database))}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True, timeout=10)) as db:
            try:
                return [str(row[0]) for row in db.execute(query)]
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):     # created, schema not yet written
                    return []
                raise

    def cli(self, *args: str, check: bool = False,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``python -m pymta ARGS`` with the server's environment."""
        proc = subprocess.run([PYTHON, "-m", "pymta", *args], cwd=REPO, env=self.environ(),
                              capture_output=True, text=True, timeout=timeout)
        if check:
            assert proc.returncode == 0, (args, proc.returncode, proc.stderr)
        return proc

    def queue_json(self) -> list[dict[str, Any]]:
        proc = self.cli("queue", "list", "--json", check=True)
        data = json.loads(proc.stdout)
        assert isinstance(data, list)
        return data

    def queue_entry(self, qid: str) -> dict[str, Any] | None:
        for entry in self.queue_json():
            if entry["id"] == qid:
                return entry
        return None

    def wait_queue_empty(self, timeout: float) -> None:
        try:
            wait_until(lambda: not self.queue_files("env"), timeout, 0.2, "the queue to empty")
        except AssertionError as exc:
            listing = self.cli("queue", "list").stdout
            raise AssertionError(
                f"{exc}: {len(self.queue_files('env'))} message(s) left\n"
                f"queue list (head):\n{listing[:2000]}\nserver stderr (tail):\n"
                f"{self.stderr[-3000:]}") from None


# ---------------------------------------------------------------------------- SMTP client


class SMTPReplyError(AssertionError):
    pass


class SMTPClient:
    """A blocking SMTP client that returns every reply instead of raising on 4xx/5xx."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0,
                 source: str | None = None) -> None:
        """``source``: the local address to connect from (any 127.0.0.0/8 address works on
        Linux loopback), for tests about what the server makes of the client's address."""
        self.sock = socket.create_connection((host, port), timeout=timeout,
                                             source_address=(source, 0) if source else None)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> tuple[int, str]:
        lines: list[str] = []
        while True:
            raw = self.file.readline()
            if not raw:
                raise ConnectionError(f"connection closed after {lines!r}")
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "".join(lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def send(self, sender: str, rcpts: Iterable[str], data: bytes) -> tuple[int, str]:
        """One transaction; the reply that ended it (the first failure, or end of data).

        ``data`` is the message with CRLF line ends; dot-stuffing and the final dot are added.
        A server may answer before the client has sent everything (a spool write error); the
        rest is sent if the connection still takes it, and the reply read either way.
        """
        code, text = self.cmd(f"MAIL FROM:<{sender}>")
        if code >= 400:
            return code, text
        accepted = 0
        last = (code, text)
        for rcpt in rcpts:
            last = self.cmd(f"RCPT TO:<{rcpt}>")
            accepted += last[0] < 400
        if not accepted:
            self.cmd("RSET")
            return last
        code, text = self.cmd("DATA")
        if code != 354:
            return code, text
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.sock.sendall(stuffed + b".\r\n")
        return self.reply()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"QUIT\r\n")
            self.sock.settimeout(2.0)
            self.file.readline()
        self.file.close()
        self.sock.close()

    def __enter__(self) -> SMTPClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_message(sender: str, rcpt: str, subject: str, body: str = "hello\r\n",
                 extra_headers: Mapping[str, str] | None = None) -> bytes:
    headers = {"From": f"<{sender}>", "To": f"<{rcpt}>", "Subject": subject,
               "Message-ID": f"<{subject.replace(' ', '.')}@test.example>",
               **(extra_headers or {})}
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n" + body).encode()


def smtp_send(port: int, sender: str, rcpts: Iterable[str], data: bytes) -> tuple[int, str]:
    """Connect, EHLO, send one message, QUIT: the final reply (code, text)."""
    with SMTPClient(port) as client:
        code, text = client.cmd("EHLO client.test")
        assert code == 250, text
        return client.send(sender, rcpts, data)


def queued_id(reply_text: str) -> str:
    """The id of ``250 2.0.0 Ok: queued as QID``."""
    marker = "queued as "
    assert marker in reply_text, reply_text
    return reply_text.split(marker, 1)[1].split()[0]


# ---------------------------------------------------------------------------- fixture


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[Callable[..., ServerProc]]:
    """``server_factory(name="srv", **env)``: a not yet started ServerProc under tmp_path;
    every process made here is killed at teardown, whatever the test did."""
    made: list[ServerProc] = []

    def factory(name: str = "srv", **kwargs: Any) -> ServerProc:
        srv = ServerProc(tmp_path / name, **kwargs)
        made.append(srv)
        return srv

    yield factory
    for srv in made:
        srv.cleanup()


@pytest.fixture(params=QUEUE_STORES)
def server_factory_each_store(request: pytest.FixtureRequest,
                              tmp_path: Path) -> Iterator[Callable[..., ServerProc]]:
    """``server_factory`` once per queue store (``PYMTA_QUEUE_STORE``, unless the test sets
    it): tests of what must work on either (the queue and quarantine commands). At teardown,
    every server that ran must have left the queue of its store (else the test ran on the
    other one twice)."""
    kind = str(request.param)
    made: list[ServerProc] = []

    def factory(name: str = "srv", **kwargs: Any) -> ServerProc:
        kwargs.setdefault("PYMTA_QUEUE_STORE", kind)
        srv = ServerProc(tmp_path / name, **kwargs)
        made.append(srv)
        return srv

    yield factory
    for srv in made:
        srv.cleanup()
    for srv in made:
        if srv.runs and srv.env["PYMTA_QUEUE_STORE"] == kind:
            assert srv.queue_store == kind, f"{srv.base}: a {srv.queue_store} queue"
