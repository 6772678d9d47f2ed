"""The SASL exchange inside the sans-I/O engine (RFC 4954): PLAIN, LOGIN, CRAM-MD5."""

from __future__ import annotations

import base64

import pytest

from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.types import Reply

OK_AUTH = Reply(235, "2.7.0", "Authentication successful")
BAD_AUTH = Reply(535, "5.7.8", "Error: authentication failed")


def b64(data: bytes | str) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def plain_cmd(payload: bytes) -> bytes:
    return b"AUTH PLAIN " + b64(payload).encode() + b"\r\n"


def line(text: str | bytes) -> bytes:
    return b64(text).encode() + b"\r\n"


def run(engine: Engine, data: bytes, answer: Reply | None = OK_AUTH) -> tuple[list, bytes]:
    """Feed data; answer Auth decisions with ``answer`` (None leaves them pending)."""
    engine.feed(data)
    seen = []
    while True:
        event = engine.next_event()
        if event is ev.NEED_DATA or event is ev.PAUSED:
            break
        seen.append(event)
        if isinstance(event, ev.Auth) and answer is not None:
            engine.respond(answer)
        elif isinstance(event, ev.MailFrom | ev.RcptTo):
            engine.respond(Reply(250, "2.0.0", "Ok"))
    return seen, engine.take_output()


def auth_engine(tls: bool = True, mechs=("PLAIN", "LOGIN"), **kw) -> Engine:
    e = Engine(EngineConfig("mx.test", tls_active=tls, tls_available=True,
                            auth_mechanisms=tuple(mechs), **kw))
    run(e, b"EHLO c.test\r\n")
    return e


def auths(events) -> list[ev.Auth]:
    return [x for x in events if isinstance(x, ev.Auth)]


def test_auth_advertised_only_under_tls():
    plain = Engine(EngineConfig("mx.test", tls_available=True, auth_mechanisms=("PLAIN",)))
    _, out = run(plain, b"EHLO c.test\r\n")
    assert b"AUTH" not in out and b"STARTTLS" in out
    _, out = run(plain, b"AUTH PLAIN " + b64("\0u\0p").encode() + b"\r\n")
    assert out.startswith(b"530 5.7.0")
    tls = auth_engine()
    _, out = run(tls, b"EHLO c.test\r\n")
    assert b"250-AUTH PLAIN LOGIN\r\n" in out


def test_no_auth_where_not_configured():
    e = Engine(EngineConfig("mx.test", tls_active=True))
    _, out = run(e, b"EHLO c.test\r\n")
    assert b"AUTH" not in out
    _, out = run(e, b"AUTH PLAIN\r\n")
    assert out.startswith(b"502 5.5.1")


def test_plain_with_initial_response():
    e = auth_engine()
    events, out = run(e, plain_cmd(b'\0alice\0s3cret'))
    (auth,) = auths(events)
    assert (auth.mechanism, auth.username, auth.password, auth.authzid) == (
        "PLAIN", "alice", "s3cret", "")
    assert out == b"235 2.7.0 Authentication successful\r\n"
    assert e.auth_user == "alice"
    assert "s3cret" not in repr(auth)


def test_plain_with_empty_challenge_and_authzid():
    e = auth_engine()
    events, out = run(e, b"auth plain\r\n")
    assert out == b"334 \r\n" and not events
    events, out = run(e, line(b'alice\0alice\0pw'))
    (auth,) = auths(events)
    assert auth.authzid == "alice" and auth.username == "alice" and auth.password == "pw"
    assert out.startswith(b"235 ")


def test_login_exchange():
    e = auth_engine()
    _, out = run(e, b"AUTH LOGIN\r\n")
    assert out == b"334 VXNlcm5hbWU6\r\n"
    _, out = run(e, line('bob'))
    assert out == b"334 UGFzc3dvcmQ6\r\n"
    events, out = run(e, line('pässword'))
    (auth,) = auths(events)
    assert (auth.mechanism, auth.username, auth.password) == ("LOGIN", "bob", "pässword")
    assert e.auth_user == "bob"


def test_login_with_initial_username():
    e = auth_engine()
    _, out = run(e, b"AUTH LOGIN " + line("bob"))
    assert out == b"334 UGFzc3dvcmQ6\r\n"
    events, _ = run(e, line('pw'))
    assert auths(events)[0].username == "bob"


def test_failure_leaves_session_unauthenticated_and_retry_works():
    e = auth_engine()
    _, out = run(e, plain_cmd(b'\0alice\0wrong'), answer=BAD_AUTH)
    assert out.startswith(b"535 5.7.8") and e.auth_user is None
    _, out = run(e, plain_cmd(b'\0alice\0right'))
    assert out.startswith(b"235") and e.auth_user == "alice"
    _, out = run(e, plain_cmd(b'\0alice\0right'))
    assert out.startswith(b"503 5.5.1")


def test_temporary_failure_reply_passes_through():
    e = auth_engine()
    _, out = run(e, plain_cmd(b'\0a\0b'),
                 answer=Reply(454, "4.7.0", "Temporary authentication failure"))
    assert out.startswith(b"454 4.7.0") and e.auth_user is None


