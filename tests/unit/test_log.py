"""setup_logging: Postfix-style lines, SYSLOG_LEVEL thresholds, JSON lines, and the filter
that keeps SASL credentials out of every log."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from pymta.config.errors import ConfigError
from pymta.config.load import load_config
from pymta.config.model import Config
from pymta.log import NOTICE, PostfixFormatter, notice, python_level, redact, setup_logging

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
    """RFC 3339 time with microseconds and offset (what pflogsumm 1.1.5 reads), the host,
    ``postfix/DAEMON[PID]:``, Postfix's ``warning:``."""
    setup_logging(Config(hostname="mx1.example.com"), stream=stream)
    notice(logging.getLogger("pymta.queue"), "%s: to=<%s>, status=sent", "ABC", "bob@x")
    logging.getLogger("pymta").warning("disk almost full")
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}[+-]\d\d:\d\d mx1 "
                        r"postfix/qmgr\[\d+\]: ABC: to=<bob@x>, status=sent", lines[0]), lines[0]
    assert re.search(r" postfix/master\[\d+\]: warning: disk almost full$", lines[1]), lines[1]


@pytest.mark.parametrize(("logger", "service"), [
    ("pymta.smtpd", "smtpd"), ("pymta.cleanup", "cleanup"), ("pymta.pipeline.dkim", "cleanup"),
    ("pymta.queue", "qmgr"), ("pymta.delivery.relay", "smtp"), ("pymta.delivery.lmtp", "lmtp"),
    ("pymta.delivery.local", "local"), ("pymta", "master"), ("pymta.ldap", "master"),
    ("asyncio", "pymta"),
])
def test_each_logger_writes_as_its_postfix_daemon(stream: io.StringIO, logger: str,
                                                  service: str) -> None:
    setup_logging(Config(), stream=stream)
    logging.getLogger(logger).warning("x")
    assert f" postfix/{service}[" in stream.getvalue(), stream.getvalue()


def test_syslog_name_and_a_records_own_service(stream: io.StringIO) -> None:
    """PYMTA_SYSLOG_NAME is Postfix's syslog_name; ``extra={"service": ...}`` wins over the
    logger's daemon (the delivery lines name their agent)."""
    setup_logging(Config(syslog_name="postfix-in"), stream=stream)
    notice(logging.getLogger("pymta.delivery"), "Q: to=<a@b>", extra={"service": "lmtp"})
    assert re.search(r" postfix-in/lmtp\[\d+\]: Q: to=<a@b>$", stream.getvalue()), \
        stream.getvalue()


def test_syslog_lines_have_the_tag_but_no_time_or_host() -> None:
    record = logging.LogRecord("pymta.smtpd", logging.INFO, __file__, 1, "connect from %s",
                               ("unknown[192.0.2.1]",), None)
    line = PostfixFormatter("mx1", with_time_and_host=False).format(record)
    assert line == f"postfix/smtpd[{record.process}]: connect from unknown[192.0.2.1]"


def test_time_stamps_follow_the_clock() -> None:
    """The date part is cached per second: records in the next second get the next time."""
    formatter = PostfixFormatter("mx1")
    stamps = []
    for created in (1_700_000_000.25, 1_700_000_000.75, 1_700_000_001.5):
        record = logging.LogRecord("pymta", logging.INFO, __file__, 1, "m", None, None)
        record.created = created
        stamps.append(formatter.format(record).split(" ", 1)[0])
    assert [s[17:26] for s in stamps] == ["20.250000", "20.750000", "21.500000"], stamps


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


@pytest.mark.parametrize("config", [Config(hostname="mx1.example.com", log_format="json"),
                                    Config(hostname="mx1.example.com", log_json=True)])
def test_json_lines(stream: io.StringIO, config: Config) -> None:
    """PYMTA_LOG_FORMAT=json, or the older PYMTA_LOG_JSON=yes: one object per line, the
    extra fields as keys, a dict of them (deliverylog's ``mta_event``) flattened."""
    setup_logging(config, stream=stream)
    notice(logging.getLogger("pymta.queue"), "queued", extra={"qid": "ABC", "size": 12})
    notice(logging.getLogger("pymta.delivery"), "ABC: to=<b@x>", extra={
        "service": "local", "mta_event": {"qid": "ABC", "to": "b@x", "status": "sent"}})
    entry, delivered = map(json.loads, stream.getvalue().splitlines())
    assert entry["message"] == "queued" and entry["level"] == "notice"
    assert entry["qid"] == "ABC" and entry["size"] == 12
    assert entry["host"] == "mx1" and entry["program"] == "postfix/qmgr"
    assert (delivered["program"], delivered["to"], delivered["status"]) == \
        ("postfix/local", "b@x", "sent")
    assert "mta_event" not in delivered and "service" not in delivered


def test_log_format_postfix_wins_over_the_old_json_switch(stream: io.StringIO) -> None:
    setup_logging(Config(log_format="postfix", log_json=True), stream=stream)
    logging.getLogger("pymta").warning("plain")
    assert stream.getvalue().rstrip().endswith("]: warning: plain")


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
    forged = ("evil.test\r\n2026-12-06T09:00:00.000000+00:00 mx1 postfix/local[1]: 1ABC: "
              "to=<ceo@x>, status=sent")
    value = f"{forged}\u2028second\x85third\x0bfourth\x1c\x00\x7f"
    notice(logging.getLogger("pymta.pipeline.dkim"), "Q1: dkim: neutral (d=%s)", value)
    out = stream.getvalue()
    assert out.endswith("\n") and len(out.splitlines()) == 1, out
    assert "\r" not in out and "\u2028" not in out and "\x85" not in out
    line = json.loads(out)["message"] if log_json else out
    assert "d=evil.test\\r\\n2026-12-06T09:00:00.000000+00:00 mx1 postfix/local[1]:" in line
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


@pytest.mark.parametrize(("env", "field", "value"), [
    ({}, "syslog_name", "postfix"),
    ({"PYMTA_SYSLOG_NAME": "postfix/submission"}, "syslog_name", "postfix/submission"),
    ({"PYMTA_LOG_FORMAT": "JSON"}, "log_format", "json"),
    ({"PYMTA_LOG_FORMAT": "postfix", "PYMTA_LOG_JSON": "yes"}, "log_format", "postfix"),
])
def test_settings(env: dict[str, str], field: str, value: str) -> None:
    assert getattr(load_config({"MAIL_DOMAIN": "example.com", **env}), field) == value


@pytest.mark.parametrize(("env", "start"), [
    ({"PYMTA_LOG_FORMAT": "syslog"}, "PYMTA_LOG_FORMAT: not one of postfix, json"),
    ({"PYMTA_SYSLOG_NAME": "post fix"}, "PYMTA_SYSLOG_NAME: "),
    ({"PYMTA_SYSLOG_NAME": "postfix[1]:"}, "PYMTA_SYSLOG_NAME: "),
    ({"PYMTA_SYSLOG_NAME": "/postfix"}, "PYMTA_SYSLOG_NAME: "),
])
def test_bad_settings_name_their_variable(env: dict[str, str], start: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"MAIL_DOMAIN": "example.com", **env})
    assert str(info.value).startswith(start), info.value
