"""DSN builder: the report must parse back with the stdlib and carry RFC 3464 fields."""

import email
import email.policy
import email.utils

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymta.queue.dsn import DsnEntry, build_dsn
from pymta.types import Envelope, Recipient, Reply

ORIGINAL = (b"Received: from client.example ([192.0.2.9])\r\n"
            b"From: alice@example.org\r\n"
            b"To: bob@example.net\r\n"
            b"Subject: hello\r\n"
            b"Message-ID: <m1@example.org>\r\n"
            b"\r\n"
            b"Body line one\r\n"
            b"SECRET-BODY-MARKER\r\n")

NOW = 1_700_000_000.0


def _env(**kw):
    rcpt = Recipient("bob@example.net", "bob@example.net", local=False,
                     orcpt="rfc822;bob+2Bx@example.net", last_attempt=NOW)
    base = dict(sender="alice@example.org", recipients=[rcpt], received_at=NOW - 60,
                next_attempt=NOW)
    base.update(kw)
    return Envelope(**base), rcpt


def _build(tmp_path, body=ORIGINAL, kind="failed", **kw):
    path = tmp_path / "body"
    path.write_bytes(body)
    env, rcpt = _env(**kw)
    entry = DsnEntry(rcpt, kind if kind != "delayed" else "delayed",
                     "5.1.1" if kind == "failed" else "2.0.0",
                     Reply(550, "5.1.1", "<bob@example.net>: Recipient address rejected")
                     if kind == "failed" else Reply(250, "2.0.0", "Ok: queued"),
                     "mx.example.net")
    data = build_dsn(reporting_mta="mta.example.org", qid="ABC123", envelope=env,
                     entries=[entry], body_path=str(path), now=NOW, action_kind=kind)
    return data, email.message_from_bytes(data, policy=email.policy.default)


def test_crlf_everywhere(tmp_path):
    data, _ = _build(tmp_path)
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_failed_full_report(tmp_path):
    data, msg = _build(tmp_path, envid="ENV+2Did")
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert b"\r\nFrom: MAILER-DAEMON@mta.example.org (Mail Delivery System)\r\n" in b"\r\n" + data
    assert msg["From"].addresses[0].addr_spec == "MAILER-DAEMON@mta.example.org"
    assert msg["To"] == "alice@example.org"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Message-ID"] and msg["Date"] and msg["MIME-Version"] == "1.0"

    human, status, original = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    text = human.get_content()
    assert "This is the mail system at host mta.example.org." in text
    assert "could not\r\nbe delivered" in text
    assert "550 5.1.1 <bob@example.net>: Recipient address rejected" in text

    assert status.get_content_type() == "message/delivery-status"
    per_msg, per_rcpt = status.get_payload()
    assert per_msg["Reporting-MTA"] == "dns; mta.example.org"
    assert per_msg["X-Pymta-Queue-ID"] == "ABC123"
    assert per_msg["Original-Envelope-Id"] == "ENV-id"
    assert per_msg["Arrival-Date"]
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.net"
    assert per_rcpt["Original-Recipient"] == "rfc822; bob+x@example.net"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.net"
    assert per_rcpt["Diagnostic-Code"] == (
        "smtp; 550 5.1.1 <bob@example.net>: Recipient address rejected")
    assert per_rcpt["Last-Attempt-Date"]

    assert original.get_content_type() == "message/rfc822"
    inner = original.get_payload()[0]
    assert inner["Subject"] == "hello"
    assert b"SECRET-BODY-MARKER\r\n" in data  # returned byte for byte


def test_ret_hdrs_returns_headers_only(tmp_path):
    data, msg = _build(tmp_path, ret="HDRS")
    part = msg.get_payload()[2]
    assert part.get_content_type() == "text/rfc822-headers"
    assert "Subject: hello" in part.get_content()
    assert b"SECRET-BODY-MARKER" not in data


def test_large_original_returns_headers_only(tmp_path):
    big = ORIGINAL + b"x" * 78 + b"\r\n"
    big += (b"y" * 78 + b"\r\n") * 1000
    data, msg = _build(tmp_path, body=big, ret="FULL")
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"SECRET-BODY-MARKER" not in data
    assert len(data) < 10_000


def test_no_envid_no_orcpt(tmp_path):
    path = tmp_path / "body"
    path.write_bytes(ORIGINAL)
    env, _ = _env()
    rcpt = Recipient("carol@example.net", "list@example.org")
    data = build_dsn(reporting_mta="h", qid="Q", envelope=env,
                     entries=[DsnEntry(rcpt, "failed", "5.2.2", None, None)],
                     body_path=str(path), now=NOW, action_kind="failed")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    per_msg, per_rcpt = msg.get_payload()[1].get_payload()
    assert per_msg["Original-Envelope-Id"] is None
    assert per_rcpt["Original-Recipient"] is None
    assert per_rcpt["Remote-MTA"] is None
    assert "expanded from <list@example.org>" in msg.get_payload()[0].get_content()


