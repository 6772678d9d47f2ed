"""The spooled message as the inspections read it: a path, or a binary file the caller opened.

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
def opened(source: MessageSource) -> Iterator[BinaryIO]:
    """The message as a binary file: a path is opened and closed here, a file object is
    used as it is and left open (the caller owns it)."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            yield f
        return
    yield source
