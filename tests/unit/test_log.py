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