def test_delivered_report(tmp_path):
    _, msg = _build(tmp_path, kind="delivered")
    assert msg["Subject"] == "Successful Mail Delivery Report"
    per_rcpt = msg.get_payload()[1].get_payload()[1]
    assert per_rcpt["Action"] == "delivered"
    assert per_rcpt["Status"] == "2.0.0"


def test_smtputf8_uses_global_types(tmp_path):
    body = ORIGINAL.replace(b"hello", "h\u00e9llo".encode())
    data, msg = _build(tmp_path, body=body, smtputf8=True, body_type="8BITMIME")
    types = [p.get_content_type() for p in msg.get_payload()]
    assert types == ["text/plain", "message/global-delivery-status", "message/global"]
    assert "h\u00e9llo".encode() in data


def test_missing_spool_file_still_reports(tmp_path):
    env, rcpt = _env()
    data = build_dsn(reporting_mta="h", qid="Q", envelope=env,
                     entries=[DsnEntry(rcpt, "failed", "5.0.0", None, None)],
                     body_path=str(tmp_path / "gone"), now=NOW, action_kind="failed")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert len(msg.get_payload()) == 2


# ------------------------------------------------ issue 10: no line over 998 octets

LINE_MAX = 998
WIDE = "\u65e5"          # 3 octets in UTF-8
WIDER = "\U0001f600"     # 4 octets


def _long_lines(data: bytes) -> list[int]:
    return [len(line) for line in data.split(b"\r\n") if len(line) > LINE_MAX]


def _report(tmp_path, *, address: str, original: str, diagnostic: str, smtputf8: bool,
            sender: str = "alice@example.org", orcpt: str = "", envid: str = "",
            remote: str | None = "mx.example.net", kind: str = "failed",
            status: str = "5.1.1") -> bytes:
    path = tmp_path / "body"
    path.write_bytes(ORIGINAL)
    rcpt = Recipient(address, original, local=False, orcpt=orcpt, last_attempt=NOW)
    env = Envelope(sender, [rcpt], NOW - 60, NOW, smtputf8=smtputf8, envid=envid)
    code = {"failed": 550, "delivered": 250, "delayed": 451}[kind]
    entry = DsnEntry(rcpt, kind, status, Reply(code, status, diagnostic), remote)
    return build_dsn(reporting_mta="mta.example.org", qid="ABC123", envelope=env,
                     entries=[entry], body_path=str(path), now=NOW, action_kind=kind,
                     to=sender)


def test_issue10_utf8_diagnostic_code_is_folded_under_998_octets(tmp_path):
    """900 characters of a non-ASCII reply (2,700 octets) used to be one Diagnostic-Code
    line; now it is folded at its spaces and reads back whole."""
    words = " ".join([WIDE * 8] * 100)           # 899 characters, 2,499 octets
    data = _report(tmp_path, address="bob@example.net", original="bob@example.net",
                   diagnostic=words, smtputf8=True)
    assert _long_lines(data) == []
    assert b"Content-Type: message/global-delivery-status" in data
    # (the stdlib parses only message/delivery-status into its field blocks)
    block = next(b for b in data.decode().split("\r\n\r\n")
                 if b.startswith("Final-Recipient:"))
    per_rcpt = email.message_from_string(block, policy=email.policy.default)
    assert per_rcpt["Diagnostic-Code"] == f"smtp; {'550 5.1.1 ' + words}"[:6 + 900] + "..."
    assert block.count("\r\n ") >= 2            # folded: 2,500 octets on three lines


def test_issue10_unfoldable_diagnostic_is_cut_under_998_octets(tmp_path):
    data = _report(tmp_path, address="bob@example.net", original="bob@example.net",
                   diagnostic=WIDER * 2000, smtputf8=True)
    assert _long_lines(data) == []
    assert b"Diagnostic-Code: smtp; 550 5.1.1 " + (WIDER * 100).encode() in data


def test_issue10_human_line_with_expanded_address_under_998_octets(tmp_path):
    """``<addr> (expanded from <orig>): why`` with two long addresses and a long reason
    reached ~1,450 characters; the reason is cut to what the line has room for."""
    address = WIDE * 300 + "@example.net"
    data = _report(tmp_path, address=address, original="x" * 900 + "@example.org",
                   diagnostic="no such user " * 100, smtputf8=True,
                   sender=WIDER * 400 + "@example.org", orcpt="utf-8;" + WIDER * 400)
    assert _long_lines(data) == []
    human = email.message_from_bytes(data, policy=email.policy.default).get_payload()[0]
    text = human.get_content()
    assert "(expanded from <xxxx" in text and "no such user" in text


