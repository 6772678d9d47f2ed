"""Benchmark scenarios: each starts a real server process, loads it, and measures.

Why subprocesses: the server must not share an interpreter (GIL, event loop, allocator) with
the load generator, and it must be started exactly as users start it (``python -m pymta
serve`` configured by environment variables), so the number is the one a user would see.

Scenarios (one fresh server and a fresh temporary directory per round and client):
  * ``accept-deliver``: pymta accepts mail for ``box@example.com`` and delivers it to a
    maildir. Measures accepted msgs/s (load time) and delivered msgs/s (from the first
    connection until the last file appears in ``box/new``), plus end-of-data latency.
  * ``pipeline-cost``: ``accept-deliver`` repeated with the pre-queue stages switched by
    their variables: none, each stage alone (SPF, DKIM verify, DMARC, ARC, DKIM sign, SRS,
    banned files, bad header, and the scanners clamd, spamd, rspamd, started as the
    ``content`` scenario starts them; ``PIPELINE_STAGES``, a stage pymta has no setting for
    yet is skipped with a note), and all at their defaults; one row each. The benchmark
    runs a test DNS server on loopback for x.test (SPF, DKIM key, DMARC) and signs the
    message for the verifying stages.
  * ``sink``: ``benchmarks.sink`` instead of pymta. Measures the load generator's own ceiling
    on this machine; a pymta figure near it says "client-bound", not "server is this fast".

``relay-through`` (relaying to a sink) runs side by side with Postfix: ``benchmarks/relay.py``.

Clients: ``loadgen`` (benchmarks/loadgen.py) and, if installed, Postfix's ``smtp-source``
(C, the generator the performance baseline was measured with; it reports no latencies).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.loadgen import run_load

REPO_ROOT = Path(__file__).resolve().parent.parent
SMTP_SOURCE = Path("/usr/sbin/smtp-source")
GREETING_TIMEOUT = 10.0
RECIPIENT = "box@example.com"
SENDER = "a@x.test"


class BenchmarkError(Exception):
    """A scenario could not be run (server did not start, tool missing); message says why."""


@dataclass(frozen=True, slots=True)
class LoadOptions:
    """The load shape, shared by every client so that their rows are comparable."""

    sessions: int = 20
    messages: int = 2000
    per_session: int = 1
    size: int = 4096
    pipelining: bool = True
    deliver_timeout: float = 120.0


@dataclass(frozen=True, slots=True)
class RoundResult:
    """One client against one fresh server. ``None`` means "not measurable this way"."""

    scenario: str
    client: str
    messages: int
    accepted: int
    errors: int
    accept_seconds: float
    delivered: int | None = None
    deliver_seconds: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None

    @property
    def accepted_per_s(self) -> float:
        """Messages answered 2xx per second of load."""
        return self.accepted / self.accept_seconds if self.accept_seconds > 0 else 0.0

    @property
    def delivered_per_s(self) -> float | None:
        """Messages in the maildir per second, first connection to last delivery."""
        if self.delivered is None or not self.deliver_seconds:
            return None
        return self.delivered / self.deliver_seconds


def free_port() -> int:
    """A loopback port that was free a moment ago (the server binds it right after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_python() -> str:
    """The project's venv interpreter when there is one, so the server runs what was installed."""
    venv = REPO_ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class ServerProcess:
    """A server child process with its output in a log file, stopped for sure on exit."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], port: int, log: Path):
        self.name = name
        self.argv = argv
        self.env = env
        self.port = port
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def log_tail(self, lines: int = 20) -> str:
        """Last lines of the server's output, for error messages."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:]) or "(log empty)"

    async def start(self) -> None:
        """Start the process and return once it greets with 220, or raise BenchmarkError."""
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + GREETING_TIMEOUT
        last = "no connection"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchmarkError(
                    f"{self.name} exited with status {self.proc.returncode} before greeting "
                    f"(command: {' '.join(self.argv)}); its output:\n{self.log_tail()}"
                )
            try:
                async with asyncio.timeout(max(0.1, deadline - time.monotonic())):
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    line = await reader.readline()
                    writer.write(b"QUIT\r\n")
                    writer.close()
                if line.startswith(b"220"):
                    return
                last = f"greeting {line[:80]!r}"
            except TimeoutError:
                last = "connected, but no greeting line"
            except OSError as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(0.05)
        self.stop()
        raise BenchmarkError(
            f"{self.name} did not greet with 220 on 127.0.0.1:{self.port} within "
            f"{GREETING_TIMEOUT:.0f} s (last: {last}; command: {' '.join(self.argv)}); "
            f"its output:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM the whole process group (workers too), SIGKILL after 5 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    """A temporary directory that survives a failed round only if PYMTA_BENCH_KEEP is set."""
    path = Path(tempfile.mkdtemp(prefix="pymta-bench-"))
    try:
        yield path
    finally:
        if not os.environ.get("PYMTA_BENCH_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


def _pymta_server(work: Path, port: int, **extra: str) -> ServerProcess:
    env = dict(os.environ)
    env.update(**extra)
    env.update(
        PYMTA_STATE_DIR=str(work / "state"),
        PYMTA_MAIL_DIR=str(work / "mail"),
        MAIL_DOMAIN="example.com",
        MAIL_BOXES=f"{RECIPIENT}:box/",
        PYMTA_SMTP_LISTEN=f"127.0.0.1:{port}",
        SYSLOG_LEVEL="3",
        PYTHONUNBUFFERED="1",
    )
    argv = [server_python(), "-m", "pymta", "serve"]
    return ServerProcess("pymta", argv, env, port, work / "server.log")


def _sink_server(work: Path, port: int) -> ServerProcess:
    argv = [server_python(), "-m", "benchmarks.sink", "--listen", f"127.0.0.1:{port}"]
    return ServerProcess("benchmarks.sink", argv, dict(os.environ), port, work / "server.log")


def _count_files(directory: Path) -> int:
    try:
        with os.scandir(directory) as it:
            return sum(1 for _ in it)
    except FileNotFoundError:
        return 0


async def _wait_delivered(maildir_new: Path, want: int, started: float, timeout: float
                          ) -> tuple[int, float]:
    """Poll the maildir until ``want`` files are there; return (count, seconds since start)."""
    deadline = time.monotonic() + timeout
    count = _count_files(maildir_new)
    while count < want and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
        count = _count_files(maildir_new)
    return count, time.perf_counter() - started


async def _run_client(client: str, port: int, opts: LoadOptions) -> RoundResult:
    """Put the load on ``port``; ``delivered`` fields are left for the scenario to fill."""
    if client == "loadgen":
        r = await run_load(
            "127.0.0.1", port, sessions=opts.sessions, messages=opts.messages,
            per_session=opts.per_session, size=opts.size, sender=SENDER, recipient=RECIPIENT,
            pipelining=opts.pipelining,
        )
        return RoundResult(
            scenario="", client=client, messages=r.messages, accepted=r.accepted,
            errors=r.failed, accept_seconds=r.seconds, p50_ms=r.p50_ms, p99_ms=r.p99_ms,
        )
    if client == "smtp-source":
        if not SMTP_SOURCE.exists():
            raise BenchmarkError(f"{SMTP_SOURCE} not found (Debian package postfix)")
        argv = [
            str(SMTP_SOURCE), "-s", str(opts.sessions), "-m", str(opts.messages),
            "-l", str(opts.size), "-f", SENDER, "-t", RECIPIENT,
        ]
        if opts.per_session > 1:
            argv.insert(1, "-d")  # keep sessions open; smtp-source has no "N per session"
        argv.append(f"127.0.0.1:{port}")
        start = time.perf_counter()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        seconds = time.perf_counter() - start
        # smtp-source reports each failed session as a warning/fatal line and nothing else.
        complaints = [ln for ln in out.decode(errors="replace").splitlines() if ln.strip()]
        errors = min(opts.messages, len(complaints) + (1 if proc.returncode else 0))
        return RoundResult(
            scenario="", client=client, messages=opts.messages,
            accepted=opts.messages - errors, errors=errors, accept_seconds=seconds,
        )
    raise BenchmarkError(f"unknown client {client!r}")


async def accept_deliver(client: str, opts: LoadOptions) -> RoundResult:
    """pymta end to end: SMTP in, durable queue, maildir delivery out."""
    with _workdir() as work:
        port = free_port()
        server = _pymta_server(work, port)
        try:
            await server.start()
            started = time.perf_counter()
            r = await _run_client(client, port, opts)
            delivered, seconds = await _wait_delivered(
                work / "mail" / "box" / "new", r.accepted, started, opts.deliver_timeout
            )
        finally:
            server.stop()
        if delivered < r.accepted:
            print(f"warning: {delivered} of {r.accepted} accepted messages delivered within "
                  f"{opts.deliver_timeout:.0f} s", file=sys.stderr)
        return RoundResult(
            scenario="accept-deliver", client=client, messages=r.messages,
            accepted=r.accepted, errors=r.errors + (r.accepted - delivered),
            accept_seconds=r.accept_seconds, delivered=delivered, deliver_seconds=seconds,
            p50_ms=r.p50_ms, p99_ms=r.p99_ms,
        )


async def sink(client: str, opts: LoadOptions) -> RoundResult:
    """The load generator's ceiling: the same load against a server that does nothing."""
    with _workdir() as work:
        port = free_port()
        server = _sink_server(work, port)
        try:
            await server.start()
            r = await _run_client(client, port, opts)
        finally:
            server.stop()
        return RoundResult(
            scenario="sink", client=client, messages=r.messages, accepted=r.accepted,
            errors=r.errors, accept_seconds=r.accept_seconds, p50_ms=r.p50_ms, p99_ms=r.p99_ms,
        )


# ---------------------------------------------------------------------- pipeline cost


@dataclass(frozen=True)
class PipelineStage:
    """One pre-queue stage the ``pipeline-cost`` scenario switches on by itself.

    ``field`` is its Config field (the stage is skipped, with a note, while pymta has none);
    ``variable`` the yes/no environment variable that switches it; ``env`` what else the row
    needs; ``sender`` the MAIL FROM; ``signed``: the message carries a DKIM signature of
    ``x.test`` whose key the benchmark's DNS publishes, so verification has work to do.
    ``scanner``: the content scanner (``clamd``, ``spamd``, ``rspamd``) whose address
    ``variable`` takes instead of yes/no; an empty address is off, so such a stage is not
    in the all-off set, and its row runs against the scanners the ``content`` scenario
    starts (skipped, with a note, when there is none).
    """

    label: str
    field: str
    variable: str
    env: tuple[tuple[str, str], ...] = ()
    sender: str = SENDER
    signed: bool = False
    scanner: str = ""


SCANNER_ENV = (("PYMTA_SCANNER_CONCURRENCY", "2"),)
"""The scanner rows' cap in flight per worker: the content scenario's 4 spamd children over
the 2 workers pymta runs on 2 cores (``ContentOptions.concurrency``)."""

# Data, in pipeline order; a new stage is one more line. Every row starts from "all off".
PIPELINE_STAGES: tuple[PipelineStage, ...] = (
    PipelineStage("SPF", "spf_check", "PYMTA_SPF"),
    PipelineStage("DKIM verify", "dkim_verify", "PYMTA_DKIM_VERIFY", signed=True),
    PipelineStage("DMARC", "dmarc_check", "PYMTA_DMARC", signed=True),
    PipelineStage("ARC", "arc", "PYMTA_ARC", signed=True),
    # signing is for our users: a local sender from MYNETWORKS
    PipelineStage("DKIM sign", "dkim_sign", "PYMTA_DKIM_SIGN",
                  env=(("MYNETWORKS", "127.0.0.0/8"),), sender="bench@example.com"),
    PipelineStage("SRS", "srs_enable", "SRS_ENABLE"),
    PipelineStage("banned files", "banned_check", "PYMTA_BANNED_CHECK"),
    PipelineStage("bad header", "bad_header_check", "PYMTA_BAD_HEADER_CHECK"),
    # the content scanners, each alone (no banned/bad-header inspection), pymta's cap in
    # flight matched to spamd's children as in the content scenario
    PipelineStage("clamd", "clamd", "PYMTA_CLAMD", env=SCANNER_ENV, scanner="clamd"),
    PipelineStage("spamd", "spamd", "PYMTA_SPAMD", env=SCANNER_ENV, scanner="spamd"),
    PipelineStage("rspamd", "rspamd", "PYMTA_RSPAMD", env=SCANNER_ENV, scanner="rspamd"),
)
DKIM_SELECTOR = "bench"
# The checks issue 14 calls "the default checks" (its target: with them on, ≥ 0.95× the rate
# with none); one more row with these together.
DEFAULT_CHECKS = ("SPF", "DKIM verify", "DMARC", "ARC")


def _config_fields() -> set[str]:
    from pymta.config.model import Config

    return set(Config.__dataclass_fields__)


def pipeline_rows(scanners: Mapping[str, str] | None = None
                  ) -> list[tuple[str, dict[str, str], PipelineStage | None]]:
    """(row label, environment, stage) for the baseline, each known stage alone, and all
    stages at their defaults; unknown stages, and scanner stages without an address in
    ``scanners`` (name → address), are reported and left out."""
    fields = _config_fields()
    known = []
    for stage in PIPELINE_STAGES:
        if stage.field not in fields:
            print(f"note: pipeline-cost: {stage.label} skipped ({stage.variable}: pymta has no "
                  f"setting {stage.field!r} yet)", file=sys.stderr)
        elif stage.scanner and not (scanners or {}).get(stage.scanner):
            print(f"note: pipeline-cost: {stage.label} skipped (no {stage.scanner} running)",
                  file=sys.stderr)
        else:
            known.append(stage)
    all_off = {stage.variable: "no" for stage in known if not stage.scanner}
    rows: list[tuple[str, dict[str, str], PipelineStage | None]] = [
        ("pipeline-cost: none", all_off, None)]
    for stage in known:
        value = (scanners or {}).get(stage.scanner, "") if stage.scanner else "yes"
        rows.append((f"pipeline-cost: {stage.label}",
                     {**all_off, stage.variable: value, **dict(stage.env)}, stage))
    signed = next((s for s in known if s.signed), None)
    checks = [s for s in known if s.label in DEFAULT_CHECKS]
    if checks:      # issue 14: these together cost at most 5 % of the rate with none
        rows.append((f"pipeline-cost: {', '.join(s.label for s in checks)}",
                     {**all_off, **{s.variable: "yes" for s in checks}}, signed))
    rows.append(("pipeline-cost: all (defaults)", {}, signed))
    return rows


def _bench_dns(public_key_b64: str) -> object:
    """The test DNS server (tests/services/dns.py) with x.test's SPF, DKIM key and DMARC."""
    from tests.services.dns import DNSTestServer

    chunks = " ".join(f'"{public_key_b64[i:i + 200]}"'
                      for i in range(0, len(public_key_b64), 200))
    zone = f"""\
$TTL 300
$ORIGIN x.test.
@       IN SOA ns.x.test. hm.x.test. ( 1 3600 600 86400 300 )
@       IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
@       IN MX  10 mx.x.test.
mx      IN A   127.0.0.1
_dmarc  IN TXT "v=DMARC1; p=none"
{DKIM_SELECTOR}._domainkey IN TXT "v=DKIM1; k=rsa; p=" {chunks}
"""
    return DNSTestServer(zone, port=0).start()


def _signing_key() -> tuple[bytes, str]:
    """A fresh RSA key: (private PEM, public key base64 for the TXT record)."""
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    der = key.public_key().public_bytes(serialization.Encoding.DER,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem, base64.b64encode(der).decode("ascii")


def _message(opts: LoadOptions, sender: str, key: bytes | None) -> bytes:
    from benchmarks.loadgen import make_message

    data = make_message(opts.size, sender, RECIPIENT)
    if key is None:
        return data
    import dkim

    sig = dkim.sign(data, DKIM_SELECTOR.encode(), b"x.test", key,
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + data


async def pipeline_cost(client: str, opts: LoadOptions) -> list[RoundResult]:
    """accept-deliver once per stage configuration (see ``pipeline_rows``): no stage, each
    stage by itself, all at their defaults. All DNS (SPF, DKIM keys, DMARC) is answered by a
    test DNS server on loopback. loadgen only (it can send the signed message)."""
    from benchmarks.loadgen import run_load

    if client != "loadgen":
        print(f"note: pipeline-cost runs with loadgen only, not {client}", file=sys.stderr)
        return []
    key, public = _signing_key()
    dns_server = _bench_dns(public)
    scanners = _start_scanners()
    results: dict[int, RoundResult] = {}
    try:
        table = pipeline_rows(_scanner_addresses(scanners))
        for index, (label, env, stage) in _turned(table, next(_PIPELINE_ROUNDS)):
            sender = stage.sender if stage is not None else SENDER
            message = _message(opts, sender, key if stage is not None and stage.signed
                               else None)
            with _workdir() as work:
                port = free_port()
                server = _pymta_server(work, port, PYMTA_DNS_RESOLVER=dns_server.resolver_spec,
                                       **env)  # type: ignore[attr-defined]
                try:
                    await server.start()
                    started = time.perf_counter()
                    r = await run_load(
                        "127.0.0.1", port, sessions=opts.sessions, messages=opts.messages,
                        per_session=opts.per_session, size=opts.size, sender=sender,
                        recipient=RECIPIENT, pipelining=opts.pipelining, message=message)
                    delivered, seconds = await _wait_delivered(
                        work / "mail" / "box" / "new", r.accepted, started,
                        opts.deliver_timeout)
                finally:
                    server.stop()
            failed = r.messages - r.accepted
            if r.accepted == 0 or delivered < r.accepted:
                print(f"warning: {label}: {r.accepted} accepted, {delivered} delivered "
                      f"(server log kept with PYMTA_BENCH_KEEP=1)", file=sys.stderr)
            results[index] = RoundResult(
                scenario=label, client=client, messages=r.messages, accepted=r.accepted,
                errors=failed + (r.accepted - delivered), accept_seconds=r.seconds,
                delivered=delivered, deliver_seconds=seconds, p50_ms=r.p50_ms,
                p99_ms=r.p99_ms)
    finally:
        dns_server.stop()  # type: ignore[attr-defined]
        if scanners is not None:
            scanners.stop()
    return [results[i] for i in sorted(results)]


_PIPELINE_ROUNDS = itertools.count()
"""How many times ``pipeline_cost`` ran in this process: each round starts one row later."""


def _turned(table: list[Any], n: int) -> list[tuple[int, Any]]:
    """(index, row) in table order turned by ``n``: the rows run one after another on a
    shared machine, so the order turns every round (as in the content scenario) and a slow
    minute does not always hit the same rows; the results go back into table order."""
    start = n % len(table) if table else 0
    indexed = list(enumerate(table))
    return indexed[start:] + indexed[:start]


def _start_scanners() -> Any:
    """The scanners of the ``content`` scenario (the tests' clamd, spamd with 4 children,
    rspamd with 2 workers and no network tests), or None with a note when they cannot
    start (the scanner rows are then skipped)."""
    from benchmarks.content import ContentOptions, Scanners
    from tests.services.base import ServiceError

    scanners = Scanners(ContentOptions(), None)
    try:
        scanners.start()
    except (ServiceError, OSError) as exc:   # e.g. rspamd not installed: the other rows run
        print(f"note: pipeline-cost: no scanner rows ({exc})", file=sys.stderr)
        scanners.stop()
        return None
    return scanners


def _scanner_addresses(scanners: Any) -> dict[str, str]:
    """name → the address pymta's variable takes."""
    if scanners is None:
        return {}
    return {"clamd": f"unix:{scanners.clamd_socket}",
            **{name: scanners.services[name].address for name in ("spamd", "rspamd")}}


# A scenario returns one RoundResult, or a list of them (one table row each, named by their
# ``scenario`` field: pipeline-cost's stage configurations).
SCENARIOS: dict[str, Callable[[str, LoadOptions],
                              Awaitable[RoundResult | list[RoundResult]]]] = {
    "accept-deliver": accept_deliver,
    "sink": sink,
    "pipeline-cost": pipeline_cost,
}
