"""The virus scanner client: ClamAV's clamd over its own socket protocol (``INSTREAM``).

An own client on the event loop's socket calls rather than the PyPI ``clamd`` package
(blocking sockets, 1 KiB chunks: a thread per scan) or ``aioclamd`` (1 KiB chunks, each read
from the file in a thread): the protocol is three commands, and here one deadline bounds the
whole call, a semaphore caps the scans in flight, and "over ``StreamMaxLength``" is an outcome
of its own. ``python -m benchmarks.clamd_clients`` compares the three (issue 12, 2 cores):
per 4 KiB scan about the time of ``clamd`` and a little less client CPU (aioclamd: over twice
the CPU); per 10 MiB scan 0.6-0.7x the time of ``clamd`` and a quarter of its CPU (aioclamd:
10-14x the time, over 100x the CPU).

The message goes from the spool file in chunks of :data:`CHUNK` bytes, each prefixed by its
length as 4 bytes big-endian, and a zero length ends it: it is never held whole in memory.
Commands use the ``z`` form (``zINSTREAM\\0``): clamd then ends every reply with a NUL, not a
newline, so a reply is delimited the same way whatever it contains, and clamd's documentation
recommends it over the newline (``n``) form for exactly that reason.

clamd closes the connection after answering a command (no ``IDSESSION`` here), so the reply is
everything up to the end of the stream, bounded by :data:`MAX_REPLY`. It can arrive while we
are still sending: over ``StreamMaxLength`` clamd answers ``INSTREAM size limit exceeded.
ERROR`` and closes mid-stream; a send that fails because clamd hung up just ends the sending,
and the reply, still in our socket, says why (hence plain non-blocking sockets and the loop's
``sock_*`` calls: an asyncio stream transport closes the socket, unread reply and all, on the
first failed write).

Outcomes: clamd's answer is a :class:`ClamdResult` (clean, infected with the signature names,
too large, or an error clamd itself reported). Everything else -- refused, reset, no answer in
time, a reply that is not clamd's -- is a :class:`ScannerError` (``timeout`` says which kind),
and the policy for it (tempfail or pass) is the caller's.
"""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from .netio import (
    CHUNK,
    Address,
    ScannerError,
    parse_address,
)
from .spoolfile import MessageSource, open_message

__all__ = ["CHUNK", "ClamdClient", "ClamdResult", "ClamdStatus", "ScannerError",
           "parse_reply"]

MAX_REPLY = 64 * 1024
"""Bytes of reply accepted; clamd's are a line per signature, far below this."""

_END = struct.pack(">I", 0)
_TOO_LARGE = "INSTREAM size limit exceeded. ERROR"
_STREAM = "stream: "

_Exchange = Callable[[socket.socket], Awaitable[bytes]]


class ClamdStatus(enum.Enum):
    """What clamd said about one message."""

    CLEAN = "clean"
    INFECTED = "infected"
    TOO_LARGE = "too_large"  # over clamd's StreamMaxLength: not scanned, not a virus
    ERROR = "error"  # clamd answered, but with an error of its own (text in ClamdResult.text)


@dataclass(frozen=True, slots=True)
class ClamdResult:
    """clamd's verdict on one message; ``text`` is its reply as sent (for the log)."""

    status: ClamdStatus
    signatures: tuple[str, ...] = ()
    text: str = ""

    @property
    def infected(self) -> bool:
        return self.status is ClamdStatus.INFECTED


def parse_reply(raw: bytes) -> ClamdResult:
    """The result of an ``INSTREAM`` reply (one or more NUL- or newline-ended lines).

    Several ``FOUND`` lines (clamd with all-match scanning) give several signatures. A reply
    that is none of clamd's forms raises ScannerError: something else answered on that port.
    """
    text = raw.decode("utf-8", "replace")
    lines = [ln.strip() for ln in text.replace("\0", "\n").split("\n") if ln.strip()]
    if not lines:
        raise ScannerError("clamd closed the connection without a reply")
    shown = " / ".join(lines)
    found: list[str] = []
    for line in lines:
        if line == _TOO_LARGE:
            return ClamdResult(ClamdStatus.TOO_LARGE, text=shown)
        if line.endswith(" ERROR"):
            return ClamdResult(ClamdStatus.ERROR, text=shown)
        if not line.startswith(_STREAM):
            raise ScannerError(f"not a clamd reply: {line[:100]!r}")
        rest = line[len(_STREAM):]
        if rest.endswith(" FOUND") and rest[:-6].strip():
            found.append(rest[:-6].strip())
        elif rest != "OK":
            raise ScannerError(f"not a clamd reply: {line[:100]!r}")
    if found:
        return ClamdResult(ClamdStatus.INFECTED, tuple(found), shown)
    return ClamdResult(ClamdStatus.CLEAN, text=shown)


