"""``python -m benchmarks.loadgen`` as a user runs it: a subprocess against a real pymta
(``pymta serve``) and against Postfix's own ``smtp-sink``, each counting what it received so
that the figures the CLI prints are checked against the server's side (issue 14, item 5).

Small loads only (a few hundred messages): nothing here measures speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serverproc
from serverproc import REPO, ServerProc, clean_environ, free_port, wait_until

from benchmarks.floor import sink_argv, wait_listening
from tests.services.base import require_binary

server_factory = serverproc.server_factory  # the fixture

CLI_TIMEOUT = 120.0
SinkCounters = Callable[[], dict[str, int]]
StartSink = Callable[..., tuple[int, SinkCounters]]
Factory = Callable[..., ServerProc]


def loadgen(*args: str, env: dict[str, str] | None = None,
            timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """``python -m benchmarks.loadgen ARGS`` from the checkout, output captured (not a tty)."""
    return subprocess.run([sys.executable, "-m", "benchmarks.loadgen", *args], cwd=REPO,
                          env=env or clean_environ(), capture_output=True, text=True,
                          timeout=timeout)


def field(text: str, name: str) -> str:
    """The value of the summary line ``name  value``."""
    match = re.search(rf"^{re.escape(name)}\s+(.+)$", text, re.M)
    assert match, f"no {name!r} line in:\n{text}"
    return match[1]


def counts(text: str) -> tuple[int, int, int, int]:
    """accepted, 4xx, 5xx, errors as the text summary prints them."""
    return tuple(int(field(text, n)) for n in ("accepted", "4xx", "5xx", "errors"))  # type: ignore[return-value]


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------ pymta


def test_against_pymta_every_accepted_message_is_in_the_mailbox(server_factory: Factory) -> None:
    srv: ServerProc = server_factory("lg").start()
    proc = loadgen(f"127.0.0.1:{srv.port}", "-s", "5", "-m", "200", "-l", "2k",
                   "--per-session", "4", "--to", "alice@example.com", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert (data["accepted"], data["temp_failed"], data["perm_failed"], data["errors"]) == \
        (200, 0, 0, 0)
    assert data["pipelining_used"] is True and data["size"] == 2048
    assert data["latency_count"] == 200
    assert 0 < data["p50_ms"] <= data["p90_ms"] <= data["p99_ms"] <= data["max_ms"]
    new = srv.mail_dir / "alice" / "new"
    wait_until(lambda: new.is_dir() and len(os.listdir(new)) >= 200, 60,
               what="200 messages in alice's maildir")
    assert len(os.listdir(new)) == data["accepted"]


def test_against_pymta_unknown_recipients_are_5xx(server_factory: Factory) -> None:
    srv: ServerProc = server_factory("lg").start()
    proc = loadgen(f"127.0.0.1:{srv.port}", "-s", "3", "-m", "30", "--no-pipelining",
                   "--to", "nobody@example.com")
    assert proc.returncode == 0, proc.stderr
    assert counts(proc.stdout) == (0, 0, 30, 0)
    assert "pipelining off" in field(proc.stdout, "load")
    assert field(proc.stdout, "latency").endswith("(end of data → reply, 0 messages)")


def test_against_pymta_with_starttls(server_factory: Factory) -> None:
    srv: ServerProc = server_factory("lg", SMTPD_USE_TLS="yes").start()
    proc = loadgen(f"127.0.0.1:{srv.port}", "-s", "4", "-m", "40", "--starttls",
                   "--to", "alice@example.com")
    assert proc.returncode == 0, proc.stderr
    assert counts(proc.stdout) == (40, 0, 0, 0)
    assert field(proc.stdout, "target") == f"127.0.0.1:{srv.port}  (STARTTLS)"
    new = srv.mail_dir / "alice" / "new"
    wait_until(lambda: new.is_dir() and len(os.listdir(new)) >= 40, 60,
               what="40 messages in alice's maildir")
    one = next(new.iterdir()).read_text()
    assert re.search(r"by mx\.example\.com \(pymta\) with ESMTPS id ", one), one[:800]


def test_progress_without_a_terminal_is_a_plain_line(server_factory: Factory) -> None:
    srv: ServerProc = server_factory("lg").start()
    proc = loadgen(f"127.0.0.1:{srv.port}", "-s", "2", "-m", "45", "--rate", "30",
                   "--to", "alice@example.com")
    assert proc.returncode == 0, proc.stderr
    assert counts(proc.stdout) == (45, 0, 0, 0)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("loadgen: ")]
    assert lines, proc.stderr
    assert re.fullmatch(r"loadgen: \d+\.\ds \d+/45 done, \d+ accepted, \d+ msg/s, "
                        r"4xx 0, 5xx 0, errors 0", lines[0]), lines
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr


def test_progress_on_a_terminal_is_a_bar(server_factory: Factory) -> None:
    srv: ServerProc = server_factory("lg").start()
    master, slave = os.openpty()
    termios.tcsetwinsize(slave, (24, 100))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.loadgen", f"127.0.0.1:{srv.port}", "-s", "2",
             "-m", "30", "--rate", "40", "--to", "alice@example.com"],
            cwd=REPO, env=clean_environ(), stdout=subprocess.PIPE, stderr=slave,
            text=True, timeout=CLI_TIMEOUT)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    assert proc.returncode == 0
    assert counts(proc.stdout) == (30, 0, 0, 0)
    shown = b"".join(chunks).decode()
    assert re.search(r"\r\[#*-*\]\s+\d+/30\s+\d+%", shown), repr(shown[:500])
    assert shown.endswith("\r\x1b[K"), repr(shown[-200:])   # the bar is wiped at the end


# ------------------------------------------------------------------ Postfix's smtp-sink


@pytest.fixture
def smtp_sink(tmp_path: Path) -> Iterator[StartSink]:
    """``smtp_sink(*options)``: start Postfix's ``smtp-sink -c`` (running counters) on a free
    port with the extra options; returns the port and a function reading its last counter
    line (``sess=… quit=… mesg=…``). Every sink is killed at teardown."""
    binary = require_binary("smtp-sink", "postfix")
    started: list[subprocess.Popen[bytes]] = []

    def start(*options: str) -> tuple[int, SinkCounters]:
        port = free_port()
        argv = sink_argv(port)
        argv[0] = binary
        out = tmp_path / f"sink-{port}.out"
        with open(out, "wb") as f:
            started.append(subprocess.Popen([argv[0], *options, *argv[1:]], stdout=f,
                                            stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL))
        wait_listening(port)

        def counters() -> dict[str, int]:
            last = out.read_bytes().decode().replace("\n", "\r").split("\r")
            text = next((ln for ln in reversed(last) if "mesg=" in ln), "")
            return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", text)}

        return port, counters

    yield start
    for proc in started:
        proc.kill()
        proc.wait(10)


def test_against_smtp_sink_counts_match(smtp_sink: StartSink, tmp_path: Path) -> None:
    port, counters = smtp_sink()
    png = tmp_path / "sink.png"
    proc = loadgen(f"127.0.0.1:{port}", "-s", "10", "-m", "300", "-l", "4096",
                   "--per-session", "3", "--plot", str(png))
    assert proc.returncode == 0, proc.stderr
    assert counts(proc.stdout) == (300, 0, 0, 0)
    assert "pipelining used" in field(proc.stdout, "load")
    # the sink's own count of messages (each "." it received)
    wait_until(lambda: counters().get("mesg") == 300, 10, what="mesg=300 from smtp-sink")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot written to {png}" in proc.stderr


@pytest.mark.parametrize(("options", "expected"), [
    (("-r", "rcpt"), (0, 120, 0, 0)),        # 450 to every RCPT
    (("-f", "."), (0, 0, 120, 0)),           # 500 at the end of data
])
def test_against_smtp_sink_refusals_are_counted(
        smtp_sink: StartSink, options: tuple[str, ...],
        expected: tuple[int, int, int, int]) -> None:
    port, _ = smtp_sink(*options)
    proc = loadgen(f"127.0.0.1:{port}", "-s", "6", "-m", "120")
    assert proc.returncode == 0, proc.stderr
    assert counts(proc.stdout) == expected
    # -r and -f imply -p: the sink stops offering PIPELINING, and the CLI says so
    assert "pipelining not offered by the server" in field(proc.stdout, "load")
    latencies = 120 if options[1] == "." else 0
    assert field(proc.stdout, "latency").endswith(
        f"(end of data → reply, {latencies} messages)")


# ------------------------------------------------------------------ failures a user meets


def test_nothing_listening_is_exit_1_without_traceback() -> None:
    port = free_port()
    proc = loadgen(f"127.0.0.1:{port}", "-m", "10")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr == (f"python -m benchmarks.loadgen: cannot connect to 127.0.0.1:{port}: "
                           "Connection refused\n")


def test_bad_argument_is_one_line_and_exit_2() -> None:
    proc = loadgen("127.0.0.1:25", "-s", "none")
    assert proc.returncode == 2
    assert proc.stderr == ("python -m benchmarks.loadgen: argument -s/--sessions: 'none' is "
                           "not a whole number (see 'python -m benchmarks.loadgen --help')\n")
    no_traceback(proc)


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path: Path) -> None:
    # A matplotlib that fails to import, ahead of the real one on the path: what a user
    # without the bench extra sees. The run must not start (nothing listens on the port).
    shim = tmp_path / "no-matplotlib" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "raise ImportError(\"No module named 'matplotlib'\")\n")
    env = clean_environ(PYTHONPATH=str(shim.parent))
    proc = loadgen(f"127.0.0.1:{free_port()}", "--plot", str(tmp_path / "x.png"), env=env)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("python -m benchmarks.loadgen: --plot needs matplotlib")
    assert "pip install 'pymta-server[bench]'" in proc.stderr
    assert proc.stderr.count("\n") == 1
    no_traceback(proc)
