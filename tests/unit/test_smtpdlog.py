"""The receiving side's Postfix lines: the engine's command counts, the disconnect line's
wording, reject lines, the message-id line (pymta.receiving.smtpdlog)."""

from __future__ import annotations

import logging

import pytest

from pymta.receiving import smtpdlog
from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.types import Reply

RCPT_OK = Reply(250, "2.1.5", "Ok")


def drive(engine: Engine, data: bytes, rcpt: Reply = RCPT_OK) -> bytes:
    """Feed ``data``; MAIL is accepted, each RCPT answered ``rcpt``, DATA and its end 354/250."""
    engine.feed(data)
    while (event := engine.next_event()) is not ev.NEED_DATA:
        if isinstance(event, ev.MailFrom):
            engine.respond(Reply(250, "2.1.0", "Ok"))
        elif isinstance(event, ev.RcptTo):
            engine.respond(rcpt)
        elif isinstance(event, ev.DataStart):
            engine.respond(Reply(354, "", "go"))
        elif isinstance(event, ev.DataEnd):
            engine.respond(Reply(250, "2.0.0", "Ok: queued as Q"))
    return engine.take_output()


def test_a_clean_session_counts_like_postfix() -> None:
    engine = Engine(EngineConfig("mx.test"))
    drive(engine, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n")
    drive(engine, b"Subject: s\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert smtpdlog.command_stats(engine.stats) == \
        " ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5"


def test_failures_show_as_ok_over_total_and_unknown_comes_last() -> None:
    engine = Engine(EngineConfig("mx.test"))
    drive(engine, b"FOO\r\nEHLO c.test\r\nNOOP\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\n"
                  b"RCPT TO:<y@mx.test>\r\nRSET\r\nDATA\r\n",
          rcpt=Reply(550, "5.1.1", "no"))
    assert engine.where == "DATA"
    assert smtpdlog.command_stats(engine.stats) == \
        " ehlo=1 mail=1 rcpt=0/2 data=0/1 rset=1 noop=1 unknown=0/1 commands=4/8"


def test_text_before_the_354_is_a_failed_data() -> None:
    """Message text in the DATA command's read: Postfix's ``improper command pipelining``,
    counted as a DATA that failed."""
    engine = Engine(EngineConfig("mx.test"))
    drive(engine, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n"
                  b"Subject: s\r\n\r\nbody\r\n.\r\n")
    assert engine.closed and engine.where == "DATA"
    assert smtpdlog.command_stats(engine.stats) == " ehlo=1 mail=1 rcpt=1 data=0/1 commands=3/4"


def test_no_command_is_commands_0_over_0_and_where_is_connect() -> None:
    engine = Engine(EngineConfig("mx.test"))
    assert engine.where == "CONNECT"
    assert smtpdlog.command_stats(engine.stats) == " commands=0/0"


def test_where_after_a_message_and_inside_one() -> None:
    engine = Engine(EngineConfig("mx.test"))
    drive(engine, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n")
    drive(engine, b"x\r\n.\r\n")
    assert engine.where == "END-OF-MESSAGE"
    drive(engine, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n")
    drive(engine, b"0123456789")
    assert smtpdlog.after(engine.where, engine.data_bytes) == "DATA (10 bytes)"
    assert smtpdlog.after("RCPT", 0) == "RCPT"


def test_reject_line_is_postfix_s(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    reply = Reply(550, "5.1.1", "<x@y.test>: Recipient address rejected: User unknown in "
                                "virtual mailbox table")
    smtpdlog.reject(None, "RCPT", "unknown", "192.0.2.1", reply, sender="s@a.test",
                    rcpt="x@y.test", proto="ESMTP", helo="h.test")
    smtpdlog.reject("Q1", "END-OF-MESSAGE", "mx.a.test", "192.0.2.2",
                    Reply(554, "5.7.1", "rejected"), sender="", rcpt=None, proto="SMTP",
                    helo="", verdict="discard", reason="spam")
    assert [r.getMessage() for r in caplog.records] == [
        "NOQUEUE: reject: RCPT from unknown[192.0.2.1]: 550 5.1.1 <x@y.test>: Recipient "
        "address rejected: User unknown in virtual mailbox table; from=<s@a.test> "
        "to=<x@y.test> proto=ESMTP helo=<h.test>",
        "Q1: discard: END-OF-MESSAGE from mx.a.test[192.0.2.2]: 554 5.7.1 rejected; from=<> "
        "proto=SMTP helo=<> (spam)"]


@pytest.mark.parametrize(("head", "logged"), [
    (b"Subject: s\r\nMessage-Id:  <a@b.test> \r\n\r\n", "<a@b.test>"),
    (b"message-id:a@b.test\r\n\r\n", "<a@b.test>"),
    (b"Subject: s\r\n\r\nMessage-ID: <in-the-body@x>\r\n", "<>"),    # the body is not read
    (b"X-Message-ID: <not-it@x>\r\n\r\n", "<>"),
])
def test_message_id_line(caplog: pytest.LogCaptureFixture, head: bytes, logged: str) -> None:
    caplog.set_level(logging.INFO)
    smtpdlog.message_id("Q1", [head[:7], head[7:]])    # the session keeps it in reads
    [record] = caplog.records
    assert (record.name, record.getMessage()) == ("pymta.cleanup", f"Q1: message-id={logged}")


def test_message_id_is_not_searched_below_the_level(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    smtpdlog.message_id("Q1", [b"Message-ID: <a@b>\r\n\r\n"])
    assert caplog.records == []