def test_issue10_long_boundary_host_is_cut_to_70_characters(tmp_path):
    path = tmp_path / "body"
    path.write_bytes(ORIGINAL)
    env, rcpt = _env()
    host = "a" * 60 + ".example.org"
    data = build_dsn(reporting_mta=host, qid="ABC123", envelope=env,
                     entries=[DsnEntry(rcpt, "failed", "5.0.0", None, None)],
                     body_path=str(path), now=NOW, action_kind="failed")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert len(msg.get_boundary()) <= 70
    assert len(msg.get_payload()) == 3


WIDE_ALPHABET = st.sampled_from([WIDE, WIDER, "é", " ", "a", "\r", "\n", "\x00", "\u2028",
                                 "\udcff", "\\", "+", ";"])
ANY = st.text(max_size=1200)
WIDE_TEXT = st.one_of(st.text(alphabet=WIDE_ALPHABET, max_size=1500),
                      st.text(alphabet=WIDE_ALPHABET, min_size=400, max_size=1500))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(address=st.one_of(ANY, WIDE_TEXT), original=st.one_of(ANY, WIDE_TEXT),
       diagnostic=st.one_of(ANY, WIDE_TEXT), sender=st.one_of(ANY, WIDE_TEXT),
       orcpt=st.one_of(ANY, WIDE_TEXT, WIDE_TEXT.map(lambda t: "utf-8;" + t)),
       envid=st.one_of(ANY, WIDE_TEXT), remote=st.one_of(st.none(), ANY),
       smtputf8=st.booleans(), kind=st.sampled_from(["failed", "delivered", "delayed"]),
       status=st.one_of(st.sampled_from(["5.1.1", "4.4.7", "2.0.0"]), ANY))
def test_issue10_no_dsn_line_exceeds_998_octets(tmp_path_factory, address, original,
                                                diagnostic, sender, orcpt, envid, remote,
                                                smtputf8, kind, status):
    data = _report(tmp_path_factory.mktemp("dsn"), address=address, original=original,
                   diagnostic=diagnostic, smtputf8=smtputf8, sender=sender, orcpt=orcpt,
                   envid=envid, remote=remote, kind=kind, status=status)
    assert _long_lines(data) == []
    assert b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b"")
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report"
    assert len(msg.get_payload()) == 3


# ------------------------- issue 10 review: what "the header section" of a notice is

SPAM = b"SPAM LINE buy cheap pills at http://evil.example/\r\n"
NO_BLANK = (b"Received: from client.example ([192.0.2.9])\r\n\tby mta.example.org\r\n"
            b"Subject: hello\r\n" + SPAM * 3000)


def _headers_part(data: bytes) -> bytes:
    """The returned header section, as sent (between its part's header and the boundary)."""
    part = data.split(b"Content-Type: text/rfc822-headers\r\n", 1)[1]
    part = part.split(b"\r\n\r\n", 1)[1]
    return part[:part.rindex(b"\r\n--")]


def test_issue10_review_success_dsn_stops_at_first_non_field_line(tmp_path):
    """A message with no empty line after its header (accepted since defect 9): the success
    notice returns the fields up to the first line that is not one, not the spam after it."""
    data, msg = _build(tmp_path, body=NO_BLANK, kind="delivered")
    assert SPAM not in data
    assert _headers_part(data) == (b"Received: from client.example ([192.0.2.9])\r\n"
                                   b"\tby mta.example.org\r\nSubject: hello\r\n")
    assert len(data) < 4000
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"


def test_issue10_review_failure_dsn_with_ret_hdrs_stops_at_first_non_field_line(tmp_path):
    for ret, body in (("HDRS", NO_BLANK), ("FULL", NO_BLANK + b"x" * 60_000 + b"\r\n")):
        data, _ = _build(tmp_path, body=body, kind="failed", ret=ret)
        assert SPAM not in data, ret
        assert _headers_part(data).endswith(b"Subject: hello\r\n"), ret


