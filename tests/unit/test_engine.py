"""The sans-I/O engine on its own: bytes in, events and replies out (no sockets)."""

from __future__ import annotations

import pytest

from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.types import Reply

OK = Reply(250, "2.0.0", "Ok")


def drive(engine: Engine, data: bytes, *, accept: bool = True) -> tuple[list, bytes]:
    """Feed data, answer every decision (accepting unless told not to); return events, output."""
    engine.feed(data)
    seen = []
    while True:
        event = engine.next_event()
        if event is ev.NEED_DATA:
            break
        seen.append(event)
        if isinstance(event, ev.DataStart):
            engine.respond(Reply(354, "", "go") if not event.bdat else OK)
        elif isinstance(event, ev.DataEnd):
            engine.respond(event.error or Reply(250, "2.0.0", "Ok: queued as X"))
        elif isinstance(event, ev.MailFrom | ev.RcptTo):
            engine.respond(OK if accept else Reply(550, "5.1.1", "no"))
    return seen, engine.take_output()


def ready(**kw) -> Engine:
    e = Engine(EngineConfig("mx.test", **kw))
    drive(e, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\n")
    return e


def body_of(events) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, ev.DataChunk))


def test_dot_unstuffing_and_end_marker():
    e = ready()
    events, out = drive(e, b"DATA\r\n")
    assert out.startswith(b"354")
    events, out = drive(e, b"..leading dot\r\n..\r\n.x\r\nplain\r\n.\r\n")
    assert body_of(events) == b".leading dot\r\n.\r\nx\r\nplain\r\n"
    assert out == b"250 2.0.0 Ok: queued as X\r\n"


@pytest.mark.parametrize("split", [1, 2, 3, 5, 7])
def test_end_marker_split_across_reads(split):
    e = ready()
    drive(e, b"DATA\r\n")
    data = b"line one\r\n..two\r\n.\r\n"
    events = []
    for i in range(0, len(data), split):
        got, _ = drive(e, data[i:i + split])
        events += got
    assert body_of(events) == b"line one\r\n.two\r\n"
    assert any(isinstance(x, ev.DataEnd) for x in events)


@pytest.mark.parametrize("bad", [
    b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r",
])
def test_malformed_end_of_data_is_never_the_end(bad):
    e = ready()
    drive(e, b"DATA\r\n")
    events, out = drive(e, b"Subject: x\r\n\r\nbody" + bad + b"MAIL FROM:<evil@x.test>\r\n")
    assert not any(isinstance(x, ev.DataEnd | ev.MailFrom) for x in events)
    assert out.startswith(b"521 5.5.2")
    assert e.closed


