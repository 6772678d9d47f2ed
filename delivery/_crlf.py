"""Streaming CRLF → LF conversion shared by the maildir and mbox writers.

The spool keeps messages in SMTP form (CRLF); Unix mailboxes store LF, as Postfix's local
delivery does. Messages can be large, so conversion is streamed in bounded pieces and a CR
that happens to end one piece is held back until the next piece shows whether an LF follows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO

CHUNK = 64 * 1024

#: A message body for the mailbox writers: a spool file's path, or a callable that opens it
#: (``QueuedMessage.open``: from memory when the queue handed it over so).
BodySource = str | Callable[[], BinaryIO]


def open_body(source: BodySource, *, raw: bool = False) -> BinaryIO:
    """The body as a binary file from its start; the caller closes it. ``raw``: a file
    unbuffered, for readers of whole chunks (a buffer would only cost system calls; a reader
    of lines needs one)."""
    if isinstance(source, str):
        return open(source, "rb", buffering=0 if raw else -1)
    return source()


def read_chunks(f: BinaryIO, size: int = CHUNK) -> Iterator[bytes]:
    """Fixed-size reads: the fast path when only line endings change (maildir)."""
    while chunk := f.read(size):
        yield chunk


def with_prefix(prefix: bytes, f: BinaryIO, size: int = CHUNK) -> Iterator[bytes]:
    """``prefix``, then ``read_chunks(f)``; the prefix rides on the first chunk, so a small
    message (the usual case) takes one write instead of two."""
    chunks = read_chunks(f, size)
    yield prefix + next(chunks, b"")
    yield from chunks


def read_lines(f: BinaryIO, size: int = CHUNK) -> Iterator[bytes]:
    """Lines of at most ``size`` bytes, so an endless line never fills memory (mbox)."""
    while line := f.readline(size):
        yield line


def crlf_to_lf(pieces: Iterable[bytes]) -> Iterator[bytes]:
    """Yield ``pieces`` with every CRLF turned into LF; lone CRs are kept.

    If the input pieces are line-bounded (LF only at their end), so are the output pieces.
    """
    carry = b""
    for piece in pieces:
        if carry:
            piece = carry + piece
            carry = b""
        if piece.endswith(b"\r"):
            carry = b"\r"
            piece = piece[:-1]
        if piece:
            yield piece.replace(b"\r\n", b"\n")
    if carry:
        yield carry
