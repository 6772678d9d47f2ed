"""The sans-I/O engine on its own: bytes in, events and replies out (no sockets)."""

from __future__ import annotations

import time

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
def test_issue10_nul_next_to_dot_is_neither_the_end_nor_accepted(bad):
    """A NUL beside the dot does not end the message (the smuggled commands stay message
    text), and the message is refused at its real end, the session in step."""
    e = ready()
    drive(e, b"DATA\r\n")
    first, out = drive(e, b"a" + bad + b"MAIL FROM:<evil@x.test>\r\n")
    assert not any(isinstance(x, ev.DataEnd | ev.MailFrom) for x in first)
    events, out = drive(e, b".\r\nNOOP\r\n")
    assert not any(isinstance(x, ev.MailFrom) for x in events)
    assert b"\x00" not in body_of(first + events)
    (end,) = [x for x in events if isinstance(x, ev.DataEnd)]
    assert end.error is not None and (end.error.code, end.error.enhanced) == (554, "5.6.0")
    assert out == b"554 5.6.0 Error: message contains a NUL character\r\n250 2.0.0 Ok\r\n"
    assert not e.closed


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


# ---------------------------------------------------------------------------- issue 10


def fed_in_data(e: Engine, pieces) -> tuple[list, int]:
    events = []
    for piece in pieces:
        got, _ = drive(e, piece)
        events += got
    return events, sum(len(p) for p in pieces)


def test_issue10_defect2_crlf_run_is_passed_on_not_held():
    """A run of CRLF after a line is streamed on as it arrives: nothing but a possible start
    of the end marker (at most 4 bytes) is held, and what is held counts in ``buffered``."""
    e = ready(size_limit=0)
    drive(e, b"DATA\r\n")
    pieces = [b"x" + b"\r\n" * 300_000] + [b"\r\n"] * 50 + [b"\r\n."]
    events, fed = fed_in_data(e, pieces)
    assert not any(isinstance(x, ev.DataEnd) for x in events)
    assert e.buffered == 3                                    # "\r\n." may start the end
    assert len(body_of(events)) + e.buffered == fed           # every other byte passed on
    events, out = drive(e, b"\r\n")
    assert out == b"250 2.0.0 Ok: queued as X\r\n"


def test_issue10_defect2_crlf_run_then_tiny_reads_is_linear():
    """The reported attack: ``x`` and a long CRLF run, then two-byte reads. Each read must cost
    O(1), not a rescan of the run (it took ~80 ms per read on a 2 MB run before)."""
    e = ready(size_limit=1_000_000)
    drive(e, b"DATA\r\n")
    drive(e, b"x" + b"\r\n" * 1_000_000)
    start = time.process_time()
    for _ in range(100):
        drive(e, b"\r\n")
    spent = time.process_time() - start
    assert spent < 2.0, f"100 two-byte reads took {spent:.2f} s of CPU"
    _, out = drive(e, b".\r\n")
    assert out == b"552 5.3.4 Error: message file too big\r\n"


@pytest.mark.parametrize("unit", [b"\r\n", b"\r\n..", b"\r\n.x", b".\r\n", b"\r"])
def test_runs_of_line_ends_and_dots_cut_anywhere_give_the_same_message(unit):
    """Runs of line ends and dots, fed whole or byte by byte: the same message, or the
    same refusal (a bare CR), and never more than 4 bytes held."""
    data = b"Subject: runs\r\n\r\n" + unit * 500 + b"\r\n.\r\n"
    results = []
    for step in (len(data), 1, 3):
        e = ready()
        drive(e, b"DATA\r\n")
        events, out = [], b""
        for i in range(0, len(data), step):
            got, o = drive(e, data[i:i + step])
            events += got
            out += o
            assert e.closed or e.buffered <= 4
        # a refused message may have been passed on in part (the driver drops it)
        results.append((None if e.closed else body_of(events), out, e.closed))
    assert results[0] == results[1] == results[2]


def test_size_limit_applies_to_a_crlf_run():
    e = ready(size_limit=1000)
    drive(e, b"DATA\r\n")
    events, _ = drive(e, b"x" + b"\r\n" * 10_000)
    assert len(body_of(events)) <= 1000 and e.buffered <= 4
    _, out = drive(e, b".\r\nNOOP\r\n")
    assert out == b"552 5.3.4 Error: message file too big\r\n250 2.0.0 Ok\r\n"


