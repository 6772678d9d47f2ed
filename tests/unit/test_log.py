"""setup_logging: Postfix-style lines, SYSLOG_LEVEL thresholds, JSON lines, and the filter
that keeps SASL credentials out of every log."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from pymta.config.model import Config
from pymta.log import NOTICE, notice, python_level, redact, setup_logging

SECRET = "dXNlcgB1c2VyAHNlY3JldA=="  # base64 of "user\0user\0secret"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    out = io.StringIO()
    root = logging.getLogger()
    level = root.level
    yield out
    for handler in [h for h in root.handlers if getattr(h, "_pymta_handler", False)]:
        root.removeHandler(handler)
    root.setLevel(level)


def test_postfix_style_line(stream: io.StringIO) -> None:
    setup_logging(Config(hostname="mx1.example.com"), stream=stream)
    notice(logging.getLogger("pymta.queue"), "%s: to=<%s>, status=sent", "ABC", "bob@x")
    logging.getLogger("pymta").warning("disk almost full")
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d mx1 pymta\[\d+\]: "
                        r"ABC: to=<bob@x>, status=sent", lines[0]), lines[0]
    assert lines[1].endswith("]: warning: disk almost full")


def test_levels_follow_syslog_level(stream: io.StringIO) -> None:
    assert [python_level(n) for n in range(8)] == [50, 50, 50, 40, 30, NOTICE, 20, 10]
    setup_logging(Config(syslog_level=5), stream=stream)
    log = logging.getLogger("pymta.test")
    log.info("hidden at notice")
    notice(log, "shown at notice")
    assert "hidden" not in stream.getvalue() and "shown at notice" in stream.getvalue()
    setup_logging(Config(syslog_level=3), stream=stream)
    log.warning("hidden at err")
    log.error("shown at err")
    assert "hidden at err" not in stream.getvalue()
    assert "error: shown at err" in stream.getvalue()


def test_setup_twice_does_not_duplicate(stream: io.StringIO) -> None:
    setup_logging(Config(), stream=stream)
    setup_logging(Config(), stream=stream)
    logging.getLogger("pymta").error("once")
    assert stream.getvalue().count("once") == 1


def test_json_lines(stream: io.StringIO) -> None:
    setup_logging(Config(hostname="mx1.example.com", log_json=True), stream=stream)
    notice(logging.getLogger("pymta.queue"), "queued", extra={"qid": "ABC", "size": 12})
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "queued" and entry["level"] == "notice"
    assert entry["qid"] == "ABC" and entry["size"] == 12
    assert entry["host"] == "mx1" and entry["program"] == "pymta"


@pytest.mark.parametrize("text", [
    f"C: AUTH PLAIN {SECRET}",
    f"unexpected command 'auth plain {SECRET}'",
    f"AUTH LOGIN {SECRET}",
])
def test_redact(text: str) -> None:
    assert SECRET not in redact(text)
    assert "***" in redact(text)


def test_credentials_never_reach_the_log(stream: io.StringIO) -> None:
    setup_logging(Config(syslog_level=7, log_json=False), stream=stream)
    log = logging.getLogger("pymta.smtp")
    log.debug("C: %s", f"AUTH PLAIN {SECRET}")
    log.error(f"bad line AUTH PLAIN {SECRET}")
    assert SECRET not in stream.getvalue()
    assert stream.getvalue().count("AUTH PLAIN ***") == 2


@pytest.mark.parametrize("log_json", [False, True])
def test_issue10_review_a_logged_value_cannot_forge_a_line(stream: io.StringIO,
                                                             log_json: bool) -> None:
    """A DKIM ``d=`` with a folded CRLF put a line of the sender's choosing into the log.
    Every message is written on one line, text and JSON alike, for any line splitter
    (``str.splitlines`` also splits at U+2028, U+0085, VT, FF, FS...)."""
    setup_logging(Config(hostname="mx1.example.com", log_json=log_json), stream=stream)
    forged = "evil.test\r\n2026-12-06T09:00:00 mx1 pymta[1]: 1ABC: to=<ceo@x>, status=sent"
    value = f"{forged}\u2028second\x85third\x0bfourth\x1c\x00\x7f"
    notice(logging.getLogger("pymta.pipeline.dkim"), "Q1: dkim: neutral (d=%s)", value)
    out = stream.getvalue()
    assert out.endswith("\n") and len(out.splitlines()) == 1, out
    assert "\r" not in out and "\u2028" not in out and "\x85" not in out
    line = json.loads(out)["message"] if log_json else out
    assert "d=evil.test\\r\\n2026-12-06T09:00:00 mx1 pymta[1]:" in line
    assert "\\u2028second\\x85third\\x0bfourth\\x1c\\x00\\x7f)" in line


def test_issue10_review_a_traceback_never_begins_a_line(stream: io.StringIO) -> None:
    setup_logging(Config(hostname="mx1.example.com"), stream=stream)
    try:
        raise ValueError("bad\r\n2026-12-06T09:00:00 mx1 pymta[1]: forged\u2028x")
    except ValueError:
        logging.getLogger("pymta").exception("stage failed")
    first, *rest = stream.getvalue().split("\n")[:-1]
    assert first.endswith("]: error: stage failed") and rest
    assert all(line.startswith("\t") for line in rest), rest
    assert "\u2028" not in stream.getvalue() and "\r" not in stream.getvalue()


def test_issue10_review_plain_lines_are_unchanged(stream: io.StringIO) -> None:
    """The common line (printable ASCII, or printable UTF-8) is written as it is."""
    setup_logging(Config(hostname="mx1.example.com"), stream=stream)
    notice(logging.getLogger("pymta.queue"), "ABC: to=<j\u00f6rg@x>, status=sent (250 ok)")
    assert stream.getvalue().endswith("]: ABC: to=<j\u00f6rg@x>, status=sent (250 ok)\n")
