"""REQUIRETLS and ``TLS-Required: No`` on the receiving and queue side (RFC 8689, issue 15):
the engine offers and takes REQUIRETLS only under TLS, the header scan notes ``TLS-Required:
No`` however the bytes arrive, both flags round-trip through the envelope codec and both queue
stores, and a REQUIRETLS message's reports return headers only and go back with REQUIRETLS."""

from __future__ import annotations

import email
import email.policy
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.queue import codec
from pymta.queue.dsn import DsnEntry, build_dsn
from pymta.queue.sqlstore import SqliteQueueStore
from pymta.queue.store import QueueStore
from pymta.receiving.headerscan import TLS_VALUE_MAX, HeaderScanner
from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.smtp.params import ParamError, parse_mail_params
from pymta.types import Envelope, Recipient, Reply
from tests.unit.test_manager import REJECT, Agent, always, make, parse, put

OK = Reply(250, "2.0.0", "Ok")


def drive(engine: Engine, data: bytes) -> tuple[list[ev.Event], bytes]:
    """Feed ``data``, accept every decision; the events and the replies written."""
    engine.feed(data)
    seen: list[ev.Event] = []
    while True:
        event = engine.next_event()
        if event is ev.NEED_DATA:
            break
        assert isinstance(event, ev.Event)
        seen.append(event)
        if isinstance(event, ev.MailFrom | ev.RcptTo):
            engine.respond(OK)
    return seen, engine.take_output()


def ehlo_keywords(reply: bytes) -> list[str]:
    return [line[4:].split(" ")[0] for line in reply.decode().splitlines()[1:]]


# ------------------------------------------------------------------------------ the engine


def test_issue15_requiretls_advertised_only_on_a_tls_session() -> None:
    plain = Engine(EngineConfig("mx.test", tls_available=True))
    _, out = drive(plain, b"EHLO c.test\r\n")
    assert "STARTTLS" in ehlo_keywords(out) and "REQUIRETLS" not in ehlo_keywords(out)
    # after STARTTLS: the new EHLO offers it (and no STARTTLS)
    drive(plain, b"STARTTLS\r\n")
    plain.tls_established()
    _, out = drive(plain, b"EHLO c.test\r\n")
    assert "REQUIRETLS" in ehlo_keywords(out) and "STARTTLS" not in ehlo_keywords(out)
    assert out.endswith(b"250 CHUNKING\r\n")
    # implicit TLS (port 465): offered from the first EHLO
    implicit = Engine(EngineConfig("mx.test", tls_available=True, tls_active=True))
    assert "REQUIRETLS" in ehlo_keywords(drive(implicit, b"EHLO c.test\r\n")[1])
    # HELO lists no extensions at all
    assert drive(implicit, b"HELO c.test\r\n")[1] == b"250 mx.test\r\n"


def test_issue15_requiretls_taken_under_tls_and_reaches_the_session() -> None:
    e = Engine(EngineConfig("mx.test", tls_available=True, tls_active=True))
    events, out = drive(e, b"EHLO c.test\r\nMAIL FROM:<a@b.test> requiretls SMTPUTF8\r\n")
    (mail,) = [x for x in events if isinstance(x, ev.MailFrom)]
    assert mail.params.requiretls and mail.params.smtputf8
    assert out.endswith(b"250 2.0.0 Ok\r\n")
    events, _ = drive(e, b"RSET\r\nMAIL FROM:<a@b.test>\r\n")
    (mail,) = [x for x in events if isinstance(x, ev.MailFrom)]
    assert not mail.params.requiretls


@pytest.mark.parametrize(("tls_available", "reply"), [
    (True, b"530 5.7.0 Must issue a STARTTLS command first\r\n"),
    (False, b"555 5.5.4 Unsupported option: REQUIRETLS needs TLS\r\n"),
])
def test_issue15_requiretls_refused_in_cleartext(tls_available: bool, reply: bytes) -> None:
    e = Engine(EngineConfig("mx.test", tls_available=tls_available))
    events, out = drive(e, b"EHLO c.test\r\nMAIL FROM:<a@b.test> REQUIRETLS\r\n"
                           b"RCPT TO:<x@mx.test>\r\nMAIL FROM:<a@b.test>\r\n")
    assert not any(isinstance(x, ev.RcptTo) for x in events)
    assert [x.params.requiretls for x in events if isinstance(x, ev.MailFrom)] == [False]
    assert reply in out
    assert b"503 5.5.1 Error: need MAIL command\r\n" in out    # the refused MAIL began nothing
    assert out.endswith(b"250 2.0.0 Ok\r\n") and not e.closed