@pytest.mark.parametrize("body", [b"a\x00b\r\n", b"\x00\r\n", b"ok\r\n" * 100 + b"\x00"])
def test_issue10_nul_in_data_is_refused_at_the_end(body):
    e = ready()
    drive(e, b"DATA\r\n")
    events, out = drive(e, body + b"\r\n.\r\nNOOP\r\n")
    assert b"\x00" not in body_of(events)
    assert out == b"554 5.6.0 Error: message contains a NUL character\r\n250 2.0.0 Ok\r\n"


def test_issue10_nul_in_bdat_is_refused_after_the_last_chunk():
    e = ready()
    events, out = drive(e, b"BDAT 5\r\na\x00b\r\nBDAT 4 LAST\r\nxy\r\nNOOP\r\n")
    assert b"\x00" not in body_of(events)
    assert out == (b"250 2.0.0 Ok: 5 octets received\r\n"
                   b"554 5.6.0 Error: message contains a NUL character\r\n250 2.0.0 Ok\r\n")


def test_issue10_defect8_recipient_overshoot_is_not_an_error():
    """Postfix's smtpd_recipient_overshoot_limit: 25 pipelined RCPTs against a limit of 3
    give 3 x 250 and 22 x 452, and the transaction goes on."""
    e = Engine(EngineConfig("mx.test", max_recipients=3))
    _, out = drive(e, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n"
                      + b"".join(b"RCPT TO:<r%d@y.test>\r\n" % i for i in range(25)))
    codes = [line[:3] for line in out.split(b"\r\n") if line[:3].isdigit()]
    assert codes.count(b"452") == 22 and b"421" not in codes and not e.closed
    _, out = drive(e, b"DATA\r\n")
    assert out.startswith(b"354")
    _, out = drive(e, b"hi\r\n.\r\n")
    assert out == b"250 2.0.0 Ok: queued as X\r\n"


