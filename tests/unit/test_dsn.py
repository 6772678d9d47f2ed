"""DSN builder: the report must parse back with the stdlib and carry RFC 3464 fields."""

import email
import email.policy

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