@pytest.mark.parametrize(("params", "reply"), [
    ("REQUIRETLS REQUIRETLS", "501 5.5.4 Duplicate REQUIRETLS parameter"),
    ("REQUIRETLS requireTLS", "501 5.5.4 Duplicate REQUIRETLS parameter"),
    ("REQUIRETLS=yes", "501 5.5.4 REQUIRETLS takes no value"),
    ("REQUIRETLS=", "501 5.5.4 Syntax error in parameters or arguments"),
])
def test_issue15_requiretls_malformed_is_refused(params: str, reply: str) -> None:
    with pytest.raises(ParamError) as info:
        parse_mail_params(params, size_limit=0)
    assert str(info.value.reply) == reply
    for tls in (True, False):       # the syntax is checked first, on either session
        e = Engine(EngineConfig("mx.test", tls_available=True, tls_active=tls))
        _, out = drive(e, f"EHLO c\r\nMAIL FROM:<a@b.test> {params}\r\n".encode())
        assert out.endswith(reply.encode() + b"\r\n")


# ------------------------------------------------------------------------ TLS-Required: No


def scan(data: bytes, cuts: list[int] | None = None) -> HeaderScanner:
    scanner = HeaderScanner(1 << 20)
    pos = 0
    for cut in sorted(set(cuts or [])):
        scanner.feed(data[pos:cut])
        pos = max(pos, cut)
    if pos < len(data):
        scanner.feed(data[pos:])
    return scanner


@pytest.mark.parametrize(("header", "no"), [
    (b"TLS-Required: No\r\n", True),
    (b"tls-required:no\r\n", True),
    (b"TLS-REQUIRED :  NO \t\r\n", True),
    (b"TLS-Required:\r\n No\r\n", True),                       # folded
    (b"Subject: x\r\nTLS-Required: No\r\nTo: <a@b>\r\n", True),
    (b"TLS-Required: No\r\nTLS-Required: no\r\n", True),
    (b"TLS-Required: Yes\r\n", False),
    (b"TLS-Required: No thanks\r\n", False),
    (b"TLS-Required: N\r\n o\r\n", False),                     # unfolds to "N o"
    (b"TLS-Required: No\r\nTLS-Required: maybe\r\n", False),   # another value cancels it
    (b"TLS-Required:" + b" " * 100 + b"No\r\n", False),       # longer than any "No"
    (b"TLS-Required-X: No\r\n", False),
    (b"X-TLS-Required: No\r\n", False),
    (b"Subject: x\r\n TLS-Required: No\r\n", False),           # a continuation of Subject
    (b"Subject: x\r\n\r\nTLS-Required: No\r\n", False),        # in the body
    (b"Subject: x\r\nnot a field\r\nTLS-Required: No\r\n", False),   # after the header
])
def test_issue15_tls_required_no_in_the_header_section(header: bytes, no: bool) -> None:
    data = header + b"\r\nbody\r\n"
    assert scan(data).tls_required_no is no
    for cut in range(1, len(data)):     # the same answer however the bytes are cut
        assert scan(data, [cut]).tls_required_no is no, cut
    assert scan(data, list(range(len(data)))).tls_required_no is no     # byte by byte


def test_issue15_tls_required_no_as_the_last_bytes_of_a_message() -> None:
    """BDAT may end a message without a final CRLF, even inside the header section."""
    assert scan(b"Subject: x\r\nTLS-Required: No").tls_required_no
    assert not scan(b"Subject: x\r\nTLS-Required: Nope").tls_required_no


def test_issue15_tls_required_value_kept_is_bounded() -> None:
    scanner = HeaderScanner(1 << 20)
    scanner.feed(b"TLS-Required: ")
    for _ in range(1000):
        scanner.feed(b"x" * 100)
        assert len(scanner._tls_value or b"") <= TLS_VALUE_MAX + 1
    scanner.feed(b"\r\n\r\n")
    assert scanner.done and not scanner.tls_required_no


NAMES = st.sampled_from([b"TLS-Required", b"tls-required", b"TLS-Requ", b"TLS-Required-X",
                         b"Received", b"Subject", b"TLS-Required "])
VALUES = st.sampled_from([b" No", b"no", b" Yes", b"\r\n No", b" N", b"", b" No  "])


@settings(max_examples=300, deadline=None)
@given(fields=st.lists(st.tuples(NAMES, VALUES), max_size=6),
       cuts=st.lists(st.integers(0, 200)))
def test_issue15_tls_required_answer_does_not_depend_on_read_sizes(
        fields: list[tuple[bytes, bytes]], cuts: list[int]) -> None:
    data = b"".join(name + b":" + value + b"\r\n" for name, value in fields) + b"\r\nbody"
    whole = scan(data)
    pieces = scan(data, cuts)
    assert pieces.tls_required_no is whole.tls_required_no
    assert pieces.received == whole.received
    assert len(pieces._partial) <= 10
    values = [v.replace(b"\r\n", b"").strip().lower() for n, v in fields
              if n.strip().lower() == b"tls-required"]
    assert whole.tls_required_no is (bool(values) and all(v == b"no" for v in values))


