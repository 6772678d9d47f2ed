"""Bad header: amavis's header checks over the header section of a spooled message.

The image's ``FINAL_BAD_HEADER_DESTINY`` (issue 12) acts on what amavis's
``check_header_validity`` reports; :class:`BadHeader` reports the same things, each as a
:class:`HeaderFinding` (kind, field, detail), one finding per field at most, in amavis's order:

- ``syntax``: a line that is neither a field nor a continuation, a field name with a
  character outside RFC 5322 ``ftext`` (or starting with ``--``: a MIME boundary in the
  header), a continuation line before the first field;
- ``empty-fold``: a continuation line made only of blanks (obsolete syntax, RFC 5322 §4.2);
- ``long-line``: a line longer than 998 octets (RFC 5322 §2.1.1);
- ``control``: NUL or a bare CR in a field;
- ``8bit``: non-ASCII octets that are not MIME-encoded: always when they are not UTF-8; when
  they are UTF-8, unless the message came with SMTPUTF8 (``smtputf8``) or ``allow_utf8`` is
  set (amavis's default: its ``utf8`` test is off; the brief asks for it on);
- ``duplicate``: a field allowed at most once (RFC 5322 §3.6, and amavis's MIME and
  Auto-Submitted additions) that occurs more often;
- ``missing``: no ``Date`` or no ``From`` (amavis's ``missing`` test, on by default);
- ``too-complex``: the header section is longer than ``max_header_bytes`` (the rest is not
  read, and ``missing`` is not judged on a part of it).

Only the header section is read (up to the first empty line), line by line with a cap on each
read; the check is total: any bytes give findings, never an exception.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from pymta.content.spoolfile import MessageSource, open_message

SYNTAX = "syntax"
EMPTY_FOLD = "empty-fold"
LONG_LINE = "long-line"
CONTROL = "control"
EIGHT_BIT = "8bit"
DUPLICATE = "duplicate"
MISSING = "missing"
TOO_COMPLEX = "too-complex"

#: Fields allowed at most once, with their usual spelling (amavis's list).
SINGLETONS = ("Date", "From", "Sender", "Reply-To", "To", "Cc", "Bcc", "Subject", "Message-ID",
              "References", "In-Reply-To", "MIME-Version", "Content-Type",
              "Content-Transfer-Encoding", "Content-ID", "Content-Description",
              "Content-Disposition", "Auto-Submitted")
#: Fields whose absence amavis reports.
REQUIRED = ("Date", "From")

_MAX_LINE = 998
_READ_CAP = 64 * 1024
_KEEP = 2048                    # octets of a line kept for the checks after the length
# amavis's field name: printable ASCII but ":" (and 8-bit, reported separately), blanks
# allowed before the colon (obsolete syntax, RFC 5322 §4.5)
_FIELD = re.compile(rb"([!-9;-~\x80-\xff]+)[ \t]*:")
_CONTROL = re.compile(rb"[\x00\r]")
_NON_ASCII = re.compile(rb"[\x80-\xff]")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


@dataclass(frozen=True, slots=True)
class HeaderFinding:
    """One bad-header finding: ``kind`` (the module's constants), ``field`` (the field name as
    written, empty when the line has none), ``detail`` (printable ASCII, short)."""

    kind: str
    field: str
    detail: str


def _show(data: bytes, limit: int = 60) -> str:
    text = data[:limit].decode("latin-1")
    text = _UNPRINTABLE.sub(lambda m: f"\\x{ord(m.group()):02X}", text)
    return text + ("[...]" if len(data) > limit else "")


class _Field:
    __slots__ = ("lines", "name")

    def __init__(self, name: bytes) -> None:
        self.name = name                        # b"": an invalid line (or its continuations)
        self.lines: list[tuple[bytes, int]] = []    # (start of the line, its full length)


class BadHeader:
    """The bad-header inspection. ``max_header_bytes`` bounds the header section read,
    ``max_findings`` the findings reported (amavis stops at 100); ``allow_utf8`` accepts
    unencoded UTF-8 in any message, as amavis does by default."""

    def __init__(self, *, max_header_bytes: int = 256 * 1024, max_findings: int = 100,
                 allow_utf8: bool = False) -> None:
        self.max_header_bytes = max_header_bytes
        self.max_findings = max_findings
        self.allow_utf8 = allow_utf8

    def inspect(self, source: MessageSource, *, smtputf8: bool = False) -> list[HeaderFinding]:
        """The findings for the message's header section (empty when it is clean).
        ``smtputf8``: the message came with the SMTPUTF8 parameter, so UTF-8 is allowed."""
        with open_message(source) as (f, _size):
            fields, truncated = self._read(f)
        found: list[HeaderFinding] = []
        if truncated:
            found.append(HeaderFinding(TOO_COMPLEX, "", "header section longer than "
                                       f"{self.max_header_bytes} bytes"))
        utf8_ok = smtputf8 or self.allow_utf8
        for field in fields:
            finding = _check(field, utf8_ok)
            if finding is not None:
                found.append(finding)
        found.extend(_counts(fields, judge_missing=not truncated))
        return found[:self.max_findings]

    def _read(self, f: IO[bytes]) -> tuple[list[_Field], bool]:
        """The header section as fields, and whether it was cut at ``max_header_bytes`` (the
        line that crosses the bound is still checked, as far as it was read)."""
        fields: list[_Field] = []
        seen = 0
        current: _Field | None = None
        while True:
            line, length = _line(f.readline, self.max_header_bytes - seen)
            if line is None:
                return fields, False
            seen += length
            if length == 0:
                return fields, False
            if line[:1] in (b" ", b"\t"):
                if current is None:
                    current = _Field(b"")        # a continuation before any field
                    fields.append(current)
                current.lines.append((line, length))
            else:
                match = _FIELD.match(line)
                current = _Field(match.group(1) if match else b"")
                current.lines.append((line, length))
                fields.append(current)
            if seen > self.max_header_bytes:
                return fields, True


def _line(readline: Callable[[int], bytes], budget: int) -> tuple[bytes | None, int]:
    """One line without its line end: (its first octets, its length); (None, 0) at the end of
    the file. Reading stops once the line is longer than ``budget``."""
    kept = b""
    length = 0
    while True:
        piece = readline(_READ_CAP)
        if not piece:
            return (kept, length) if length or kept else (None, 0)
        ended = piece.endswith(b"\n")
        if ended:
            piece = piece[:-2] if piece.endswith(b"\r\n") else piece[:-1]
        if len(kept) < _KEEP:
            kept += piece[:_KEEP - len(kept)]
        length += len(piece)
        if ended or length > budget:
            return kept, length


def _check(field: _Field, utf8_ok: bool) -> HeaderFinding | None:
    """amavis's per-field checks, the first that applies."""
    name = field.name
    shown = _show(name)
    first = field.lines[0][0]
    if not name or name[:2] == b"--" or not _FIELD.match(first):
        return HeaderFinding(SYNTAX, "", f"not a header field: {_show(first)}")
    if _NON_ASCII.search(name):
        return HeaderFinding(SYNTAX, shown, "field name contains non-ASCII octets")
    for line, _ in field.lines[1:]:
        if not line.strip(b" \t"):
            return HeaderFinding(EMPTY_FOLD, shown, "continuation line made only of blanks")
    for line, length in field.lines:
        if length > _MAX_LINE:
            return HeaderFinding(LONG_LINE, shown, f"line of {length} octets (more than "
                                 f"{_MAX_LINE}): {_show(line, 40)}")
    for line, _ in field.lines:
        if _CONTROL.search(line):
            return HeaderFinding(CONTROL, shown, f"NUL or bare CR: {_show(line)}")
    text = b"\r\n".join(line for line, _ in field.lines)
    if _NON_ASCII.search(text):
        try:
            text.decode("utf-8")
        except UnicodeDecodeError:
            return HeaderFinding(EIGHT_BIT, shown, f"non-encoded non-ASCII data (and not "
                                 f"UTF-8): {_show(text)}")
        if not utf8_ok:
            return HeaderFinding(EIGHT_BIT, shown, "non-encoded UTF-8 in a message without "
                                 f"SMTPUTF8: {_show(text)}")
    return None


def _counts(fields: list[_Field], *, judge_missing: bool) -> list[HeaderFinding]:
    counts = Counter(f.name.lower() for f in fields if f.name)
    found = []
    for name in SINGLETONS:
        n = counts.get(name.lower().encode(), 0)
        if n == 0 and judge_missing and name in REQUIRED:
            found.append(HeaderFinding(MISSING, name, f"required field {name} is missing"))
        elif n > 1:
            found.append(HeaderFinding(DUPLICATE, name, f"{name} occurs {n} times"))
    return found