@pytest.mark.parametrize("bad", [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"])
def test_nul_next_to_dot_is_data(bad):
    e = ready()
    drive(e, b"DATA\r\n")
    first, out = drive(e, b"a" + bad + b"MAIL FROM:<evil@x.test>\r\n")
    assert not any(isinstance(x, ev.DataEnd | ev.MailFrom) for x in first)
    events, out = drive(e, b".\r\n")
    assert b"MAIL FROM:<evil@x.test>" in body_of(first + events)
    assert out.startswith(b"250")


def test_bare_lf_in_command_closes():
    e = Engine(EngineConfig("mx.test"))
    events, out = drive(e, b"EHLO x\nMAIL FROM:<a@b.test>\r\n")
    assert out.startswith(b"521 5.5.2") and e.closed
    assert not any(isinstance(x, ev.MailFrom) for x in events)


def test_data_before_354_is_refused():
    e = ready()
    events, out = drive(e, b"DATA\r\nSubject: early\r\n\r\nhi\r\n.\r\n")
    assert b"554 5.5.0" in out and e.closed
    assert not any(isinstance(x, ev.DataChunk) for x in events)


def test_pipelined_replies_come_in_one_batch_in_order():
    e = Engine(EngineConfig("mx.test"))
    e.greeting()
    e.take_output()
    events, out = drive(e, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n"
                           b"RCPT TO:<bad>\r\nNOOP\r\n")
    lines = [ln for ln in out.split(b"\r\n") if ln]
    assert lines[-4:] == [b"250 2.0.0 Ok", b"250 2.0.0 Ok", b"501 5.1.3 Bad recipient address "
                          b"syntax", b"250 2.0.0 Ok"]


def test_size_enforced_while_streaming():
    e = ready(size_limit=100)
    drive(e, b"DATA\r\n")
    events, out = drive(e, b"x" * 98 + b"\r\n" + b"y" * 200 + b"\r\n.\r\n")
    assert out.startswith(b"552 5.3.4")
    assert len(body_of(events)) <= 100


def test_mail_size_parameter_over_limit():
    e = Engine(EngineConfig("mx.test", size_limit=1000))
    _, out = drive(e, b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=5000\r\n")
    assert b"552 5.3.4" in out


def test_bdat_chunks_are_raw_and_counted():
    e = ready()
    events, out = drive(e, b"BDAT 7\r\n.a\r\nb\r\nBDAT 6 LAST\r\nQUIT\r\n")
    assert body_of(events) == b".a\r\nb\r\nQUIT\r\n"
    assert out.splitlines()[0].startswith(b"250 2.0.0 Ok: 7 octets")
    assert b"queued as X" in out


def test_bdat_without_transaction_still_consumes_chunk():
    e = Engine(EngineConfig("mx.test"))
    events, out = drive(e, b"EHLO c\r\nBDAT 22 LAST\r\nMAIL FROM:<e@x.test>\r\n")
    assert not any(isinstance(x, ev.MailFrom) for x in events)
    assert b"503 5.5.1" in out


def test_bdat_bare_lf_refused_at_last():
    e = ready()
    events, out = drive(e, b"BDAT 5 LAST\r\na\nb\r\n")
    assert b"554 5.6.0" in out


def test_starttls_discards_pipelined_plaintext():
    e = Engine(EngineConfig("mx.test", tls_available=True))
    events, out = drive(e, b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x.test>\r\n")
    assert any(isinstance(x, ev.StartTLS) for x in events)
    assert not any(isinstance(x, ev.MailFrom) for x in events)
    e.feed(b"RCPT TO:<more@x.test>\r\n")          # arrives before the handshake
    e.tls_established()
    events, out = drive(e, b"MAIL FROM:<a@b.test>\r\n")
    assert b"503 5.5.1" in out                      # EHLO required again
    events, out = drive(e, b"EHLO c\r\n")
    assert b"STARTTLS" not in out


def test_too_many_errors_disconnects():
    e = Engine(EngineConfig("mx.test", max_errors=3))
    _, out = drive(e, b"FOO\r\nBAR\r\nBAZ\r\nNOOP\r\n")
    assert b"421 4.7.0" in out and e.closed
    assert not out.endswith(b"250 2.0.0 Ok\r\n")


def test_recipient_limit():
    e = Engine(EngineConfig("mx.test", max_recipients=2))
    _, out = drive(e, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<x@y.test>\r\n" * 3)
    assert out.rstrip().endswith(b"452 4.5.3 Error: too many recipients")


def test_long_command_line_refused():
    e = Engine(EngineConfig("mx.test", max_line_length=100))
    _, out = drive(e, b"EHLO " + b"a" * 200 + b"\r\nNOOP\r\n")
    assert b"500 5.5.2 Error: line too long" in out
    assert out.rstrip().endswith(b"250 2.0.0 Ok")


def test_every_reply_after_ehlo_has_an_enhanced_code():
    e = Engine(EngineConfig("mx.test"))
    _, out = drive(e, b"EHLO c\r\nNOOP\r\nVRFY x\r\nHELP\r\nRSET\r\nXYZZY\r\nMAIL FROM:<>\r\n"
                      b"RCPT TO:<postmaster>\r\nQUIT\r\n")
    after_ehlo = out.split(b"250 CHUNKING\r\n", 1)[1]
    for line in after_ehlo.splitlines():
        code, enhanced = line[:3], line[4:].split(b" ", 1)[0]
        assert enhanced[:1] == code[:1] and enhanced.count(b".") == 2, line


def test_utf8_address_requires_smtputf8():
    e = Engine(EngineConfig("mx.test"))
    _, out = drive(e, "EHLO c\r\nMAIL FROM:<jörg@b.test>\r\n".encode())
    assert b"553 5.6.7" in out
    _, out = drive(e, "MAIL FROM:<jörg@b.test> SMTPUTF8\r\n".encode())
    assert out.startswith(b"250")


def test_dsn_parameters_parsed():
    e = Engine(EngineConfig("mx.test"))
    events, _ = drive(e, b"EHLO c\r\nMAIL FROM:<a@b.test> RET=HDRS ENVID=abc+2B1\r\n"
                         b"RCPT TO:<x@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x@y.test\r\n")
    mail = next(x for x in events if isinstance(x, ev.MailFrom))
    rcpt = next(x for x in events if isinstance(x, ev.RcptTo))
    assert (mail.params.ret, mail.params.envid) == ("HDRS", "abc+2B1")
    assert (rcpt.params.notify, rcpt.params.orcpt) == ("SUCCESS,FAILURE", "rfc822;x@y.test")
    _, out = drive(e, b"RCPT TO:<z@y.test> NOTIFY=NEVER,SUCCESS\r\n")
    assert b"501 5.5.4" in out
