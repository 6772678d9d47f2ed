"""``python -m benchmarks.loadgen HOST[:PORT]``: load any SMTP server and say how it answered.

The load generator of the benchmarks (``benchmarks/loadgen.py``) as a command for anyone, so
that pymta, Postfix or any other server can be measured with the same client: N sessions at a
time, M messages of S bytes, PIPELINING on or off, optionally STARTTLS; a progress bar on
stderr (a plain line every second when stderr is not a terminal); at the end msg/s, the
answers (accepted / 4xx / 5xx / errors) and the end-of-data → reply latency percentiles on
stdout, as text or ``--json``; ``--plot FILE`` draws them (``benchmarks/loadgen_plot.py``).

Exit status: 0 when the run finished and the server answered at least one message (whatever
it answered: refusals are results too); 1 when it could not be reached, did not greet, refused
STARTTLS, or answered no message at all; 2 for bad arguments (one line on stderr) and for
``--plot`` without matplotlib; 130 when interrupted. Never a traceback for any of these.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import os
import re
import socket
import ssl
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from benchmarks import loadgen_plot
from benchmarks.loadgen import SMTPClientError, Tally, _Session, run_load
from benchmarks.loadgen_stats import (
    Sample,
    Summary,
    Timeline,
    plain_line,
    progress_line,
    render_json,
    render_text,
    sample,
    summarize,
    target,
)

PROG = "python -m benchmarks.loadgen"
EX_OK, EX_FAILED, EX_USAGE, EX_INTERRUPTED = 0, 1, 2, 130
DEFAULT_PORT = 25
SAMPLE_EVERY = 0.02     # seconds between samples of the tally: the plot's time resolution
BAR_EVERY = 0.2         # seconds between redraws of the progress bar
PLAIN_EVERY = 1.0       # seconds between progress lines when stderr is not a terminal
_SIZE = re.compile(r"(\d+)\s*([kKmM]?)(?:i?[bB])?")
_ADDRESS = re.compile(r"[!-~]+")   # printable ASCII, no space: what run_load can send


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line instead of usage text plus error."""

    def error(self, message: str) -> NoReturn:
        self.exit(EX_USAGE, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def parse_target(text: str) -> tuple[str, int]:
    """``HOST[:PORT]`` or ``[IPV6]:PORT`` (port 25 when none is given)."""
    host, port = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise argparse.ArgumentTypeError(f"bad target {text!r}: expected [IPV6]:PORT")
        port = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad target {text!r}: {host!r} is not an IPv6 "
                                             "address") from None
    elif text.count(":") == 1:
        host, port = text.split(":")
    elif ":" in text:
        raise argparse.ArgumentTypeError(
            f"bad target {text!r}: write an IPv6 address in brackets, [{text}]:25")
    if not host:
        raise argparse.ArgumentTypeError(f"bad target {text!r}: no host")
    if not port:
        return host, DEFAULT_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"bad target {text!r}: port must be 1-65535")
    return host, int(port)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def parse_size(text: str) -> int:
    """A message size in bytes: ``4096``, ``4k``, ``64KiB``, ``1M`` (k and M are 1024-based)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: e.g. 4096, 4k, 1M")
    value = int(match[1]) * {"": 1, "k": 1024, "m": 1024 * 1024}[match[2].lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: must be at least 1 byte")
    return value


def address(text: str) -> str:
    """An envelope address as sent inside ``<...>``: printable ASCII, no space or brackets."""
    if not _ADDRESS.fullmatch(text) or "<" in text or ">" in text:
        raise argparse.ArgumentTypeError(
            f"bad address {text!r}: printable ASCII without spaces or angle brackets")
    return text


def sender(text: str) -> str:
    """The envelope sender: an address, or empty for the null sender ``<>``."""
    return text if text == "" else address(text)


@dataclass(frozen=True, slots=True)
class Options:
    """The parsed command line."""

    host: str
    port: int
    sessions: int
    messages: int
    size: int
    per_session: int
    pipelining: bool
    sender: str
    recipient: str
    helo: str
    starttls: bool
    timeout: float
    rate: float | None
    plot: Path | None
    json: bool
    quiet: bool


def build_parser() -> argparse.ArgumentParser:
    """The options, named after smtp-source's where it has them (-s, -m, -l)."""
    p = _Parser(
        prog=PROG,
        description="Load any SMTP server with N sessions at a time and M messages of S "
                    "bytes; print msg/s, how the server answered, and the latency from the "
                    "end of data to the server's reply (p50, p90, p99, max).",
        epilog="Exit status: 0 the run finished and at least one message was answered; "
               "1 the server could not be reached, did not greet or answered nothing; "
               "2 bad arguments or --plot without matplotlib.")
    p.add_argument("target", type=parse_target, metavar="HOST[:PORT]",
                   help="the server, e.g. 127.0.0.1:25, mx.example.com:2525, [::1]:25 "
                        "(port 25 when none is given)")
    p.add_argument("-s", "--sessions", type=positive_int, default=20, metavar="N",
                   help="sessions at a time (default %(default)s)")
    p.add_argument("-m", "--messages", type=positive_int, default=1000, metavar="M",
                   help="messages in all (default %(default)s)")
    p.add_argument("-l", "--size", type=parse_size, default=4096, metavar="S",
                   help="message size in bytes, headers included: 4096, 4k, 1M "
                        "(default %(default)s)")
    p.add_argument("--per-session", type=positive_int, default=1, metavar="N",
                   help="messages per session before QUIT and a new connection "
                        "(default %(default)s)")
    p.add_argument("--no-pipelining", dest="pipelining", action="store_false",
                   help="one command, one reply (default: MAIL, RCPT and DATA in one write "
                        "when the server offers PIPELINING)")
    p.add_argument("--from", dest="sender", type=sender, default="loadgen@loadgen.test",
                   metavar="ADDRESS", help="envelope sender ('' for <>; default %(default)s)")
    p.add_argument("--to", dest="recipient", type=address, default="box@example.com",
                   metavar="ADDRESS", help="envelope recipient (default %(default)s)")
    p.add_argument("--helo", type=address, default="loadgen.test", metavar="NAME",
                   help="EHLO name (default %(default)s)")
    p.add_argument("--starttls", action="store_true",
                   help="STARTTLS in every session (the certificate is not verified: this "
                        "measures, it does not authenticate)")
    p.add_argument("--rate", type=positive_float, default=None, metavar="MSG/S",
                   help="start at most this many messages per second (open loop; default: "
                        "as fast as the server answers)")
    p.add_argument("--timeout", type=positive_float, default=30.0, metavar="SECONDS",
                   help="longest wait for the server in one exchange (default %(default)s)")
    p.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="also write a PNG: msg/s and latency over time, latency histogram "
                        "(needs matplotlib: the bench extra)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    return p


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The options, or exit 2 with one line on stderr."""
    ns = build_parser().parse_args(argv)
    host, port = ns.target
    return Options(host=host, port=port, sessions=ns.sessions, messages=ns.messages,
                   size=ns.size, per_session=ns.per_session, pipelining=ns.pipelining,
                   sender=ns.sender, recipient=ns.recipient, helo=ns.helo,
                   starttls=ns.starttls, timeout=ns.timeout, rate=ns.rate, plot=ns.plot,
                   json=ns.json, quiet=ns.quiet)


def tls_context() -> ssl.SSLContext:
    """A client context that does not verify the server: a load test measures whatever
    certificate the server has (often self-signed on a test box)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def reason(exc: BaseException) -> str:
    """A socket error in words (asyncio's own texts name tuples, not causes)."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return str(exc.strerror or exc)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed by the server"
    return str(exc) or type(exc).__name__


async def preflight(opts: Options, tls: ssl.SSLContext | None) -> str | None:
    """One session before the load: greeting, EHLO (and STARTTLS), QUIT. What went wrong in
    words, or None: a server that is not there fails here in a moment, with a reason, instead
    of as M errors."""
    where = target(opts.host, opts.port)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(opts.host, opts.port), opts.timeout)
    except (OSError, TimeoutError) as exc:
        return f"cannot connect to {where}: {reason(exc)}"
    session = _Session(reader, writer, opts.timeout)
    try:
        async with asyncio.timeout(opts.timeout):
            await session.greet(opts.helo, tls, opts.host if tls is not None else None)
    except SMTPClientError as exc:
        return f"{where}: {exc}"
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        return f"{where}: {reason(exc)}"
    finally:
        await session.quit()
    return None


class Watch:
    """The ``monitor`` of a run: samples the tally into a :class:`Timeline` and shows the
    progress on ``stream`` ("bar": redrawn in place; "plain": a line every second; "none")."""

    def __init__(self, messages: int, stream: TextIO, mode: str) -> None:
        self.messages = messages
        self.stream = stream
        self.mode = mode
        self.timeline = Timeline()
        self.tally: Tally | None = None
        self.t0 = time.perf_counter()

    def __call__(self, tally: Tally) -> Awaitable[None]:
        # Not a coroutine function: the tally is kept even when the run ends before the
        # watching task first gets to run.
        self.tally = tally
        self.t0 = time.perf_counter()
        self.timeline.add(self.now())
        return self._watch(tally)

    def columns(self) -> int:
        """The terminal's width (a terminal that does not say: $COLUMNS, else 80)."""
        try:
            columns = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        if columns <= 0:
            env = os.environ.get("COLUMNS", "")
            columns = int(env) if env.isdigit() and int(env) > 0 else 80
        return columns

    def now(self) -> Sample:
        assert self.tally is not None
        return sample(time.perf_counter() - self.t0, self.tally, self.messages)

    async def _watch(self, tally: Tally) -> None:
        next_bar, next_plain = 0.0, PLAIN_EVERY
        try:
            while True:
                await asyncio.sleep(SAMPLE_EVERY)
                s = self.now()
                self.timeline.add(s)
                if self.mode == "bar" and s.t >= next_bar:
                    width = self.columns()
                    self.stream.write("\r" + progress_line(s, self.messages, width) + "\x1b[K")
                    self.stream.flush()
                    next_bar = s.t + BAR_EVERY
                elif self.mode == "plain" and s.t >= next_plain:
                    print(plain_line(s, self.messages), file=self.stream, flush=True)
                    next_plain += PLAIN_EVERY
        finally:
            if self.mode == "bar":
                self.stream.write("\r\x1b[K")
                self.stream.flush()


