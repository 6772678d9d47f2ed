"""The message as it leaves: small bodies whole in memory, large ones read from the spool in
pieces, so relaying a 25 MB message never holds it whole (issue 15, item 5).

A body the queue handed over in memory (a small message on its first attempt) or a spool file
of at most :data:`STREAM_OVER` bytes is read whole: one write, no thread hop per piece. A
larger file is scanned once in a worker thread for what the outbound hygiene needs (is any byte
8-bit? the header section, for SMTPUTF8) and then sent in :data:`PIECE`-sized reads. The one
path that still needs the whole message is the 8-bit → 7-bit conversion for a peer without
8BITMIME (``delivery.downgrade.to_7bit`` works on the whole MIME tree): rare, and done as
before.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from pymta.types import QueuedMessage

from .downgrade import has_8bit, header_section, to_7bit

STREAM_OVER = 1 << 20    # bodies larger than this are streamed from the spool file
PIECE = 64 * 1024        # bytes per read of a streamed body (a BDAT chunk is several)
HEADER_PROBE = 1 << 20   # the prefix in which the header section is looked for (the
                         # receiving side's header size limit, PYMTA_HEADER_SIZE_LIMIT)


class SpoolUnreadable(Exception):
    """The spool file failed while being sent: a local fault (4.3.0), not the peer's."""


@dataclass(slots=True)
class OutgoingBody:
    """``head`` (the pipeline's prepended header fields) then the spooled body: ``data``
    when it is in memory, else the file at ``path``. ``size`` counts both."""

    head: bytes
    data: bytes | None
    path: str
    size: int
    eight_bit: bool
    header_ascii: bool   # no non-ASCII in the header section (else SMTPUTF8 is needed)

    @property
    def streamed(self) -> bool:
        return self.data is None

    async def pieces(self) -> AsyncGenerator[bytes, None]:
        """The bytes to send, in order, none larger than ``PIECE`` (+ ``head``) when
        streamed; a file is read in a worker thread, never on the event loop."""
        if self.data is not None:
            yield self.head + self.data if self.head else self.data
            return
        try:
            f = await asyncio.to_thread(open, self.path, "rb", buffering=0)
        except OSError as exc:
            raise SpoolUnreadable(f"cannot read the queued message: {exc}") from None
        try:
            first = await asyncio.to_thread(f.read, PIECE)
            yield self.head + first
            while piece := await asyncio.to_thread(f.read, PIECE):
                yield piece
        except OSError as exc:
            raise SpoolUnreadable(f"cannot read the queued message: {exc}") from None
        finally:
            f.close()

    def whole(self) -> bytes:
        """Everything at once (blocking read of a streamed body): for the conversion."""
        if self.data is not None:
            return self.head + self.data
        with open(self.path, "rb") as f:
            return self.head + f.read()

    def converted_to_7bit(self) -> OutgoingBody:
        """This body with its 8-bit parts re-encoded (RFC 6152 §3), held in memory."""
        data = to_7bit(self.whole())
        return in_memory(b"", data)


def load_body(msg: QueuedMessage) -> OutgoingBody:
    """The outgoing body of ``msg`` (blocking: call it in a worker thread)."""
    prepend = msg.envelope.prepend
    head = prepend.encode("utf-8", "surrogateescape") if prepend else b""
    if msg.body is not None:
        return in_memory(head, msg.body)
    path = msg.body_path
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size <= STREAM_OVER:
            return in_memory(head, f.read())
        # the header section: read until its end (usually the first piece), at most
        # HEADER_PROBE; then the rest only as far as it takes to find an 8-bit byte
        probe = head + f.read(PIECE)
        while (b"\r\n\r\n" not in probe and len(probe) < HEADER_PROBE
               and (more := f.read(PIECE))):
            probe += more
        eight = has_8bit(probe)
        header_ascii = header_section(probe).isascii()
        del probe
        while not eight and (piece := f.read(PIECE)):
            eight = has_8bit(piece)
    return OutgoingBody(head, None, path, len(head) + size, eight, header_ascii)


def in_memory(head: bytes, data: bytes) -> OutgoingBody:
    """``head`` + ``data`` as a body held in memory."""
    eight = has_8bit(head) or has_8bit(data)
    header_ascii = not eight or header_section(head + data[:HEADER_PROBE]).isascii()
    return OutgoingBody(head, data, "", len(head) + len(data), eight, header_ascii)
