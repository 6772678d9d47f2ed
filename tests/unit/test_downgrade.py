"""Outbound hygiene (issue 4): 8BITMIME conversion, SMTPUTF8, SIZE, DSN parameters, LMTP
dot-stuffing, reply parsing, and the new configuration variables."""

from __future__ import annotations

import email
import email.policy
from email.policy import compat32

import pytest

from pymta.config.errors import ConfigError
from pymta.config.load import (
    load_config,
    parse_relay_hostauth,
    parse_virtual_transport,
)
from pymta.delivery._client import parse_reply, prepare, rcpt_options, xtext
from pymta.delivery.body import in_memory
from pymta.delivery.downgrade import to_7bit
from pymta.delivery.lmtp import parse_transport
from pymta.delivery.smtpclient import DotStuffer
from pymta.types import Envelope, QueuedMessage, Recipient

PLAIN_8BIT = ("From: a@example.com\r\nTo: b@example.net\r\nSubject: caf\r\n"
              "DKIM-Signature: v=1; h=from;\r\n b=abc\r\n\r\n"
              "Gr\u00fc\u00dfe aus K\u00f6ln\r\n.leading dot\r\n").encode()


def test_7bit_message_is_unchanged() -> None:
    data = b"Subject: x\r\n\r\nhello\r\n"
    assert to_7bit(data) is data


def test_single_part_8bit_becomes_quoted_printable() -> None:
    out = to_7bit(PLAIN_8BIT)
    assert out.isascii()
    head, _, body = out.partition(b"\r\n\r\n")
    # every original header line is kept byte for byte (DKIM over them still verifies)
    for line in PLAIN_8BIT.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        assert line in head
    assert b"Content-Transfer-Encoding: quoted-printable" in head
    assert b"MIME-Version: 1.0" in head
    msg = email.message_from_bytes(out, policy=email.policy.default)
    assert msg.get_payload(decode=True).decode("utf-8") == (
        "Gr\u00fc\u00dfe aus K\u00f6ln\r\n.leading dot\r\n")
    assert all(len(line) <= 76 for line in body.split(b"\r\n"))


