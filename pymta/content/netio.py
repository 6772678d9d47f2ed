"""The plumbing the scanner clients share: addresses, the spooled message, bounded reads.

A scanner is another daemon, so everything it sends is untrusted input of unknown size: every
read here has a byte limit, and a reply over it is refused rather than buffered. The message
is never loaded whole: it goes to the scanner in chunks from the spool file, whose size gives
the ``Content-length`` the protocols want up front. Failures of any kind (refused connection,
broken reply, timeout) become one :class:`ScannerError` carrying whether it was a timeout,
because the next layer's policy (tempfail or pass) turns on exactly that and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import BinaryIO, TypeVar

CHUNK = 64 * 1024

T = TypeVar("T")


class ScannerError(Exception):
    """A scanner could not give an answer: down, too slow, or a reply we could not accept.

    ``timeout`` is True when the exchange ran out of time (the server may be alive but busy);
    False for everything else (refused, reset, protocol error, server-reported error).
    """

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True)
class Address:
    """Where a scanner listens: ``host``/``port`` for TCP, or ``path`` for a unix socket."""

    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.path:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(spec: str, default_port: int | None = None) -> Address:
    """``host:port``, ``[v6addr]:port`` or ``unix:/path`` (a bare host takes ``default_port``).

    Raises ValueError with the offending text: an address comes from configuration, and a
    typo there must say what is wrong rather than fail at the first message.
    """
    text = spec.strip()
    if text.startswith("unix:"):
        path = text[5:]
        if not path.startswith("/"):
            raise ValueError(f"scanner address {spec!r}: unix socket path must be absolute")
        return Address(path=path)
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"scanner address {spec!r}: missing ']'")
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            raise ValueError(f"scanner address {spec!r}: expected ':port' after ']'")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ValueError(f"scanner address {spec!r}: write an IPv6 address as [addr]:port")
    if not host:
        raise ValueError(f"scanner address {spec!r}: no host")
    if not port_text:
        if default_port is None:
            raise ValueError(f"scanner address {spec!r}: no port (host:port or unix:/path)")
        return Address(host=host, port=default_port)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"scanner address {spec!r}: port {port_text!r} is not 1-65535")
    return Address(host=host, port=int(port_text))


async def connect(address: Address, limit: int) -> tuple[asyncio.StreamReader,
                                                          asyncio.StreamWriter]:
    """Open a stream; ``limit`` caps the reader's buffer (and so any one header line)."""
    if address.path:
        return await asyncio.open_unix_connection(address.path, limit=limit)
    return await asyncio.open_connection(address.host, address.port, limit=limit)


async def send_file(writer: asyncio.StreamWriter, f: BinaryIO, size: int) -> None:
    """Write exactly ``size`` bytes of ``f`` in chunks, waiting for the peer to take each.

    A file that changed size under us would make the announced length a lie the server
    would wait on forever, so a short file is an error here rather than a hang there.
    """
    left = size
    while left > 0:
        chunk = f.read(min(CHUNK, left))
        if not chunk:
            raise ScannerError(f"message file ended {left} bytes early")
        writer.write(chunk)
        await writer.drain()
        left -= len(chunk)


async def read_head(reader: asyncio.StreamReader, max_bytes: int, what: str) -> bytes:
    """Everything up to and including the blank line after the headers, at most ``max_bytes``."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise ScannerError(f"{what} closed the connection without a reply") from None
        raise ScannerError(f"{what} reply ended inside its headers: {e.partial[:80]!r}") from None
    except asyncio.LimitOverrunError:
        raise ScannerError(f"{what} reply headers longer than {max_bytes} bytes: refused") from None
    if len(head) > max_bytes:
        raise ScannerError(f"{what} reply headers longer than {max_bytes} bytes: refused")
    return head


async def read_body(reader: asyncio.StreamReader, length: int | None, max_bytes: int,
                    what: str) -> bytes:
    """The reply body: ``length`` bytes when announced, else up to end of stream; never more
    than ``max_bytes`` (a longer announced or actual body is refused, not truncated)."""
    if length is not None:
        if length > max_bytes:
            raise ScannerError(f"{what} reply body of {length} bytes exceeds {max_bytes}: refused")
        try:
            return await reader.readexactly(length)
        except asyncio.IncompleteReadError as e:
            raise ScannerError(f"{what} reply body ended after {len(e.partial)} of "
                               f"{length} bytes") from None
    body = await reader.read(max_bytes + 1)
    while body and len(body) <= max_bytes:
        more = await reader.read(max_bytes + 1 - len(body))
        if not more:
            break
        body += more
    if len(body) > max_bytes:
        raise ScannerError(f"{what} reply body exceeds {max_bytes} bytes: refused")
    return body


def header_value(name: str, value: str) -> bytes:
    """One ``Name: value\\r\\n`` line; a value with CR, LF or NUL is refused (ValueError), since
    it would let envelope data smuggle extra headers into the request."""
    if any(c in value for c in "\r\n\0"):
        raise ValueError(f"{name} value {value!r} contains a line break or NUL")
    return f"{name}: {value}\r\n".encode()


async def close(writer: asyncio.StreamWriter) -> None:
    """Close without letting a peer that vanished turn cleanup into a second error."""
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


async def bounded_exchange(work: Callable[[], Awaitable[T]], timeout: float, who: str,
                           error: type[ScannerError], slots: asyncio.Semaphore) -> T:
    """``work()`` (one whole exchange with a scanner) in one of ``slots`` and under
    ``timeout``, the wait for the slot included: callers queued behind a hung scanner give up
    at their own deadline, not one deadline after each other (issue 12 review). Whatever goes
    wrong becomes ``error`` naming ``who`` ("spamd at 127.0.0.1:783"), a timeout flagged as
    one."""
    waiting = True
    try:
        async with asyncio.timeout(timeout):
            async with slots:
                waiting = False
                return await work()
    except TimeoutError:
        stage = " (waiting for a free slot)" if waiting else ""
        raise error(f"{who}: no answer within {timeout:g}s{stage}", timeout=True) from None
    except ScannerError as e:
        raise error(f"{who}: {e}") from None
    except OSError as e:
        raise error(f"{who}: {e.strerror or e}") from None
