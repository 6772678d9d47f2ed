"""The header section of a spooled message: split into fields, filtered (fields dropped)
without touching the body, shown to strict parsers, and folded.

The header section ends at the first empty line, or at the first line that is neither a
header field nor a continuation line, the same rule as :mod:`pymta.receiving.headerscan`
(Postfix's cleanup, ``is_header()``): a field starts with a name of printable ASCII other than
``:``, then optional blanks (RFC 5322 §4.5's obsolete ``Subject :``), then ``:``. A *field* is its
first line plus its continuation lines, CRLF included, exactly as spooled. Stages use
:func:`split_fields` on ``SpooledBody.header_bytes()``; the queue's intake uses
:func:`copy_without` through ``QueueStore.rewrite_spool`` to remove fields a stage asked to drop
(``Transaction.drop_header``), e.g. an incoming ``Authentication-Results`` that claims our
authserv-id.

Lines end at LF, as everywhere in pymta (a bare CR cannot reach the spool: the SMTP engine
refuses it). Every function here is linear in the header section: :func:`split_fields` is one
regular-expression match per field and copies each field once (it grew a field by ``+=``
per continuation line: 250,000 of them cost seconds per stage on the event loop, issue 10
review), and none of them looks at the body.

dkimpy reads a message more strictly than that (no blank before a colon, a blank line
required after the header section) and raises ``MessageFormatError`` on the rest, which is
mail Postfix accepts. :func:`strict_view` gives it the message as Postfix splits it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

# DropPredicate: called with one raw header field (name, value, continuation lines, CRLF);
# True drops it. A value of pymta.types, since the pipeline's Decision carries them.
from pymta.types import DropPredicate

#: A field's first line: a name of printable ASCII but ``:`` (RFC 5322 ``ftext``), blanks
#: allowed before the colon (obsolete syntax, still sent); Postfix's ``is_header()``.
FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")


def is_field_start(line: bytes) -> bool:
    """Does ``line`` begin a header field (see :data:`FIELD_START`)?"""
    return FIELD_START.match(line) is not None


def field_name(field: bytes) -> str:
    """The lower-case name of a raw field (``b"Subject: x"`` and ``b"Subject : x"`` →
    ``"subject"``)."""
    return field[:field.find(b":")].rstrip(b" \t").decode("ascii", "replace").lower()


def field_value(field: bytes) -> str:
    """The unfolded value of a raw field, without the name and surrounding blanks."""
    value = field[field.find(b":") + 1:]
    return value.replace(b"\r\n", b"").replace(b"\n", b"").decode("utf-8", "replace").strip()


#: One whole field: its first line (:data:`FIELD_START`), then its continuation lines (lines
#: starting with a blank), each up to and including its LF, the last one possibly without.
#: The parts are disjoint (a name has no blank or colon, ``[^\n]*`` stops only at LF or the
#: end), so a match never backtracks more than the length of a name: linear in the field.
_FIELD = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:[^\n]*\n?(?:[ \t][^\n]*\n?)*")


def split_fields(section: bytes) -> list[bytes]:
    """The header fields of ``section`` (a header section, or a whole message) in order.

    Lines end at LF (as :func:`copy_without`, :func:`strict_view` and
    :mod:`pymta.receiving.headerscan` read them). One regular-expression match per field, each
    field copied once: the cost is linear in the header section however it is folded (issue 10
    review: ``fields[-1] += line`` made 250,000 continuation lines cost seconds on the
    event loop), and the body after it is never looked at."""
    fields: list[bytes] = []
    match = _FIELD.match
    m = match(section)
    while m is not None:
        fields.append(m.group())
        m = match(section, m.end())
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


@dataclass(frozen=True, slots=True)
class StrictView:
    """A message as a strict RFC 5322 parser (dkimpy) can read it; see :func:`strict_view`.

    ``renamed``: lower-case names of fields whose blanks before the colon were removed (the
    relaxed header canonicalization of DKIM removes them too, so relaxed hashes are the
    same). ``separated``: the header section ended at a line that is not a field, and an
    empty line was put there (the body is then what Postfix hands a milter as the body)."""

    data: bytes
    renamed: frozenset[str] = frozenset()
    separated: bool = False

    @property
    def changed(self) -> bool:
        return self.separated or bool(self.renamed)


def strict_view(message: bytes) -> StrictView:
    """``message`` with its header section split as Postfix splits it, written so dkimpy
    parses it: ``Name :`` becomes ``Name:``, and an empty line is put before the first line
    that is neither a field nor a continuation. Unchanged when there is nothing to change
    (the same bytes object). Reads only the header section."""
    out: list[bytes] = []
    renamed: set[str] = set()
    pos = 0
    fields = 0
    end = len(message)
    while pos < end:
        nl = message.find(b"\n", pos)
        stop = end if nl < 0 else nl + 1
        line = message[pos:stop]
        if line in (b"\r\n", b"\n"):
            break
        if line[:1] in (b" ", b"\t") and fields:
            out.append(line)
        else:
            m = FIELD_START.match(line)
            if m is None:                       # the body begins without an empty line
                if not out and not renamed:     # nothing before it to rewrite
                    return StrictView(message[:pos] + b"\r\n" + message[pos:], separated=True)
                out.append(b"\r\n")
                out.append(message[pos:])
                return StrictView(b"".join(out), frozenset(renamed), True)
            fields += 1
            colon = m.end() - 1
            if line[colon - 1:colon] in (b" ", b"\t"):
                name = line[:colon].rstrip(b" \t")
                renamed.add(name.decode("ascii").lower())
                line = name + line[colon:]
            out.append(line)
        pos = stop
    if not renamed:
        return StrictView(message)
    return StrictView(b"".join(out) + message[pos:], frozenset(renamed))


def _words(part: str) -> list[str]:
    """``part`` split at the blanks that are outside quoted-strings (folding there adds no
    character to any value: RFC 5322 §3.2.2 FWS)."""
    if '"' not in part:
        return [w for w in part.split(" ") if w] or [part]
    words: list[str] = []
    start = 0
    quoted = escaped = False
    for i, c in enumerate(part):
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif c == " " and not quoted:
            words.append(part[start:i])
            start = i + 1
    words.append(part[start:])
    return [w for w in words if w] or [part]


def fold(name: str, parts: Iterable[str], sep: str = ";", width: int = 78) -> str:
    """``Name: part1; part2; ...`` folded (RFC 5322 §2.2.3) before a part, or before a word of
    a part, that would pass ``width``; no CRLF at the end. Folding happens only at blanks
    outside quoted-strings, so a line is longer than ``width`` only when one word is (the
    values we write are bounded, :data:`pymta.headervalue.MAX_ECHO`)."""
    head = f"{name}:"
    line = head
    lines: list[str] = []
    items = list(parts)
    for i, part in enumerate(items):
        text = part + (sep if i < len(items) - 1 else "")
        if len(line) + 1 + len(text) <= width:
            line = f"{line} {text}"
            continue
        words = _words(text)
        if line == head:
            line = f"{line} {words[0]}"
        else:
            lines.append(line)
            line = "\t" + words[0]
        for word in words[1:]:
            if len(line) + 1 + len(word) > width:
                lines.append(line)
                line = "\t" + word
            else:
                line = f"{line} {word}"
    lines.append(line)
    return "\r\n".join(lines)