def test_existing_8bit_cte_header_is_replaced() -> None:
    data = (b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\n\xc3\xa9t\xc3\xa9\r\n")
    out = to_7bit(data)
    assert out.count(b"Content-Transfer-Encoding") == 1
    assert b"=C3=A9t=C3=A9" in out


def test_multipart_converts_only_8bit_leaves() -> None:
    data = (b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n"
            b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\nh\xc3\xa9llo\r\n"
            b"--XX\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n"
            b"--XX--\r\nepilogue\r\n")
    out = to_7bit(data)
    assert out.isascii()
    assert b"h=C3=A9llo" in out
    assert b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--XX--\r\nepilogue\r\n" in out
    msg = email.message_from_bytes(out, policy=email.policy.default)
    parts = list(msg.iter_parts())
    assert parts[0].get_content() == "h\u00e9llo"  # the CRLF before "--XX" is the delimiter's
    assert parts[1].get_payload(decode=True) == b"\x00\x01\x02"


def _leaves(data: bytes) -> list[tuple[str, str, bytes]]:
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    return [(p.get_content_type(), str(p.get("content-transfer-encoding", "7bit")).lower(),
             (p.get_payload(decode=True) or b"").replace(b"\r\n", b"\n").rstrip(b"\n"))
            for p in msg.walk() if not p.is_multipart()]


@pytest.mark.parametrize("data", [
    b"\xef\r\n",                                   # no header at all: the text is the body
    b"Subject: x\r\nGr\xc3\xbc\xc3\x9fe\r\nmore\r\n",   # no empty line before the body
])
def test_issue10_fuzz_body_without_separator_is_converted(data: bytes) -> None:
    """Found by the mime fuzz target: without an empty line, the first line that cannot be a
    header field starts the body (as MIME parsers read it); it used to go out 8-bit."""
    out = to_7bit(data)
    assert out.isascii(), out
    [(ctype, cte, body)] = _leaves(out)
    assert cte == "quoted-printable"
    assert [body] == [leaf[2] for leaf in _leaves(data)]


def test_issue10_fuzz_message_subtypes_are_containers() -> None:
    """Every message/* part holds a message (not only rfc822): it is converted inside and
    never given a Content-Transfer-Encoding of its own."""
    data = (b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
            b"Content-Type: message/global\r\n\r\nSubject: inner\r\n\r\n\xc3\xa9t\xc3\xa9\r\n"
            b"--XX--\r\n")
    out = to_7bit(data)
    assert out.isascii()
    inner = out.split(b"Content-Type: message/global\r\n", 1)[1]
    assert inner.startswith(b"\r\nSubject: inner\r\n")   # no CTE on the message/* part
    assert [leaf[2] for leaf in _leaves(out)] == [leaf[2] for leaf in _leaves(data)]


def test_issue10_fuzz_empty_part_and_odd_boundaries_keep_the_structure() -> None:
    empty = b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n\xe9\r\n--XX\r\n--XX"
    assert to_7bit(empty) == empty               # was: a line break added, one part more
    odd = (b"Content-Type: multipart/mixed; boundary*=utf-8''%E2%82%AC\r\n\r\n"
           b"--x\r\n\r\n\xe9\r\n")
    assert to_7bit(odd) == odd                   # was: UnicodeEncodeError (a retry loop)


@pytest.mark.parametrize("data", [
    b"Subject: x\r\nFrom \xe9\r\n\r\nbody\r\n",         # then the empty line
    b"Subject: x\r\nFrom \xe9\r\nbody\r\n",               # then text
    b"Subject: x\r\nFrom \xe9",                           # then the end
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nX: y\r\nFrom \xe9\r\n\r\nz\r\n"
    b"--b--\r\n",                                        # in a part
])
def test_issue11_ci_fuzz_from_line_ending_the_header_is_body(data: bytes) -> None:
    """Found by the mime fuzz target in CI: a ``From `` line that is the last of several
    header lines is the body's first line to a reader (the stdlib's parser pushes it back),
    so its 8-bit octets went out unconverted to a peer without 8BITMIME."""
    out = to_7bit(data)
    assert out.isascii(), out
    assert [leaf[2] for leaf in _leaves(out)] == [leaf[2] for leaf in _leaves(data)]
    assert all(leaf[1] == "quoted-printable" for leaf in _leaves(out) if leaf[2])


@pytest.mark.parametrize("data", [
    # a multipart whose delimiter never occurs: nothing to convert, so nothing is rewritten
    b"Content-Type: multipart/mixed; boundary=mu\r\nFrom \r\nFrom \xe9--\r\nz\r\n-",
    # a message/rfc822 part: the empty line we add must not make "From " the last header line
    b"Content-Type: message/rfc822\r\nFrom \r\nFrom \xe9--\x17\r\nz\r\n-",
])
def test_issue11_long_fuzz_from_lines_stay_where_a_reader_sees_them(data: bytes) -> None:
    """Found by the long mime fuzz run: a ``From `` line inside a header section is ignored
    by a reader, the last one is the body's first line; writing an empty line after the
    header section made an ignored one the last, so the body grew a line (or kept 8-bit
    text outside any encoding)."""
    out = to_7bit(data)
    assert [leaf[2] for leaf in _leaves(out)] == [leaf[2] for leaf in _leaves(data)]
    for ctype, cte, body in _leaves(out):
        assert body.isascii() or cte in ("base64", "quoted-printable") or \
            ctype.startswith("multipart"), (ctype, cte, body)


def test_issue11_ci_fuzz_digest_parts_are_messages() -> None:
    """A part of a multipart/digest without a Content-Type is message/rfc822 (RFC 2046
    §5.1.5): it is converted inside, not given a Content-Transfer-Encoding that turned its
    whole text, header fields included, into one quoted-printable body."""
    data = (b"Content-Type: multipart/digest; boundary=b\r\n\r\n--b\r\n\r\n"
            b"Subject: inner\r\n\r\nh\xe9\r\n--b--\r\n")
    out = to_7bit(data)
    assert out.isascii()
    assert b"\r\n--b\r\n\r\nSubject: inner\r\nContent-Transfer-Encoding: quoted-printable" in out
    assert _leaves(out) == [("text/plain", "quoted-printable", b"h\xe9")]


def test_smtputf8_is_needed_for_non_ascii_envelope_or_header_not_body() -> None:
    def needs(sender: str, data: bytes) -> bool:
        env = Envelope(sender=sender, recipients=[], received_at=0, next_attempt=0,
                       smtputf8=True)
        msg = QueuedMessage("Q1", env, "/nonexistent")
        return prepare(msg, [RCPT], in_memory(b"", data), {"smtputf8": ""}, "mx").smtputf8

    assert needs("j\u00f6rg@example.com", b"Subject: x\r\n\r\n")
    assert needs("a@example.com", "Subject: \u00e9\r\n\r\n".encode())
    assert not needs("a@example.com", "Subject: x\r\n\r\n\u00e9\r\n".encode())


def _msg(**env_kw) -> QueuedMessage:
    env = Envelope(sender="a@example.com", recipients=[], received_at=0, next_attempt=0,
                   **env_kw)
    return QueuedMessage("Q1", env, "/nonexistent")


RCPT = Recipient("b@example.net", "team@example.com")


def test_prepare_smtputf8_without_support_bounces_5_6_7() -> None:
    msg = _msg(smtputf8=True)
    data = "Subject: \u00e9\r\n\r\nx\r\n".encode()
    p = prepare(msg, [RCPT], in_memory(b"", data), {"8bitmime": ""}, "mx.example.net")
    assert p.refusal is not None and p.refusal.code == 550 and p.refusal.enhanced == "5.6.7"
    ok = prepare(msg, [RCPT], in_memory(b"", data), {"8bitmime": "", "smtputf8": ""},
                 "mx.example.net")
    assert ok.refusal is None and "SMTPUTF8" in ok.mail_options


def test_prepare_smtputf8_flag_on_ascii_message_is_sent_without_it() -> None:
    p = prepare(_msg(smtputf8=True), [RCPT], in_memory(b"", b"Subject: x\r\n\r\nx\r\n"), {}, "mx")
    assert p.refusal is None and "SMTPUTF8" not in p.mail_options


def test_prepare_size() -> None:
    data = b"Subject: x\r\n\r\n" + b"y" * 100
    p = prepare(_msg(), [RCPT], in_memory(b"", data), {"size": "50"}, "mx.example.net")
    assert p.refusal is not None and (p.refusal.code, p.refusal.enhanced) == (552, "5.3.4")
    ok = prepare(_msg(), [RCPT], in_memory(b"", data), {"size": "0"}, "mx.example.net")
    assert ok.refusal is None and f"SIZE={len(data)}" in ok.mail_options


def test_prepare_8bit_without_8bitmime_converts() -> None:
    p = prepare(_msg(body_type="8BITMIME"), [RCPT], in_memory(b"", PLAIN_8BIT), {"size": ""}, "mx")
    assert p.body.whole().isascii() and not any(o.startswith("BODY=") for o in p.mail_options)
    p2 = prepare(_msg(body_type="8BITMIME"), [RCPT], in_memory(b"", PLAIN_8BIT),
                 {"8bitmime": ""}, "mx")
    assert p2.body.whole() == PLAIN_8BIT and "BODY=8BITMIME" in p2.mail_options


def test_dsn_parameters_only_when_supported() -> None:
    msg = _msg(ret="HDRS", envid="abc+2B1")
    rcpt = Recipient("b@example.net", "team@example.com", notify="SUCCESS,FAILURE",
                     orcpt="rfc822;team@example.com")
    assert rcpt_options(rcpt, {}) == []
    assert prepare(msg, [rcpt], in_memory(b"", b"x\r\n"), {}, "mx").mail_options == []
    assert rcpt_options(rcpt, {"dsn": ""}) == ["NOTIFY=SUCCESS,FAILURE",
                                               "ORCPT=rfc822;team@example.com"]
    assert prepare(msg, [rcpt], in_memory(b"", b"x\r\n"), {"dsn": ""}, "mx").mail_options == [
        "RET=HDRS", "ENVID=abc+2B1"]
    # no ORCPT from the client: the original address is sent
    assert rcpt_options(RCPT, {"dsn": ""}) == ["ORCPT=rfc822;team@example.com"]
    assert xtext("a+b=c") == "a+2Bb+3Dc"


def test_parse_reply() -> None:
    r = parse_reply(550, "5.1.1 <x@example.net>: Recipient address rejected")
    assert (r.code, r.enhanced, r.text) == (550, "5.1.1",
                                            "<x@example.net>: Recipient address rejected")
    r = parse_reply(451, "try later")
    assert (r.enhanced, r.text) == ("4.0.0", "try later")
    r = parse_reply(250, "2.0.0 Ok\nqueued as X")
    assert r.text == "Ok queued as X"


def dot_stuff(data: bytes) -> bytes:
    stuffer = DotStuffer()
    return stuffer.feed(data) + stuffer.end()


def test_dot_stuffing_of_crlf_body() -> None:
    assert dot_stuff(b"a\r\n.b\r\n..c\r\n.\r\n") == b"a\r\n..b\r\n...c\r\n..\r\n.\r\n"
    assert dot_stuff(b".x") == b"..x\r\n.\r\n"


def test_parse_transport() -> None:
    assert parse_transport("lmtp:unix:/run/dovecot/lmtp") == ("unix", "/run/dovecot/lmtp")
    assert parse_transport("lmtp:app:2003") == ("app", 2003)
    assert parse_transport("lmtp:[::1]:24") == ("::1", 24)


# ------------------------------------------------------------------ configuration


def test_relay_hostauth() -> None:
    r = parse_relay_hostauth("SMTP_RELAY_HOSTAUTH", "[relay.example.com]:587 user:pa:ss")
    assert (r.host, r.port, r.mx_lookup, r.username, r.password) == (
        "relay.example.com", 587, False, "user", "pa:ss")
    assert "pa:ss" not in repr(r) and "pa:ss" not in str(r)
    r = parse_relay_hostauth("SMTP_RELAY_HOSTAUTH", "relay.example.com")
    assert (r.port, r.mx_lookup, r.username) == (25, True, "")
    assert parse_relay_hostauth("SMTP_RELAY_HOSTAUTH", "") is None


@pytest.mark.parametrize("value", ["[relay:25", "relay:99999", "relay:25 user", "a b c",
                                   "bad_host!:25"])
def test_relay_hostauth_rejects(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_hostauth("SMTP_RELAY_HOSTAUTH", value)
    assert str(info.value).startswith("SMTP_RELAY_HOSTAUTH")


def test_password_not_in_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_relay_hostauth("SMTP_RELAY_HOSTAUTH", "relay:x user:secretpw")
    assert "secretpw" not in str(info.value)


def test_virtual_transport() -> None:
    assert parse_virtual_transport("V", "lmtp:app:2003") == "lmtp:app:2003"
    assert parse_virtual_transport("V", "lmtp:unix:private/transport") == (
        "lmtp:unix:private/transport")
    for bad in ("smtp:app:25", "lmtp:app", "lmtp:unix:"):
        with pytest.raises(ConfigError):
            parse_virtual_transport("V", bad)


def test_outbound_settings_from_environment() -> None:
    c = load_config({"MYHOSTNAME": "mx.example.com", "PYMTA_STATE_DIR": "/tmp/x",
                     "SMTP_RELAY_HOSTAUTH": "[127.0.0.1]:2525 u:p",
                     "SMTP_TLS_SECURITY_LEVEL": "encrypt", "SMTP_TLS_WRAPPERMODE": "yes",
                     "VIRTUAL_TRANSPORT": "lmtp:127.0.0.1:2424",
                     "PYMTA_DNS_RESOLVER": "127.0.0.1:5353", "PYMTA_MX_PORT": "2525",
                     "PYMTA_DESTINATION_CONCURRENCY": "5", "PYMTA_DEAD_HOST_TIME": "1m"})
    assert c.smtp_relay is not None and c.smtp_relay.port == 2525
    assert c.smtp_tls_security_level == "encrypt" and c.smtp_tls_wrappermode
    assert c.virtual_transport == "lmtp:127.0.0.1:2424"
    assert c.dns_resolver == ("127.0.0.1:5353",) and c.mx_port == 2525
    assert c.destination_concurrency == 5 and c.dead_host_time == 60.0
    with pytest.raises(ConfigError):
        load_config({"MYHOSTNAME": "mx.example.com", "SMTP_TLS_SECURITY_LEVEL": "mandatory"})


def test_issue10_fuzz_soft_break_never_starts_a_delimiter_line() -> None:
    """A soft line break must not bring ``--XX`` (mid-line before) to the start of a line,
    where it would end the part (found by the mime fuzz target)."""
    text = b"\xe9" + b"a" * 72 + b"--XX and more text after it\r\n"   # breaks before --XX
    message = (b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n--XX\r\n"
               b"Content-Type: text/plain\r\n\r\n" + text + b"--XX--\r\n")
    out = to_7bit(message)
    assert out.isascii()
    parts = email.message_from_bytes(out, policy=compat32).get_payload()
    assert len(parts) == 1
    assert parts[0].get_payload(decode=True).rstrip(b"\r\n") == text.rstrip(b"\r\n")
    assert not any(line.startswith(b"-") for line in out.split(b"\r\n")[5:-2])


@pytest.mark.parametrize("cte", [b"", b"8bits"])
def test_issue10_fuzz_empty_or_unknown_encoding_is_converted(cte: bytes) -> None:
    out = to_7bit(b"Content-Transfer-Encoding: " + cte + b"\r\n\r\n\xc3\xa9t\xc3\xa9\r\n")
    assert out.isascii(), out
    assert email.message_from_bytes(out, policy=compat32).get_payload(decode=True) \
        == "été\r\n".encode()
