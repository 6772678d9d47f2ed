"""Issue 12: ``pymta quarantine`` against a running ``pymta serve`` (the image's ``amavis-ls``
and ``amavisd-release``): a message the banned-files check blocks for two recipients is listed,
shown, released to one recipient and then to the other (each delivered by the server, not
filtered again), and a second blocked message is deleted; once per queue store
(``PYMTA_QUEUE_STORE``)."""

from __future__ import annotations

import json
import mailbox

import serverproc
from serverproc import ServerProc, queued_id, smtp_send, wait_until

server_factory = serverproc.server_factory_each_store  # the fixture, once per queue store

SENDER = "someone@remote.test"
RCPTS = ["alice@example.com", "bob@example.com"]


def exe_message(subject: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: alice@example.com, bob@example.com\r\n"
            f"Subject: {subject}\r\nDate: Sun, 06 Dec 2026 12:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain\r\n\r\nplease pay\r\n"
            "--b1\r\nContent-Type: application/octet-stream\r\n"
            'Content-Disposition: attachment; filename="invoice.pdf.exe"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--b1--\r\n").encode()


def alice(srv: ServerProc) -> list[bytes]:
    new = srv.mail_dir / "alice" / "new"
    return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def bob(srv: ServerProc) -> list[bytes]:
    path = srv.mail_dir / "bob"
    return [m.as_bytes() for m in mailbox.mbox(str(path))] if path.exists() else []


def test_issue12_quarantine_list_show_release_delete_with_a_running_server(
        server_factory) -> None:
    srv: ServerProc = server_factory("q", PYMTA_SPF="no", PYMTA_DMARC="no", SRS_ENABLE="no",
                                     PYMTA_DKIM_VERIFY="no", PYMTA_ARC="no")
    srv.start()
    code, text = smtp_send(srv.port, SENDER, RCPTS, exe_message("first"))
    assert code == 250, text                     # D_DISCARD: accepted, quarantined
    qid = queued_id(text)
    code, text = smtp_send(srv.port, SENDER, RCPTS, exe_message("second"))
    other = queued_id(text)

    listed = json.loads(srv.cli("quarantine", "list", "--json", check=True).stdout)
    assert sorted(e["id"] for e in listed) == sorted([qid, other])
    entry = next(e for e in listed if e["id"] == qid)
    assert entry["kind"] == "banned" and "invoice.pdf.exe" in entry["reason"]
    assert entry["blocked"] == RCPTS
    table = srv.cli("quarantine", "list", check=True).stdout
    assert qid in table and "banned" in table

    shown = srv.cli("quarantine", "show", qid, check=True).stdout
    assert shown.startswith(f"X-Quarantine-ID: <{qid}>")
    assert "X-Envelope-To-Blocked: <alice@example.com>,\n <bob@example.com>" in shown.replace(
        "\r\n", "\n")
    assert "invoice.pdf.exe" in shown

    # one recipient first: delivered by the server, the other still blocked
    out = srv.cli("quarantine", "release", qid, "--rcpt", "bob@example.com", check=True).stdout
    assert "bob@example.com" in out
    (got,) = wait_until(lambda: bob(srv), 15, 0.2, "the release to bob")
    assert b"X-Quarantine-ID: <" in got and b"X-Envelope-To" not in got
    assert alice(srv) == []
    left = json.loads(srv.cli("quarantine", "list", "--json", check=True).stdout)
    assert next(e for e in left if e["id"] == qid)["blocked"] == ["alice@example.com"]

    # then the rest
    srv.cli("quarantine", "release", qid, check=True)
    (got,) = wait_until(lambda: alice(srv), 15, 0.2, "the release to alice")
    assert b"X-Envelope-To" not in got and b"invoice.pdf.exe" in got
    assert len(bob(srv)) == 1                    # bob got it once

    # delete the other one; the queue is then empty
    srv.cli("quarantine", "delete", other, check=True)
    assert json.loads(srv.cli("quarantine", "list", "--json", check=True).stdout) == []
    srv.wait_queue_empty(15)
    bad = srv.cli("quarantine", "release", other)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1
    assert "Traceback" not in srv.stderr