class ClamdClient:
    """One clamd, shared by all sessions of an event loop.

    ``address``: ``unix:/path`` or ``host:port`` (``[v6addr]:port``); a bad one raises
    ValueError here, at construction. ``timeout``: seconds for one whole call -- waiting for a
    free slot, connecting, sending, and clamd's answer -- so a hung or saturated clamd costs a
    message at most this long. ``max_in_flight``: scans open to this clamd at once (default 8,
    under clamd's default ``MaxThreads`` of 10); more callers wait for a slot, so a burst
    queues here instead of piling connections onto clamd. ``chunk_size``: bytes per
    ``INSTREAM`` chunk.
    """

    def __init__(self, address: str | Address, *, timeout: float = 30.0,
                 max_in_flight: int = 8, chunk_size: int = CHUNK) -> None:
        self.address = address if isinstance(address, Address) else parse_address(address)
        if not timeout > 0:
            raise ValueError(f"clamd timeout must be positive, not {timeout!r}")
        if max_in_flight < 1:
            raise ValueError(f"clamd max_in_flight must be at least 1, not {max_in_flight!r}")
        if chunk_size < 1:
            raise ValueError(f"clamd chunk_size must be at least 1, not {chunk_size!r}")
        self.timeout = timeout
        self.max_in_flight = max_in_flight
        self.chunk_size = chunk_size
        self._slots = asyncio.Semaphore(max_in_flight)
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        """Calls holding a slot right now (for health output)."""
        return self._in_flight

    async def ping(self) -> None:
        """Return when clamd answers ``PONG``; ScannerError otherwise."""
        reply = await self._command(b"zPING\0")
        if reply.strip(b"\0\n") != b"PONG":
            raise ScannerError(f"clamd {self.address}: PING answered {reply[:100]!r}")

    async def version(self) -> str:
        """clamd's ``VERSION`` line, e.g. ``ClamAV 1.4.6/27000/...`` (for X-Virus-Scanned)."""
        reply = (await self._command(b"zVERSION\0")).strip(b"\0\n").decode("utf-8", "replace")
        if not reply.startswith("ClamAV "):
            raise ScannerError(f"clamd {self.address}: VERSION answered {reply[:100]!r}")
        return reply

    async def scan(self, message: MessageSource) -> ClamdResult:
        """Scan a spooled message (a path, or a binary file read from its current position
        and left open). An unreadable spool file raises its OSError: that is ours, not
        clamd's."""
        with open_message(message) as (f, _size):
            return parse_reply(await self._call(lambda sock: self._instream(sock, f)))

    async def _command(self, command: bytes) -> bytes:
        async def exchange(sock: socket.socket) -> bytes:
            await asyncio.get_running_loop().sock_sendall(sock, command)
            return await _read_reply(sock)
        return await self._call(exchange)

    async def _call(self, exchange: _Exchange) -> bytes:
        """Run ``exchange(sock)`` on a fresh connection, in a slot, in time."""
        stage = "waiting for a free slot"
        try:
            async with asyncio.timeout(self.timeout):
                async with self._slots:
                    self._in_flight += 1
                    try:
                        stage = "connecting"
                        try:
                            sock = await _connect(self.address)
                        except OSError as e:
                            raise ScannerError(f"clamd {self.address}: cannot connect: "
                                               f"{e.strerror or e}") from None
                        try:
                            stage = "sending or waiting for the answer"
                            return await exchange(sock)
                        except ConnectionError as e:
                            raise ScannerError(f"clamd {self.address}: connection lost: "
                                               f"{e.strerror or e}") from None
                        finally:
                            sock.close()
                    finally:
                        self._in_flight -= 1
        except TimeoutError:
            raise ScannerError(f"clamd {self.address}: no answer within {self.timeout:g}s "
                               f"({stage})", timeout=True) from None

    async def _instream(self, sock: socket.socket, f: BinaryIO) -> bytes:
        loop = asyncio.get_running_loop()
        try:
            # one send per chunk: its length prefix, the chunk, and the command before the
            # first and the end mark after the last, joined (a 64 KiB copy costs far less
            # than the extra system calls and small segments of separate sends)
            head = b"zINSTREAM\0"
            chunk = f.read(self.chunk_size)
            while True:
                following = f.read(self.chunk_size) if chunk else b""
                parts = [head, struct.pack(">I", len(chunk)), chunk] if chunk else [head]
                if not following:
                    parts.append(_END)
                await loop.sock_sendall(sock, b"".join(parts))
                if not following:
                    break
                head, chunk = b"", following
        except ConnectionError:
            pass  # clamd hung up mid-stream (size limit): its reply, still readable, says why
        return await _read_reply(sock)


async def _connect(address: Address) -> socket.socket:
    """A connected non-blocking socket (TCP_NODELAY: each send is a whole chunk)."""
    loop = asyncio.get_running_loop()
    targets: list[tuple[int, int, int, Any]]
    if address.path:
        targets = [(socket.AF_UNIX, socket.SOCK_STREAM, 0, address.path)]
    elif _is_ip(address.host):  # no resolver round trip (a thread) for every scan
        inet = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        targets = [(inet, socket.SOCK_STREAM, 0, (address.host, address.port))]
    else:
        targets = [(fam, kind, proto, addr) for fam, kind, proto, _, addr in
                   await loop.getaddrinfo(address.host, address.port,
                                          type=socket.SOCK_STREAM)]
    error: OSError = OSError(f"no address for {address}")
    for family, kind, proto, addr in targets:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setblocking(False)
            if family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, addr)
        except OSError as e:
            sock.close()
            error = e
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _read_reply(sock: socket.socket) -> bytes:
    """All clamd sends until it closes, at most MAX_REPLY bytes. A reset after some data
    still returns the data: clamd resets a connection it stopped reading (size limit)."""
    loop = asyncio.get_running_loop()
    data = bytearray()
    while True:
        try:
            more = await loop.sock_recv(sock, 4096)
        except ConnectionError:
            if data:
                break
            raise
        if not more:
            break
        data += more
        if len(data) > MAX_REPLY:
            raise ScannerError(f"clamd reply longer than {MAX_REPLY} bytes: refused")
    return bytes(data)
