"""Fuzz target: the parsers and scanners of received header sections.

``pymta.receiving.headerscan.HeaderScanner`` (fed in pieces), ``pymta.pipeline.headers``
(split, name, value, filter, streaming copy, fold), ``authresults.authserv_id`` /
``claims_ours``, and the
helpers the pipeline stages use on a received header (``dmarc.author_domains``,
``dkimsign.header_value`` / ``from_domain``, ``dkimverify.parse_signatures``,
``arc.arc_key_names`` / ``has_arc``).

Input layout: one byte (small scanner limit or not), one PRNG seed byte (read sizes and which
field names the filter drops), then the message.

Contract checked:
* nothing raises, on raw bytes or on the message in spool form (CRLF lines); the stage
  helpers, given what the stages get (the spool form's header section), never raise: a
  header a library cannot parse is still mail (issue 10, defect 9);
* the scanner gives the same answer whatever the read sizes;
* ``headerscan`` and ``pipeline.headers`` apply "the same rule" (both docstrings say so):
  the scanner's ``Received:`` count equals the number of fields ``split_fields`` names
  ``received`` (loop detection sees what the stages see);
* ``split_fields`` returns a prefix of the message; ``filter_bytes`` with nothing to drop is
  the identity, and drops exactly what ``copy_without`` drops, and leaves no matching field;
* ``fold`` of clean parts unfolds to ``Name: p1; p2`` (blanks aside) and a line passes the
  width only when it has no blank outside quoted-strings to fold at.
"""

from __future__ import annotations

import io
import random

from fuzz.harness import Input, require, spool_form
from pymta.pipeline import arc, dkimsign, dkimverify, dmarc
from pymta.pipeline.authresults import AuthResultsModifier, authserv_id
from pymta.pipeline.headers import (
    copy_without,
    field_name,
    field_value,
    filter_bytes,
    fold,
    split_fields,
)
from pymta.receiving.headerscan import HeaderScanner

NAMES = ("received", "authentication-results", "subject", "from", "dkim-signature",
         "arc-seal", "x-a", "to")
SIZES = (1, 2, 3, 7, 16, 100, 1 << 20)


def _scan(data: bytes, limit: int, sizes: list[int] | None) -> tuple[int, bool, bool]:
    scanner = HeaderScanner(limit)
    if sizes is None:
        scanner.feed(data)
    else:
        pos = 0
        for n in sizes:
            if pos >= len(data):
                break
            scanner.feed(data[pos:pos + n])
            pos += n
        scanner.feed(data[pos:])
    return scanner.received, scanner.too_large, scanner.done


def _stage_helpers(header: bytes) -> None:
    """What SPF/DKIM/DMARC/ARC stages call on a received header section: must not raise."""
    dmarc.author_domains(header)
    dkimsign.header_value(header, b"from")
    dkimsign.from_domain(header)
    dkimverify.parse_signatures(header)
    arc.arc_key_names(header)
    arc.has_arc(header)


def _foldable(text: str) -> bool:
    """Is there a space outside quoted-strings in ``text``, where ``fold`` may break?"""
    quoted = escaped = False
    for c in text:
        if escaped:
            escaped = False
        elif quoted and c == "\\":
            escaped = True
        elif c == '"':
            quoted = not quoted
        elif not quoted and c == " ":    # fold breaks at spaces (a tab stays inside a word)
            return True
    return False


def _fold(fields: list[bytes]) -> None:
    parts = [field_value(f).replace("\r", "").replace("\n", "") for f in fields][:8]
    if not parts:
        return
    out = fold("X-Fuzz", parts)
    require(out.replace("\r\n\t", " ").split() == ("X-Fuzz: " + "; ".join(parts)).split(),
            "fold does not unfold to the parts", out[:200])
    for i, line in enumerate(out.split("\r\n")):
        require(i == 0 or line.startswith("\t"), "fold continuation without a tab", line[:80])
        if len(line) > 78:
            body = line.removeprefix("X-Fuzz:") if i == 0 else line
            require(not _foldable(body.strip(" \t")),
                    "fold left a line over the width that it could have folded", line[:200])


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    small = inp.flag()
    rng = random.Random(inp.byte())
    message = inp.rest()
    limit = 64 + rng.randrange(512) if small else 1 << 20
    sizes = [rng.choice(SIZES) for _ in range(64)]

    whole = _scan(message, limit, None)
    require(_scan(message, limit, sizes) == whole,
            "HeaderScanner result depends on read sizes", (whole, _scan(message, limit, sizes)))

    for msg in (message, spool_form(message)):
        fields = split_fields(msg)
        require(msg.startswith(b"".join(fields)), "split_fields is not a prefix of the message")
        for f in fields:
            field_name(f)
            authserv_id(field_value(f))
        _fold(fields)

    msg = spool_form(message)
    end = msg.find(b"\r\n\r\n")
    _stage_helpers(msg[:end + 2] if end >= 0 else msg)
    fields = split_fields(msg)
    received, too_large, _ = _scan(msg, 1 << 30, None)
    counted = sum(1 for f in fields if field_name(f) == "received")
    require(received == counted, "HeaderScanner counts Received: fields differently from "
            "split_fields", (received, counted))

    require(filter_bytes(msg, [lambda f: False]) == msg, "filter_bytes changed a message "
            "although nothing matched")
    drop = frozenset(n for n in NAMES if rng.random() < 0.4)
    ours = AuthResultsModifier(rng.choice(("mx.fuzz.test", "example.com", "a")))

    def pred(field: bytes) -> bool:
        return field_name(field) in drop or ours.claims_ours(field)

    filtered = filter_bytes(msg, [pred])
    dst = io.BytesIO()
    copy_without(io.BytesIO(msg), dst, [pred])
    require(dst.getvalue() == filtered, "copy_without and filter_bytes disagree",
            (filtered[:200], dst.getvalue()[:200]))
    left = [f for f in split_fields(filtered) if pred(f)]
    require(not left, "a dropped field is still there after filtering", left[:1])