def test_issue10_review_notice_headers_are_bounded_in_whole_fields(tmp_path):
    """3,000 header *fields*: a success notice returns at most 16 KiB of them, a failure
    notice at most the bounce size limit, each ending with a whole field."""
    fields = b"".join(b"X-Spam-%04d: buy cheap pills at http://evil.example/\r\n"
                      b"\tcontinued\r\n" % i for i in range(3000))
    body = b"Received: from client.example\r\n" + fields + b"\r\nbody\r\n"
    for kind, limit in (("delivered", 16384), ("delayed", 16384), ("failed", 50000)):
        data, _ = _build(tmp_path, body=body, kind=kind, ret="HDRS")
        part = _headers_part(data)
        assert limit - 100 < len(part) <= limit, kind
        assert part.startswith(b"Received: from client.example\r\nX-Spam-0000:")
        assert part.endswith(b"\tcontinued\r\n"), kind       # whole fields only
        assert len(data) < limit + 3000, kind


def test_issue10_review_notice_header_with_a_huge_line_is_bounded(tmp_path):
    body = b"Received: from client.example\r\nX-Long: " + b"a" * 2_000_000 + b"\r\n\r\nbody\r\n"
    data, _ = _build(tmp_path, body=body, kind="delivered")
    assert _headers_part(data) == b"Received: from client.example\r\n"


# ------------------------------------------------------------------ issue 11: delay reports

DEFERRED = Reply(451, "4.4.7", "<bob@example.net>: queue file write error, try later")


def _delayed(tmp_path, status="4.4.7", reply=DEFERRED, until=NOW + 86400.0, kind="delayed"):
    path = tmp_path / "body"
    path.write_bytes(ORIGINAL)
    env, rcpt = _env(ret="FULL")
    entry = DsnEntry(rcpt, kind, status, reply, "mx.example.net", will_retry_until=until)
    data = build_dsn(reporting_mta="mta.example.org", qid="ABC123", envelope=env,
                     entries=[entry], body_path=str(path), now=NOW, action_kind=kind)
    msg = email.message_from_bytes(data, policy=email.policy.default)
    return data, msg, msg.get_payload()[1].get_payload()[1]


def test_issue11_delay_report_fields(tmp_path):
    """RFC 3464: Action delayed, the 4.x.x status, Will-Retry-Until after Last-Attempt-Date;
    the header section only (RET=FULL notwithstanding); Postfix's warning wording."""
    data, msg, per_rcpt = _delayed(tmp_path)
    assert msg["Subject"] == "Delayed Mail (still being retried)"
    assert per_rcpt["Action"] == "delayed"
    assert per_rcpt["Status"] == "4.4.7"
    assert per_rcpt["Diagnostic-Code"] == f"smtp; {DEFERRED}"
    assert email.utils.parsedate_to_datetime(per_rcpt["Will-Retry-Until"]).timestamp() == (
        NOW + 86400.0)
    keys = list(per_rcpt.keys())
    assert keys.index("Will-Retry-Until") == len(keys) - 1
    assert keys.index("Last-Attempt-Date") == len(keys) - 2
    assert msg.get_payload()[2].get_content_type() == "text/rfc822-headers"
    assert b"SECRET-BODY-MARKER" not in data
    human = msg.get_payload()[0].get_content()
    assert "THIS IS A WARNING ONLY" in human
    assert "could not be delivered for more than 1 minute." in human   # arrived NOW - 60
    assert "It will be retried until " + per_rcpt["Will-Retry-Until"] in human
    # a 4.4.7 in a delay report is the peer's code, not our expiry
    assert "message expired" not in human
    assert f"<bob@example.net>: host mx.example.net said: {DEFERRED}" in human


def test_issue11_will_retry_until_only_in_delay_reports(tmp_path):
    for kind, status, reply in (("failed", "5.1.1", Reply(550, "5.1.1", "no")),
                                ("delivered", "2.0.0", Reply(250, "2.0.0", "Ok"))):
        data, _, per_rcpt = _delayed(tmp_path, status, reply, kind=kind)
        assert per_rcpt["Will-Retry-Until"] is None, kind
        assert b"Will-Retry-Until" not in data and b"retried until" not in data, kind


def test_issue11_delay_report_status_is_always_4xx(tmp_path):
    for status in ("5.1.1", "2.0.0", "junk", ""):
        _, _, per_rcpt = _delayed(tmp_path, status)
        assert per_rcpt["Status"] == "4.0.0", status
    _, msg, per_rcpt = _delayed(tmp_path, "4.0.0", None)
    assert per_rcpt["Diagnostic-Code"] is None
    assert "delivery delayed (status 4.0.0)" in msg.get_payload()[0].get_content()


def test_issue11_unrepresentable_retry_time_is_left_out(tmp_path):
    for until in (None, 0.0, 1e300, float("inf")):
        data, msg, per_rcpt = _delayed(tmp_path, until=until)
        assert per_rcpt["Will-Retry-Until"] is None, until
        assert per_rcpt["Action"] == "delayed"
        assert "will keep\r\ntrying" in msg.get_payload()[0].get_content()