@pytest.mark.parametrize("start", [b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n"])
def test_star_cancels(start):
    e = auth_engine()
    run(e, start)
    events, out = run(e, b"*\r\n")
    assert not auths(events)
    assert out == b"501 5.0.0 Authentication aborted\r\n"
    _, out = run(e, b"NOOP\r\n")
    assert out.startswith(b"250")


def test_cancel_after_login_username():
    e = auth_engine()
    run(e, b"AUTH LOGIN\r\n")
    run(e, line('bob'))
    events, out = run(e, b"*\r\n")
    assert out.startswith(b"501 5.0.0") and not auths(events)


@pytest.mark.parametrize("bad", [b"!!!notbase64", b"YWJj\x00", b"YW Jj", b"YWJ"])
def test_bad_base64(bad):
    e = auth_engine()
    run(e, b"AUTH PLAIN\r\n")
    events, out = run(e, bad + b"\r\n")
    assert out.startswith(b"501 5.5.2") and not auths(events)


def test_bad_base64_in_initial_response():
    e = auth_engine()
    events, out = run(e, b"AUTH PLAIN %%%%\r\n")
    assert out.startswith(b"501 5.5.2") and not auths(events)


@pytest.mark.parametrize("payload", [b"no-nuls", b"\0\0pw", b"a\0b", b"a\0b\0c\0d"])
def test_malformed_plain(payload):
    e = auth_engine()
    events, out = run(e, plain_cmd(payload))
    assert out.startswith(b"501 5.5.2") and not auths(events)


def test_empty_initial_response_marker():
    e = auth_engine()
    _, out = run(e, b"AUTH PLAIN =\r\n")
    assert out.startswith(b"501 5.5.2")  # empty PLAIN message is malformed, not a 334


def test_exchange_line_is_bounded():
    e = auth_engine(sasl_line_limit=64)
    run(e, b"AUTH PLAIN\r\n")
    events, out = run(e, b"A" * 200)
    assert out.startswith(b"500 5.5.6") and not auths(events)
    events, out = run(e, b"A" * 50 + b"\r\nNOOP\r\n")
    assert not auths(events)
    assert out == b"250 2.0.0 Ok\r\n"   # the rest of the long line was skipped
    run(e, b"AUTH LOGIN\r\n")
    _, out = run(e, b"B" * 100 + b"\r\n")
    assert out.startswith(b"500 5.5.6")


def test_bare_lf_in_exchange_closes():
    e = auth_engine()
    run(e, b"AUTH PLAIN\r\n")
    events, out = run(e, b"AGFsaWNlAHB3\nMAIL FROM:<a@b>\r\n")
    assert out.startswith(b"521 5.5.2") and e.closed
    assert not auths(events) and not any(isinstance(x, ev.MailFrom) for x in events)


def test_unknown_mechanism_and_syntax():
    e = auth_engine()
    _, out = run(e, b"AUTH GSSAPI\r\n")
    assert out.startswith(b"504 5.5.4")
    _, out = run(e, b"AUTH CRAM-MD5\r\n")   # not configured here
    assert out.startswith(b"504 5.5.4")
    _, out = run(e, b"AUTH\r\n")
    assert out.startswith(b"501 5.5.4")


def test_auth_not_during_transaction_or_before_ehlo():
    e = Engine(EngineConfig("mx.test", tls_active=True, auth_mechanisms=("PLAIN",)))
    _, out = run(e, b"AUTH PLAIN\r\n")
    assert out.startswith(b"503 5.5.1")
    run(e, b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
    _, out = run(e, b"AUTH PLAIN\r\n")
    assert out.startswith(b"503 5.5.1")


def test_cram_md5_exchange():
    e = auth_engine(mechs=("PLAIN", "LOGIN", "CRAM-MD5"))
    _, out = run(e, b"AUTH CRAM-MD5\r\n")
    assert out.startswith(b"334 ")
    challenge = base64.b64decode(out[4:].strip()).decode()
    assert challenge.startswith("<") and challenge.endswith("@mx.test>")
    events, out = run(e, line("alice " + "AB" * 16))
    (auth,) = auths(events)
    assert auth.mechanism == "CRAM-MD5" and auth.username == "alice"
    assert auth.challenge == challenge and auth.password == "ab" * 16
    _, out2 = run(auth_engine(mechs=("CRAM-MD5",)), b"AUTH CRAM-MD5 xyz\r\n")
    assert out2.startswith(b"501")


def test_pending_decision_pauses_engine():
    e = auth_engine()
    events, out = run(e, plain_cmd(b"\0a\0b") + b"NOOP\r\n", answer=None)
    assert len(auths(events)) == 1 and out == b""
    assert e.next_event() is ev.PAUSED
    e.respond(OK_AUTH)
    events, out = run(e, b"")
    assert out == b"235 2.7.0 Authentication successful\r\n250 2.0.0 Ok\r\n"