def _progress_mode(opts: Options, stream: TextIO) -> str:
    if opts.quiet:
        return "none"
    try:
        return "bar" if stream.isatty() else "plain"
    except (AttributeError, ValueError):
        return "plain"


def _runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop when installed (the ``speed`` extra), as the benchmarks do: a cheaper client."""
    try:
        import uvloop  # the speed extra; untyped: [tool.mypy] overrides
    except ImportError:
        return asyncio.run
    run: Callable[[Coroutine[Any, Any, int]], int] = uvloop.run
    return run


def _say(message: str, stream: TextIO | None = None) -> None:
    print(f"{PROG}: {message}", file=stream or sys.stderr, flush=True)


async def _run(opts: Options, out: TextIO, err: TextIO) -> int:
    tls = tls_context() if opts.starttls else None
    problem = await preflight(opts, tls)
    if problem:
        _say(problem, err)
        return EX_FAILED
    watch = Watch(opts.messages, err, _progress_mode(opts, err))
    result = await run_load(
        opts.host, opts.port, sessions=opts.sessions, messages=opts.messages,
        per_session=opts.per_session, size=opts.size, sender=opts.sender,
        recipient=opts.recipient, pipelining=opts.pipelining, helo=opts.helo,
        timeout=opts.timeout, rate=opts.rate, starttls=tls, monitor=watch)
    latencies = list(watch.tally.latencies) if watch.tally is not None else []
    if watch.tally is not None:
        watch.timeline.add(sample(result.seconds, watch.tally, opts.messages))
    summary = summarize(result, latencies, host=opts.host, port=opts.port,
                        per_session=opts.per_session, pipelining=opts.pipelining,
                        starttls=opts.starttls)
    out.write(render_json(summary) if opts.json else render_text(summary))
    out.flush()
    status = EX_OK
    if summary.answered == 0:
        _say(f"the server answered none of the {summary.messages} messages "
             f"({summary.errors} lost to connection errors or timeouts)", err)
        status = EX_FAILED
    if opts.plot is not None:
        status = max(status, _write_plot(summary, watch.timeline, latencies, opts.plot, err))
    return status


def _write_plot(summary: Summary, timeline: Timeline, latencies: list[float],
                path: Path, err: TextIO) -> int:
    try:
        loadgen_plot.plot(summary, timeline, latencies, path)
    except OSError as exc:
        _say(f"cannot write the plot {str(path)!r}: {exc.strerror or exc}", err)
        return EX_FAILED
    _say(f"plot written to {path}", err)
    return EX_OK


def main(argv: Sequence[str] | None = None) -> int:
    """The command; returns the exit status (see the module docstring)."""
    opts = parse_args(argv)
    if opts.plot is not None and (why := loadgen_plot.missing()):
        _say(why)
        return EX_USAGE
    try:
        return _runner()(_run(opts, sys.stdout, sys.stderr))
    except KeyboardInterrupt:
        _say("interrupted")
        return EX_INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
