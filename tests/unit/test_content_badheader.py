"""Bad header (issue 12): amavis's header checks, each with a header section it must flag and
one it must pass, over CRLF header sections as they sit in the spool, the malformed corpus,
the bound on the header section, and random bytes (the check never raises).
"""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.content.badheader import (
    CONTROL,
    DUPLICATE,
    EIGHT_BIT,
    EMPTY_FOLD,
    LONG_LINE,
    MISSING,
    SYNTAX,
    TOO_COMPLEX,
    BadHeader,
    HeaderFinding,
)

CORPUS = Path(__file__).parent.parent / "corpus" / "malformed"
GOOD = (b"Received: from mx.example.org (mx.example.org [192.0.2.1])\r\n"
        b"\tby mail.example.com with ESMTP; Sun, 6 Dec 2026 12:00:00 +0000\r\n"
        b"Received: from client by mx.example.org; Sun, 6 Dec 2026 11:59:59 +0000\r\n"
        b"From: Alice <alice@example.org>\r\nTo: bob@example.com\r\n"
        b"Subject: =?UTF-8?Q?Gr=C3=BC=C3=9Fe?= from\r\n the folded subject\r\n"
        b"Date: Sun, 6 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@example.org>\r\n"
        b"Comments: one\r\nComments: two\r\nMIME-Version: 1.0\r\n")
BODY = b"\r\nBody line\r\nFrom: not a header, the body\r\n"


def check(header: bytes, body: bytes = BODY, **kwargs: bool) -> list[HeaderFinding]:
    return BadHeader().inspect(io.BytesIO(header + body), **kwargs)


def kinds(found: list[HeaderFinding]) -> list[tuple[str, str]]:
    return [(f.kind, f.field) for f in found]


def test_clean_header_section() -> None:
    assert check(GOOD) == []


def test_obsolete_blanks_before_colon_are_no_syntax_error() -> None:
    assert check(GOOD.replace(b"Subject:", b"Subject   :")) == []


@pytest.mark.parametrize("line", [b"this line is not a field\r\n", b"X Bad Name: value\r\n",
                                  b"--boundary-leaked: x\r\n", b"NoColonHere\r\n",
                                  b"Bad\x01Name: x\r\n"])
def test_syntax_error_lines(line: bytes) -> None:
    found = check(GOOD + line)
    assert [f.kind for f in found] == [SYNTAX]
    assert found[0].detail.startswith("not a header field: ")


def test_continuation_before_first_field_and_non_ascii_name() -> None:
    found = check(b" starts folded\r\n" + GOOD + "Sübject: x\r\n".encode())
    assert kinds(found) == [(SYNTAX, ""), (SYNTAX, "S\\xC3\\xBCbject")]


def test_whitespace_only_continuation() -> None:
    assert kinds(check(GOOD + b"X-Note: a\r\n   \r\n b\r\n")) == [(EMPTY_FOLD, "X-Note")]
    assert check(GOOD + b"X-Note: a\r\n   b\r\n") == []


def test_long_line() -> None:
    ok = b"X-Long: " + b"a" * (998 - 8) + b"\r\n"
    assert check(GOOD + ok) == []
    found = check(GOOD + b"X-Long: " + b"a" * (999 - 8) + b"\r\n")
    assert kinds(found) == [(LONG_LINE, "X-Long")]
    assert "line of 999 octets" in found[0].detail
    folded = b"X-Long: a\r\n " + b"b" * 1200 + b"\r\n"
    assert kinds(check(GOOD + folded)) == [(LONG_LINE, "X-Long")]


def test_long_line_without_line_end_is_bounded() -> None:
    start = time.perf_counter()
    found = check(GOOD + b"X-Huge: " + b"x" * 20_000_000, b"")
    assert time.perf_counter() - start < 0.5
    assert kinds(found) == [(TOO_COMPLEX, ""), (LONG_LINE, "X-Huge")]
    found = check(GOOD + b"X-Big: " + b"x" * 100_000 + b"\r\n")
    assert kinds(found) == [(LONG_LINE, "X-Big")]
    assert "line of 100007 octets" in found[0].detail