def test_issue10_defect8_overshoot_beyond_its_limit_counts():
    e = Engine(EngineConfig("mx.test", max_recipients=1, recipient_overshoot_limit=5,
                            max_errors=10))
    _, out = drive(e, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<r@y.test>\r\n" * 30)
    lines = [line for line in out.split(b"\r\n") if line[:3].isdigit()]
    assert lines[-1].startswith(b"421 4.7.0") and e.closed
    # 1 accepted, 5 free overshoots, then 10 counted ones reach max_errors
    assert [line[:3] for line in lines].count(b"452") == 15


def test_issue10_defect8_overshoot_allowance_is_per_transaction():
    e = Engine(EngineConfig("mx.test", max_recipients=1, recipient_overshoot_limit=2,
                            max_errors=5))
    for _ in range(3):
        _, out = drive(e, b"MAIL FROM:<a@b.test>\r\n" if e.helo else
                       b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n")
        _, out = drive(e, b"RCPT TO:<r@y.test>\r\n" * 3 + b"RSET\r\n")
        assert not e.closed and b"421" not in out


def test_issue10_defect5_nothing_is_written_after_close():
    """close() while a decision is pending: its 421 is the last thing written; the late
    answer, a second close and anything else write nothing and raise nothing."""
    e = ready()
    drive(e, b"DATA\r\n")
    e.feed(b"hello\r\n.\r\n")
    events = []
    while (event := e.next_event()) not in (ev.NEED_DATA, ev.PAUSED):
        events.append(event)
    assert isinstance(events[-1], ev.DataEnd) and e.next_event() is ev.PAUSED
    e.take_output()
    e.close(Reply(421, "4.4.2", "mx.test Error: timeout exceeded"), "idle timeout")
    assert e.take_output() == b"421 4.4.2 mx.test Error: timeout exceeded\r\n"
    e.respond(Reply(250, "2.0.0", "Ok: queued as X"))      # the decision finished late
    e.respond(Reply(250, "2.0.0", "Ok"))                   # no decision at all: no raise
    e.close(Reply(421, "4.3.2", "shutting down"), "stop")
    e.greeting()
    e.tls_established()
    e.feed(b"NOOP\r\n")
    assert e.closed and e.take_output() == b""
    rest = []
    while (event := e.next_event()) is not ev.NEED_DATA:
        rest.append(event)
    assert all(isinstance(x, ev.Close) for x in rest)


def test_respond_without_pending_decision_raises_while_open():
    e = ready()
    with pytest.raises(RuntimeError):
        e.respond(OK)


def test_issue10_defect5_quit_then_driver_close_writes_nothing_more():
    e = ready()
    _, out = drive(e, b"QUIT\r\n")
    assert out == b"221 2.0.0 Bye\r\n"
    e.close(Reply(421, "4.4.2", "timeout"), "idle timeout")
    assert e.take_output() == b""


def mail_reply(cmd: bytes) -> bytes:
    e = Engine(EngineConfig("mx.test"))
    drive(e, b"EHLO c.test\r\n")
    _, out = drive(e, cmd + b"\r\n")
    return out


def rcpt_reply(rcpt: bytes, mail: bytes = b"MAIL FROM:<a@b.test> SMTPUTF8") -> bytes:
    e = Engine(EngineConfig("mx.test"))
    drive(e, b"EHLO c.test\r\n" + mail + b"\r\n")
    _, out = drive(e, rcpt + b"\r\n")
    return out


@pytest.mark.parametrize("cmd", [
    b"MAIL FROM:<\xff\xfe@sender.test> SMTPUTF8",
    b"MAIL FROM:<\xff\xfe@sender.test>",
    b"MAIL FROM:<a@sender.test> ENVID=\xff",
    b"MAIL FROM:<a@b\xc0\x80.test> SMTPUTF8",            # overlong encoding of NUL
    b"MAIL FROM:<a\xed\xa0\x80@b.test> SMTPUTF8",       # an encoded surrogate
    b"EHLO a\xffb",
    b"VRFY \xfe",
])
def test_issue10_defect6_command_that_is_not_utf8_is_refused(cmd):
    assert mail_reply(cmd) == b"500 5.5.2 Error: bad UTF-8 syntax\r\n"


@pytest.mark.parametrize("local", [
    "a\u2028b", "a\u2029b", "a\u0085b", "a\u202eb", "a\u2066b", "a\u200bb", "a\u00adb",
    "a\ue000b", "a\uffffb", "a\u0378b", "a\u00a0b", "a\u3000b", "a\x7fb", "a\x1bb",
    '"a\u2028b"', '"a\tb"', '"a\x00b"',
])
def test_issue10_defect6_unsafe_characters_in_local_part_are_refused(local):
    sender = f"MAIL FROM:<{local}@sender.test> SMTPUTF8".encode()
    assert mail_reply(sender) == b"501 5.1.7 Bad sender address syntax\r\n"
    rcpt = f"RCPT TO:<{local}@example.com>".encode()
    assert rcpt_reply(rcpt) == b"501 5.1.3 Bad recipient address syntax\r\n"


@pytest.mark.parametrize("path", [
    "a@b@example.com",            # '@' is not atext: found by the params fuzz target
    "@x:@@example.com",           # a source route to a local part of '@'
    '"a"b"@example.com',          # a bare DQUOTE inside the quoted string
    '"a\\"@example.com',          # the closing DQUOTE escaped: unterminated
])
def test_issue10_fuzz_malformed_local_part_is_refused(path):
    assert mail_reply(f"MAIL FROM:<{path}>".encode()) == b"501 5.1.7 Bad sender address syntax\r\n"
    assert rcpt_reply(f"RCPT TO:<{path}>".encode()) == (
        b"501 5.1.3 Bad recipient address syntax\r\n")


@pytest.mark.parametrize("domain", [
    "\uff45xample.com",           # full-width e: IDNA2008 disallows it (UTS 46 would map it)
    "exa\u00admple.com",          # soft hyphen: IDNA2003 silently drops it
    "b\u00fccher\u2028.de", "\u0301abc.de", "-b\u00fccher.de", "b\u00fccher-.de",
    "bu\u0308cher.de",            # not NFC
    "\u2603.example",             # a symbol (snowman)
    "a\u00b7b.example",           # CONTEXTO (middle dot), refused here
    "\u00fc" * 60 + ".de",        # A-label longer than 63 octets
])
def test_issue10_defect6_invalid_idna_domains_are_refused(domain):
    cmd = f"MAIL FROM:<a@{domain}> SMTPUTF8".encode()
    assert mail_reply(cmd) == b"501 5.1.7 Bad sender address syntax\r\n"


@pytest.mark.parametrize("address", [
    "j\u00f6rg@b\u00fccher.de", "\u7528\u6237@\u4f8b\u5b50.\u5e7f\u544a",
    "a@stra\u00dfe.de",
    "\u0438\u0432\u0430\u043d@\u043f\u0440\u0438\u043c\u0435\u0440.\u0440\u0444",
    "a@B\u00dcCHER.de", '"j\u00f6rg smith"@example.com', "a@xn--bcher-kva.de",
])
def test_valid_utf8_addresses_are_accepted(address):
    e = Engine(EngineConfig("mx.test"))
    events, out = drive(e, f"EHLO c\r\nMAIL FROM:<{address}> SMTPUTF8\r\n"
                           f"RCPT TO:<{address}>\r\n".encode())
    assert out.endswith(b"250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n"), out
    assert [x.address for x in events if isinstance(x, ev.MailFrom | ev.RcptTo)] == [address] * 2


def test_non_ascii_address_without_smtputf8_gets_553():
    assert mail_reply("MAIL FROM:<a\u2028b@b.test>".encode()) == (
        b"553 5.6.7 Error: SMTPUTF8 required for non-ASCII address\r\n")
    assert rcpt_reply("RCPT TO:<j\u00f6rg@example.com>".encode(),
                      mail=b"MAIL FROM:<a@b.test>").startswith(b"553 5.6.7")


@pytest.mark.parametrize("params", [
    b"ORCPT=rfc822;a+0Ab@x.test",          # decodes to a line feed
    b"ORCPT=rfc822;a+00b@x.test",          # decodes to NUL
    b"ORCPT=rfc822;a+E9b@x.test",          # decodes to an 8-bit octet
    b"ORCPT=rfc822;a+0ab@x.test",          # lower-case hexchar is not xtext
    b"ORCPT=x(y;a@x.test",                 # addr-type is not an atom
    b"ORCPT=;a@x.test", b"ORCPT=rfc822;", b"ORCPT=rfc822", b"ORCPT=",
    b"ORCPT=rfc822;a=b@x.test",            # "=" is not in an esmtp-value
    "ORCPT=rfc822;j\u00f6rg@x.test".encode(),
    "ORCPT=utf-8;j\u00f6rg@x.test".encode(),  # unitext needs SMTPUTF8
    b"ORCPT=utf-8;a\\x{0A}b@x.test",       # not a HEXPOINT
    b"ORCPT=utf-8;a\\x{01}b@x.test",       # a HEXPOINT, but a control
    b"ORCPT=utf-8;a\\x{D800}b@x.test",     # a surrogate
    b"ORCPT=utf-8;a+b@x.test",             # "+" is not a QCHAR
    b"ORCPT=rfc822;" + b"a" * 600,
    b"NOTIFY=SUCCESS\tORCPT=rfc822;a@b",    # only SP separates parameters
    "NOTIFY=\u017fuccess".encode(),         # long s upper-cases to S
    b"X\x01Y=1",
])
def test_issue10_defect6_bad_rcpt_parameters_are_refused(params):
    out = rcpt_reply(b"RCPT TO:<x@y.test> " + params, mail=b"MAIL FROM:<a@b.test>")
    assert out.startswith(b"501 5.5.4 "), out


@pytest.mark.parametrize("params", [
    b"ENVID=a+00b", b"ENVID=a+0D+0Ab", b"ENVID=", b"ENVID=a+FFb",
    b"AUTH=a+0D+0Ab@c.test", b"AUTH=", b"AUTH=a\x01b", b"AUTH=a+0ab",
    "SIZE=\u0661\u0662".encode(),          # Arabic-Indic digits are digits to str.isdigit
    "RET=HDR\u017f".encode(),               # long s upper-cases to S
    "ENVID=\u00e9".encode(), "BODY=8BITMIME\u2028".encode(),
    b"SIZE=1\x0bBODY=8BITMIME",
])
def test_issue10_defect6_bad_mail_parameters_are_refused(params):
    out = mail_reply(b"MAIL FROM:<a@b.test> SMTPUTF8 " + params)
    assert out.startswith(b"501 5.5.4 "), out


def test_issue10_defect6_good_parameters_accepted_and_orcpt_stored_7bit():
    e = Engine(EngineConfig("mx.test"))
    events, out = drive(e, "EHLO c\r\nMAIL FROM:<a@b.test> SMTPUTF8 AUTH=a+2Bb@c.test "
                           "ENVID=QQ+2B1\r\nRCPT TO:<x@y.test> ORCPT=utf-8;j\u00f6rg@x.test\r\n"
                           "RCPT TO:<z@y.test> ORCPT=rfc822;z+2Bq@y.test NOTIFY=NEVER\r\n"
                           "RCPT TO:<w@y.test> ORCPT=UTF-8;w\\x{E9}@y.test\r\n".encode())
    assert out.endswith(b"250 2.0.0 Ok\r\n" * 4), out
    mail = next(x for x in events if isinstance(x, ev.MailFrom))
    assert (mail.params.auth, mail.params.envid) == ("a+2Bb@c.test", "QQ+2B1")
    assert [x.params.orcpt for x in events if isinstance(x, ev.RcptTo)] == [
        "utf-8;j\\x{F6}rg@x.test", "rfc822;z+2Bq@y.test", "UTF-8;w\\x{E9}@y.test"]
    _, out = drive(Engine(EngineConfig("mx.test")), b"EHLO c\r\nMAIL FROM:<> AUTH=<>\r\n")
    assert out.endswith(b"250 2.0.0 Ok\r\n")


@pytest.mark.parametrize("name", [
    b"a\x01b", b"a\x7fb", "a\u2028b".encode(), "a\u0085b".encode(), "a\u202eb".encode(),
    b"a" * 256, "\u00e9".encode() * 128, b"a b", b"",
])
def test_issue10_defect6_helo_names_with_controls_or_too_long_are_refused(name):
    assert mail_reply(b"EHLO " + name) == b"501 5.5.4 Syntax: EHLO hostname\r\n"
    assert mail_reply(b"HELO " + name) == b"501 5.5.4 Syntax: HELO hostname\r\n"


@pytest.mark.parametrize("name", [b"a" * 255, b"[192.0.2.1]", b"evil.test;dkim=pass", b"x_y",
                                  "b\u00fccher.de".encode(), b"localhost"])
def test_helo_names_postfix_takes_are_taken(name):
    e = Engine(EngineConfig("mx.test"))
    events, out = drive(e, b"HELO " + name + b"\r\n")
    assert out == b"250 mx.test\r\n"
    assert [x.name for x in events if isinstance(x, ev.Helo)] == [name.decode()]


@pytest.mark.parametrize("size", ["\u0661\u0660".encode(), b"1\x0b", b"+5", b"5 \t"])
def test_issue10_defect6_bdat_size_must_be_ascii_digits(size):
    e = ready()
    events, out = drive(e, b"BDAT " + size + b"\r\n0123456789")
    assert out.startswith(b"501 5.5.4 Syntax: BDAT") and e.closed
    assert not any(isinstance(x, ev.DataChunk) for x in events)


def test_issue10_bare_lf_after_an_overlong_line_closes_however_the_stream_is_cut():
    """The rest of an over-long line is skipped but still checked: a bare LF there must not
    end the line and let the next command run, in one read or many."""
    data = b"NOOP " + b"a" * 300 + b"\nMAIL FROM:<x@evil.test>\r\n"
    for step in (len(data), 100, 1):
        e = Engine(EngineConfig("mx.test", max_line_length=100))
        drive(e, b"EHLO c\r\n")
        events, out = [], b""
        for i in range(0, len(data), step):
            got, o = drive(e, data[i:i + step])
            events, out = events + got, out + o
        assert e.closed and out.endswith(b"521 5.5.2 Error: bare <CR> or <LF> received; "
                                         b"closing connection\r\n"), (step, out)
        assert not any(isinstance(x, ev.MailFrom) for x in events)


def test_in_transaction_from_mail_until_the_end_of_data() -> None:
    """What draining (SIGTERM) lets finish: the transaction from MAIL to its last reply."""
    e = Engine(EngineConfig("mx.test"))
    drive(e, b"EHLO c.test\r\n")
    assert not e.in_transaction
    drive(e, b"MAIL FROM:<a@b.test>\r\nRCPT TO:<x@mx.test>\r\nDATA\r\n")
    assert e.in_transaction
    drive(e, b"half a message\r\n")
    assert e.in_transaction
    drive(e, b".\r\n")
    assert not e.in_transaction
    drive(e, b"MAIL FROM:<a@b.test>\r\nRSET\r\n")
    assert not e.in_transaction
