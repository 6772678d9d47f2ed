"""The spooled message as the scanners and inspections read it: a path, or a binary file the
caller opened.

The inspections (:mod:`pymta.content.banned`, :mod:`pymta.content.badheader`) read the spool
file line by line with a cap on each read, so a message is never held whole in memory and a
50 MB line without a line end costs no more than a short one.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import BinaryIO

#: A spool file by path, or a binary file object read from its current position (left open).
MessageSource = str | os.PathLike[str] | BinaryIO


@contextlib.contextmanager
def open_message(source: MessageSource) -> Iterator[tuple[BinaryIO, int]]:
    """The message as (binary file, bytes left to read). A path is opened and closed here; a
    file object is used from its current position and left open."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield f, os.fstat(f.fileno()).st_size
        return
    start = source.tell()
    try:
        size = os.fstat(source.fileno()).st_size - start
    except (OSError, AttributeError, ValueError):   # not a real file (BytesIO): seek to learn
        end = source.seek(0, os.SEEK_END)
        source.seek(start)
        size = end - start
    yield source, size