def test_control_characters() -> None:
    assert kinds(check(GOOD + b"X-Nul: a\x00b\r\n")) == [(CONTROL, "X-Nul")]
    assert kinds(check(GOOD + b"X-Cr: a\rb\r\n")) == [(CONTROL, "X-Cr")]
    assert check(GOOD + b"X-Tab: a\tb\r\n") == []


def test_eight_bit() -> None:
    utf8 = GOOD + "X-Name: Jürgen\r\n".encode()
    latin1 = GOOD + "X-Name: Jürgen\r\n".encode("latin-1")
    assert kinds(check(utf8)) == [(EIGHT_BIT, "X-Name")]
    assert check(utf8, smtputf8=True) == []
    assert BadHeader(allow_utf8=True).inspect(io.BytesIO(utf8 + BODY)) == []
    found = check(latin1, smtputf8=True)
    assert kinds(found) == [(EIGHT_BIT, "X-Name")]
    assert "not UTF-8" in found[0].detail and "J\\xFCrgen" in found[0].detail


def test_duplicate_singletons() -> None:
    found = check(GOOD + b"From: mallory@example.net\r\nSubject: again\r\nDate: x\r\nDate: y\r\n")
    assert [(f.kind, f.field, f.detail) for f in found] == [
        (DUPLICATE, "Date", "Date occurs 3 times"), (DUPLICATE, "From", "From occurs 2 times"),
        (DUPLICATE, "Subject", "Subject occurs 2 times")]
    assert kinds(check(GOOD + b"message-id: <2@x>\r\n")) == [(DUPLICATE, "Message-ID")]


def test_missing_required_fields() -> None:
    without = re.sub(rb"(?m)^(From|Date):.*\r\n", b"", GOOD)
    assert kinds(check(without)) == [(MISSING, "Date"), (MISSING, "From")]
    assert kinds(check(without + b"Date: Sun, 6 Dec 2026 12:00:00 +0000\r\n")) == [
        (MISSING, "From")]


def test_header_section_bound() -> None:
    many = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"p" * 80) for i in range(5000))
    start = time.perf_counter()
    found = BadHeader(max_header_bytes=64 * 1024).inspect(
        io.BytesIO(many + GOOD + b"From: second@example.org\r\n" + BODY))
    assert time.perf_counter() - start < 1.0
    assert kinds(found) == [(TOO_COMPLEX, "")]          # and no "missing": not judged on a part


def test_body_is_not_read() -> None:
    assert check(GOOD, b"\r\n" + b"\xff\x00 junk\r\n" * 1000) == []


def test_lf_only_and_path_source(tmp_path: Path) -> None:
    spool = tmp_path / "msg"
    spool.write_bytes((GOOD + b"From: x@y\r\n" + BODY).replace(b"\r\n", b"\n"))
    assert kinds(BadHeader().inspect(spool)) == [(DUPLICATE, "From")]


def test_corpus_first_line_not_a_field() -> None:
    raw = (CORPUS / "cpython-msg_19.eml").read_bytes()
    found = BadHeader().inspect(io.BytesIO(raw))
    assert found[0].kind == SYNTAX
    assert (MISSING, "From") in kinds(found)


def test_corpus_obsolete_whitespace() -> None:
    raw = (CORPUS / "rfc5322-a6.3-obsolete-whitespace.eml").read_bytes()
    assert [f.kind for f in BadHeader().inspect(io.BytesIO(raw))] == [EMPTY_FOLD]


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda p: p.name)
def test_malformed_corpus_is_total(path: Path) -> None:
    for finding in BadHeader().inspect(io.BytesIO(path.read_bytes())):
        assert re.fullmatch(r"[\x20-\x7e]*", finding.detail + finding.field)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.booleans())
def test_never_raises(noise: bytes, smtputf8: bool) -> None:
    found = BadHeader().inspect(io.BytesIO(GOOD + noise), smtputf8=smtputf8)
    assert len(found) <= 100
    for finding in found:
        assert re.fullmatch(r"[\x20-\x7e]*", finding.detail + finding.field)