# ------------------------------------------------------------------------------ persistence


def envelope(**kw: object) -> Envelope:
    now = time.time()
    return Envelope(sender="a@example.org",
                    recipients=[Recipient("b@example.net", "b@example.net", local=False)],
                    received_at=now, next_attempt=now, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("flags", [{}, {"requiretls": True}, {"tls_optional": True}])
def test_issue15_requiretls_flags_round_trip_through_the_codec(flags: dict[str, bool]) -> None:
    env = envelope(**flags)
    assert codec.decode(codec.encode(env)) == env
    doc = json.loads(codec.encode(env))
    assert doc["requiretls"] is env.requiretls and doc["tls_optional"] is env.tls_optional


def test_issue15_requiretls_flags_absent_from_older_envelopes_are_false() -> None:
    doc = json.loads(codec.encode(envelope(requiretls=True, tls_optional=True)))
    del doc["requiretls"], doc["tls_optional"]
    old = codec.decode(json.dumps(doc).encode())
    assert not old.requiretls and not old.tls_optional
    doc["requiretls"] = "yes"
    with pytest.raises(codec.CodecError):
        codec.decode(json.dumps(doc).encode())


@pytest.mark.parametrize("store_class", [QueueStore, SqliteQueueStore], ids=["files", "sqlite"])
async def test_issue15_requiretls_flags_survive_a_store_reopened(store_class: type,
                                                                 tmp_path: Path) -> None:
    store = store_class(tmp_path / "queue")
    store.open()
    await store.start()
    try:
        tagged = await store.enqueue_bytes(envelope(requiretls=True), b"Subject: a\r\n\r\nx\r\n")
        relaxed = await store.enqueue_bytes(envelope(tls_optional=True), b"Subject: b\r\n\r\n")
    finally:
        await store.aclose()
    again = store_class(tmp_path / "queue")
    again.open()
    await again.start()
    try:
        first, second = again.load(tagged), again.load(relaxed)
        assert first is not None and first.requiretls and not first.tls_optional
        assert second is not None and second.tls_optional and not second.requiretls
    finally:
        await again.aclose()


# ----------------------------------------------------------------------------------- DSNs

ORIGINAL = (b"Received: from client.example ([192.0.2.9])\r\n"
            b"From: alice@example.org\r\nSubject: secret plans\r\n\r\n"
            b"SECRET-BODY-MARKER\r\n")


@pytest.mark.parametrize("ret", [None, "FULL", "HDRS"])
def test_issue15_requiretls_failure_report_returns_headers_only(tmp_path: Path,
                                                                ret: str | None) -> None:
    """RFC 8689 §5: as if RET=HDRS was given; RET=FULL is disregarded."""
    path = tmp_path / "body"
    path.write_bytes(ORIGINAL)
    rcpt = Recipient("bob@example.net", "bob@example.net", local=False)
    entry = DsnEntry(rcpt, "failed", "5.7.30", Reply(550, "5.7.30", "REQUIRETLS not offered"))
    for requiretls, full in ((True, False), (False, ret != "HDRS")):
        env = envelope(ret=ret, requiretls=requiretls)
        data = build_dsn(reporting_mta="mta.example.org", qid="Q1", envelope=env,
                         entries=[entry], body_path=str(path), now=time.time(),
                         action_kind="failed")
        returned = email.message_from_bytes(data, policy=email.policy.default).get_payload()[2]
        assert returned.get_content_type() == ("message/rfc822" if full
                                               else "text/rfc822-headers")
        assert (b"SECRET-BODY-MARKER" in data) is full
        assert b"Subject: secret plans" in data


async def test_issue15_requiretls_report_is_queued_with_requiretls(tmp_path: Path) -> None:
    mgr, store, clock = make(tmp_path, Agent(always(REJECT)))
    tagged = await put(store, clock, ret="FULL", requiretls=True)
    await mgr.run_once_due()
    (dsn_qid,) = [q for q in store.ids() if q != tagged]
    dsn = store.load(dsn_qid)
    assert dsn is not None and dsn.sender == "" and dsn.is_bounce and dsn.requiretls
    assert parse(store.body(dsn_qid)).get_payload()[2].get_content_type() == \
        "text/rfc822-headers"
    # an untagged message's report is not tagged, and TLS-Required: No stays with its message
    (tmp_path / "plain").mkdir()
    mgr, store, clock = make(tmp_path / "plain", Agent(always(REJECT)))
    plain = await put(store, clock, tls_optional=True)
    await mgr.run_once_due()
    (dsn_qid,) = [q for q in store.ids() if q != plain]
    dsn = store.load(dsn_qid)
    assert dsn is not None and not dsn.requiretls and not dsn.tls_optional
