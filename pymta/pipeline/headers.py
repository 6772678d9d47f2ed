"""The header section of a spooled message: split into fields, and filtered (fields dropped)
without touching the body.

The header section ends at the first empty line, or at the first line that is neither a
header field nor a continuation line, the same rule as :mod:`pymta.headerscan` (Postfix's
cleanup). A *field* is its first line plus its continuation lines, CRLF included, exactly as
spooled. Stages use :func:`split_fields` on ``SpooledBody.header_bytes()``; the session uses
:func:`copy_without` through ``QueueStore.rewrite_spool`` to remove fields a stage asked to
drop (``Transaction.drop_header``), e.g. an incoming ``Authentication-Results`` that claims
our authserv-id.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Sequence
from typing import BinaryIO

DropPredicate = Callable[[bytes], bool]
"""Called with one raw header field (name, value, continuation lines, CRLF); True drops it."""


def is_field_start(line: bytes) -> bool:
    """Does ``line`` begin a header field (``name:`` with a name free of spaces)?"""
    colon = line.find(b":")
    return colon > 0 and b" " not in line[:colon].rstrip(b" \t") and line[:1] not in b" \t"


def field_name(field: bytes) -> str:
    """The lower-case name of a raw field (``b"Subject: x"`` → ``"subject"``)."""
    return field[:field.find(b":")].rstrip(b" \t").decode("ascii", "replace").lower()


def field_value(field: bytes) -> str:
    """The unfolded value of a raw field, without the name and surrounding blanks."""
    value = field[field.find(b":") + 1:]
    return value.replace(b"\r\n", b"").replace(b"\n", b"").decode("utf-8", "replace").strip()


def split_fields(section: bytes) -> list[bytes]:
    """The header fields of ``section`` (a header section, or a whole message) in order."""
    fields: list[bytes] = []
    for line in section.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif is_field_start(line):
            fields.append(line)
        else:
            break
    return fields


def _drop(field: bytes, predicates: Sequence[DropPredicate]) -> bool:
    return any(pred(field) for pred in predicates)


def filter_bytes(data: bytes, predicates: Sequence[DropPredicate]) -> bytes:
    """``data`` (a whole message) without the header fields any predicate matches."""
    if not predicates:
        return data
    kept: list[bytes] = []
    pos = 0
    for field in split_fields(data):
        pos += len(field)
        if not _drop(field, predicates):
            kept.append(field)
    return b"".join(kept) + data[pos:]


def copy_without(src: BinaryIO, dst: BinaryIO, predicates: Sequence[DropPredicate]) -> None:
    """Stream ``src`` to ``dst``, leaving out matching header fields; the body is copied as is.

    Reads the header section line by line, so its size does not matter."""
    current: list[bytes] = []

    def flush() -> None:
        if current:
            field = b"".join(current)
            if not _drop(field, predicates):
                dst.write(field)
            current.clear()

    for line in iter(src.readline, b""):
        if line[:1] in (b" ", b"\t") and current:
            current.append(line)
            continue
        flush()
        if is_field_start(line):
            current.append(line)
            continue
        dst.write(line)         # the empty line (or first body line) ends the header section
        break
    flush()
    shutil.copyfileobj(src, dst, 64 * 1024)


def fold(name: str, parts: Iterable[str], sep: str = ";", width: int = 78) -> str:
    """``Name: part1; part2; ...`` folded before parts that would pass ``width`` (RFC 5322
    §2.2.3); no CRLF at the end. Parts are never split, so a long part makes a long line."""
    line = f"{name}:"
    lines: list[str] = []
    items = list(parts)
    for i, part in enumerate(items):
        text = part + (sep if i < len(items) - 1 else "")
        if len(line) + 1 + len(text) > width and line.strip() not in (f"{name}:", ""):
            lines.append(line)
            line = "\t" + text
        else:
            line = f"{line} {text}" if line else text
    lines.append(line)
    return "\r\n".join(lines)
