"""A minimal, fast SMTP sink: answers every command, counts messages, stores nothing.

What it is for:
  * the other end for the load generator's own tests and for measuring the generator's
    ceiling (the ``sink`` scenario): a Python client is only worth trusting up to the rate at
    which it can feed a server that does nothing;
  * the downstream "next hop" of the ``relay-through`` and ``memory-relay`` benchmarks
    (``benchmarks/relay.py``), where pymta and Postfix relay to it. There it runs as a
    process of its own (``python -m benchmarks.sink``) and the benchmark asks it for its
    counters with the sink's own command ``XSTATS`` (see ``SinkStats.line``): messages,
    bytes, connections and the ``time.monotonic()`` of the last message it took (the
    clock is the machine's, so another process can subtract its own start time from it).

Implementation: one ``asyncio.Protocol`` per connection, no StreamReader; commands are split
on LF, only the verb is looked at, and all replies produced by one ``data_received`` call go out
in a single write (that is what makes pipelined clients cheap to serve). In DATA the end marker
``CRLF.CRLF`` is searched across chunk boundaries by keeping the last four bytes; the bytes of
the DATA command's own CRLF are pre-pended so a message of zero lines ends correctly too.
Dot-unstuffing is unnecessary because the content is thrown away.

Run standalone: ``python -m benchmarks.sink --listen 127.0.0.1:2525``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

_END = b"\r\n.\r\n"
_MAX_LINE = 4096


@dataclass(slots=True)
class SinkStats:
    """Counters for one sink, shared by its connections (a single event loop: no locks)."""

    connections: int = 0
    messages: int = 0
    data_bytes: int = 0
    last_at: float = 0.0        # time.monotonic() when the last message was taken

    def line(self) -> bytes:
        """The reply to ``XSTATS``: ``250 messages=M bytes=B connections=C last=T``."""
        return (f"250 messages={self.messages} bytes={self.data_bytes} "
                f"connections={self.connections} last={self.last_at:.6f}\r\n").encode()

    @classmethod
    def parse(cls, line: bytes) -> SinkStats:
        """The counters from an ``XSTATS`` reply (``line``); ValueError if it is not one."""
        text = line.decode("ascii", "replace").strip()
        if not text.startswith("250 "):
            raise ValueError(f"not an XSTATS reply: {text[:80]!r}")
        fields = dict(word.partition("=")[::2] for word in text[4:].split())
        try:
            return cls(connections=int(fields["connections"]),
                       messages=int(fields["messages"]), data_bytes=int(fields["bytes"]),
                       last_at=float(fields["last"]))
        except (KeyError, ValueError):
            raise ValueError(f"not an XSTATS reply: {text[:80]!r}") from None


@dataclass(frozen=True, slots=True)
class SinkReplies:
    """Replies the sink gives; change ``rcpt`` or ``data_end`` to exercise client error paths."""

    greeting: bytes = b"220 sink.test ESMTP pymta-bench-sink\r\n"
    ehlo: bytes = (
        b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
        b"250-ENHANCEDSTATUSCODES\r\n250 SMTPUTF8\r\n"
    )
    mail: bytes = b"250 2.1.0 Ok\r\n"
    rcpt: bytes = b"250 2.1.5 Ok\r\n"
    data: bytes = b"354 End data with <CR><LF>.<CR><LF>\r\n"
    data_end: bytes = b"250 2.0.0 Ok: queued\r\n"


class SinkProtocol(asyncio.Protocol):
    """Server side of one SMTP connection to the sink."""

    def __init__(self, stats: SinkStats, replies: SinkReplies) -> None:
        self.stats = stats
        self.replies = replies
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.in_data = False
        self.rcpt_ok = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # No isinstance check: uvloop's TCPTransport is not an asyncio.Transport subclass.
        self.transport = cast(asyncio.Transport, transport)
        self.stats.connections += 1
        transport.write(self.replies.greeting)

    def _command(self, verb: bytes) -> bytes:
        """The reply to a command other than DATA and QUIT (``verb``: its first 4 bytes)."""
        if verb == b"EHLO":
            return self.replies.ehlo
        if verb == b"MAIL":
            self.rcpt_ok = False
            return self.replies.mail
        if verb == b"RCPT":
            self.rcpt_ok |= self.replies.rcpt.startswith(b"2")
            return self.replies.rcpt
        if verb == b"XSTA":     # XSTATS: the counters, for a benchmark in another process
            return self.stats.line()
        # HELO, RSET, NOOP, anything: a sink agrees
        self.rcpt_ok = self.rcpt_ok and verb != b"RSET"
        return b"250 2.0.0 Ok\r\n"

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        buf = self.buf + data
        out: list[bytes] = []
        close = False
        while buf:
            if self.in_data:
                i = buf.find(_END)
                if i < 0:
                    # Keep only what could be the start of a split end marker.
                    self.stats.data_bytes += max(0, len(buf) - 4)
                    buf = buf[-4:]
                    break
                self.stats.data_bytes += i
                buf = buf[i + len(_END):]
                self.in_data = False
                if self.replies.data_end.startswith(b"2"):
                    self.stats.messages += 1
                    self.stats.last_at = time.monotonic()
                out.append(self.replies.data_end)
                continue
            i = buf.find(b"\n")
            if i < 0:
                if len(buf) > _MAX_LINE:
                    out.append(b"500 5.5.0 Line too long\r\n")
                    buf = b""
                break
            verb = buf[:min(i, 4)].upper()
            buf = buf[i + 1:]
            if verb == b"DATA":
                if self.rcpt_ok:
                    self.in_data = True
                    buf = b"\r\n" + buf
                    out.append(self.replies.data)
                else:
                    out.append(b"554 5.5.1 No valid recipients\r\n")
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                close = True
                buf = b""
                break
            else:
                out.append(self._command(verb))
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))
        if close:
            self.transport.close()


async def start_sink(
    host: str = "127.0.0.1", port: int = 0, replies: SinkReplies | None = None
) -> tuple[asyncio.Server, SinkStats, int]:
    """Start a sink in the running loop; return the server, its counters and the bound port."""
    stats = SinkStats()
    chosen = replies or SinkReplies()
    server = await asyncio.get_running_loop().create_server(
        lambda: SinkProtocol(stats, chosen), host, port, reuse_address=True, backlog=1024
    )
    bound = server.sockets[0].getsockname()[1]
    return server, stats, bound


async def _serve(host: str, port: int) -> None:
    server, stats, bound = await start_sink(host, port)
    print(f"sink listening on {host}:{bound}", flush=True)
    try:
        async with server:
            await server.serve_forever()
    finally:
        print(f"sink: {stats.connections} connections, {stats.messages} messages", flush=True)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; uses uvloop when installed, as pymta's own server does."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sink", description=__doc__)
    parser.add_argument(
        "--listen", default="127.0.0.1:2525", help="HOST:PORT (default %(default)s)"
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    try:
        import uvloop  # type: ignore[import-not-found]

        run: Callable[..., object] = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(_serve(host or "127.0.0.1", int(port)))


if __name__ == "__main__":
    main()
