"""Issue 11: delay DSNs end to end. A recipient whose delivery keeps being deferred makes the
sender's mailbox receive exactly one "Delayed Mail (still being retried)" report once the
message is older than ``PYMTA_DELAY_WARNING_TIME``, and the usual failure report when the
queue lifetime ends.

Two set-ups: an in-process ``MTA`` whose scripted agent defers a local recipient, and a real
``pymta serve`` process relaying to a next hop (a raw socket server here) that answers every
``RCPT`` with a 451. Both need ``PYMTA_DELAY_WARNING_TIME`` passed from ``pymta/app.py`` to
the queue manager. The times are short (about a second) but every assertion is about what
arrived and in which order, never about when: the retry intervals are a small fraction of
the window between the warning time and the lifetime, so an attempt always falls inside it.
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.utils
import subprocess
import threading
from email import policy
from pathlib import Path

import aiosmtplib
import serverproc
from serverproc import PYTHON, REPO, ServerProc, SMTPClient, clean_environ, queued_id, wait_until

from pymta.app import MTA
from pymta.delivery.local import LocalDeliveryAgent
from pymta.types import OutcomeKind, Reply
from tests.conftest import make_config
from tests.integration._support import (
    OneAgentRouter,
    ScriptedAgent,
    ThreadedPeer,
    maildir_bytes,
    smtp_address,
    split_delivered,
    wait_maildir,
    wait_queue_empty,
)

server_factory = serverproc.server_factory  # the fixture

DELAYED = "Delayed Mail (still being retried)"
FAILED = "Undelivered Mail Returned to Sender"
BUSY = Reply(451, "4.3.0", "mailbox busy, try later")
GREYLISTED = "451 4.7.1 Greylisted, please try again later"
QUIET = {"PYMTA_SPF": "no", "PYMTA_DMARC": "no", "PYMTA_DKIM_VERIFY": "no",
         "PYMTA_DKIM_SIGN": "no", "PYMTA_ARC": "no", "SRS_ENABLE": "no"}

ORIGINAL = (b"From: Alice <alice@example.com>\r\n"
            b"To: carol@example.com\r\n"
            b"Subject: slow going\r\n"
            b"Message-ID: <slow@example.com>\r\n"
            b"\r\n"
            b"BODY-MARKER-never-in-a-warning\r\n")


def parse(stored: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(stored, policy=policy.default)  # type: ignore[return-value]


def blocks(dsn: email.message.EmailMessage) -> tuple[email.message.Message,
                                                     list[email.message.Message]]:
    """(per-message fields, per-recipient blocks) of a report's delivery-status part."""
    assert dsn.get_content_type() == "multipart/report"
    parts = list(dsn.iter_parts())
    assert parts[1].get_content_type() == "message/delivery-status"
    found = parts[1].get_payload()
    assert isinstance(found, list)
    return found[0], found[1:]


def date(value: str) -> float:
    return email.utils.parsedate_to_datetime(value).timestamp()


# ------------------------------------------------------------------ in-process MTA


async def _start(tmp_path: Path, **overrides: object) -> tuple[MTA, ScriptedAgent]:
    config = make_config(tmp_path, mail_boxes=("alice@example.com:alice/ "
                                               "carol@example.com:carol/ "
                                               "postmaster@example.com:postmaster/"),
                         mail_aliases="", **overrides)
    agent = ScriptedAgent(LocalDeliveryAgent(config.mail_dir, config.hostname),
                          {"carol@example.com": (OutcomeKind.TEMPORARY, BUSY)})
    mta = MTA(config, router=OneAgentRouter(agent))
    await mta.start()
    return mta, agent


async def _send(mta: MTA, rcpt_options: list[str]) -> str:
    host, port = smtp_address(mta)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False,
                               local_hostname="client.example.net", timeout=10) as smtp:
        errors, text = await smtp.sendmail("alice@example.com", ["carol@example.com"],
                                           ORIGINAL, rcpt_options=rcpt_options)
    assert errors == {}
    return text


async def test_issue11_delay_warning_then_failure_in_process(tmp_path: Path) -> None:
    """No NOTIFY at all, PYMTA_DELAY_WARNING_TIME set: one warning, then the bounce."""
    mta, agent = await _start(tmp_path, delay_warning_time=0.5, queue_lifetime=3.0,
                              queue_retry_first=0.1, queue_retry_max=0.2)
    try:
        mail_dir = mta.config.mail_dir
        qid = queued_id(await _send(mta, []))
        warning, failure = await wait_maildir(mail_dir, "alice/", 2, timeout=20)
        await wait_queue_empty(mta)
        await asyncio.sleep(0.3)
        assert len(maildir_bytes(mail_dir, "alice/")) == 2       # exactly one of each

        assert split_delivered(warning)[0][0] == b"Return-Path: <>"
        dsn = parse(warning)
        assert dsn["Subject"] == DELAYED
        per_message, [carol] = blocks(dsn)
        assert per_message["X-Pymta-Queue-ID"] == qid
        assert carol["Final-Recipient"] == "rfc822; carol@example.com"
        assert carol["Action"] == "delayed"
        assert carol["Status"] == "4.3.0"
        assert carol["Diagnostic-Code"] == f"smtp; {BUSY}"
        arrival = date(per_message["Arrival-Date"])
        assert abs(date(carol["Will-Retry-Until"]) - (arrival + 3.0)) <= 1.0
        assert list(dsn.iter_parts())[2].get_content_type() == "text/rfc822-headers"
        assert b"BODY-MARKER" not in warning

        dsn = parse(failure)
        assert dsn["Subject"] == FAILED
        _, [carol] = blocks(dsn)
        assert carol["Action"] == "failed" and carol["Status"] == "4.4.7"
        assert "Will-Retry-Until" not in carol
        assert agent.calls["carol@example.com"] >= 3
    finally:
        await mta.stop()


async def test_issue11_no_warning_without_delay_in_notify_in_process(tmp_path: Path) -> None:
    """NOTIFY=FAILURE: the failure report only, however long the delay."""
    mta, _ = await _start(tmp_path, delay_warning_time=0.3, queue_lifetime=1.5,
                          queue_retry_first=0.1, queue_retry_max=0.2)
    try:
        mail_dir = mta.config.mail_dir
        await _send(mta, ["NOTIFY=FAILURE"])
        [stored] = await wait_maildir(mail_dir, "alice/", timeout=20)
        await wait_queue_empty(mta)
        await asyncio.sleep(0.3)
        assert parse(stored)["Subject"] == FAILED
        assert len(maildir_bytes(mail_dir, "alice/")) == 1
    finally:
        await mta.stop()


# ------------------------------------------------------------------ pymta serve


class DeferringPeer(ThreadedPeer):
    """A next hop on 127.0.0.1 that answers every RCPT with ``GREYLISTED`` and records the
    RCPT lines it saw (blocking sockets in threads, independent of the server's loop)."""

    def __init__(self) -> None:
        super().__init__()
        self.rcpts: list[str] = []
        self._lock = threading.Lock()

    def _session(self, rfile, wfile) -> None:
        try:
            wfile.write(b"220 peer.test ESMTP\r\n")
            while raw := rfile.readline():
                verb = raw[:4].upper()
                if verb == b"EHLO":
                    wfile.write(b"250-peer.test\r\n250-8BITMIME\r\n250 ENHANCEDSTATUSCODES\r\n")
                elif verb == b"RCPT":
                    with self._lock:
                        self.rcpts.append(raw.decode("utf-8", "replace").strip())
                    wfile.write(GREYLISTED.encode() + b"\r\n")
                elif verb == b"QUIT":
                    wfile.write(b"221 2.0.0 Bye\r\n")
                    return
                elif verb == b"DATA":
                    wfile.write(b"554 5.5.1 No valid recipients\r\n")
                else:
                    wfile.write(b"250 2.0.0 Ok\r\n")
        except OSError:
            return


def test_issue11_serve_sends_one_delay_notice_then_the_failure(server_factory) -> None:
    """A real server relays to a next hop that greylists forever. The sender's mailbox gets
    exactly one delay notice, for the recipients that asked (NOTIFY=DELAY) or said nothing,
    with the fields a mail administrator expects, and later the failure notice as before."""
    peer = DeferringPeer().start()
    try:
        srv: ServerProc = server_factory(
            "delay", SMTP_RELAY_HOSTAUTH=f"[127.0.0.1]:{peer.port}", MYNETWORKS="127.0.0.1",
            PYMTA_DELAY_WARNING_TIME="1s", PYMTA_QUEUE_LIFETIME="6s",
            PYMTA_RETRY_FIRST="0.3", PYMTA_RETRY_MAX="0.6", **QUIET)
        srv.start()
        with SMTPClient(srv.port) as client:
            assert client.cmd("EHLO client.test")[0] == 250
            assert client.cmd("MAIL FROM:<alice@example.com> RET=FULL ENVID=slow-1")[0] == 250
            for line in ("RCPT TO:<dave@remote.test> NOTIFY=DELAY,FAILURE "
                         "ORCPT=rfc822;dave@remote.test",
                         "RCPT TO:<erin@remote.test>",
                         "RCPT TO:<frank@remote.test> NOTIFY=NEVER"):
                assert client.cmd(line)[0] == 250, line
            assert client.cmd("DATA")[0] == 354
            client.sock.sendall(ORIGINAL + b".\r\n")
            code, text = client.reply()
            assert code == 250, text
        qid = queued_id(text)

        def alice() -> list[bytes]:       # in delivery order
            return maildir_bytes(str(srv.mail_dir), "alice/")

        stored = wait_until(lambda: len(m := alice()) >= 2 and m, 40, 0.1,
                            "the delay and failure notices")
        srv.wait_queue_empty(20)
        assert len(alice()) == 2
        notices = [parse(s) for s in stored]
        assert [m["Subject"] for m in notices] == [DELAYED, FAILED]

        warning, failure = notices
        assert warning["To"] == "alice@example.com"
        per_message, rcpts = blocks(warning)
        assert per_message["Reporting-MTA"] == "dns; mx.example.com"
        assert per_message["X-Pymta-Queue-ID"] == qid
        assert per_message["Original-Envelope-Id"] == "slow-1"
        assert [b["Final-Recipient"] for b in rcpts] == ["rfc822; dave@remote.test",
                                                         "rfc822; erin@remote.test"]
        dave = rcpts[0]
        assert dave["Original-Recipient"] == "rfc822; dave@remote.test"
        for b in rcpts:
            assert b["Action"] == "delayed"
            assert b["Status"] == "4.7.1"
            assert b["Remote-MTA"] == "dns; 127.0.0.1"
            assert b["Diagnostic-Code"] == f"smtp; {GREYLISTED}"
            until = date(b["Will-Retry-Until"])
            assert abs(until - (date(per_message["Arrival-Date"]) + 6)) <= 1.0
            assert b["Last-Attempt-Date"]
        human = list(warning.iter_parts())[0].get_content()
        assert "THIS IS A WARNING ONLY" in human
        assert "<dave@remote.test>: host 127.0.0.1 said: " + GREYLISTED in human
        returned = list(warning.iter_parts())[2]
        assert returned.get_content_type() == "text/rfc822-headers"   # RET=FULL or not
        assert "Subject: slow going" in returned.get_content()
        assert not any(b"BODY-MARKER" in s for s in stored if DELAYED.encode() in s)

        _, failed = blocks(failure)
        assert [b["Final-Recipient"] for b in failed] == ["rfc822; dave@remote.test",
                                                          "rfc822; erin@remote.test"]
        assert {b["Action"] for b in failed} == {"failed"}
        assert {b["Status"] for b in failed} == {"4.4.7"}
        assert all("Will-Retry-Until" not in b for b in failed)

        assert f"{qid}: sender delay notification: " in srv.stderr
        assert srv.stderr.count(f"{qid}: sender delay notification: ") == 1
        assert len(peer.rcpts) >= 9         # retried all along: three recipients a time
    finally:
        peer.stop()


def test_issue11_bad_delay_warning_time_stops_start_up_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([PYTHON, "-m", "pymta", "check-config"], cwd=REPO,
                          env=clean_environ(MAIL_DOMAIN="example.com",
                                            PYMTA_STATE_DIR=str(tmp_path / "state"),
                                            PYMTA_DELAY_WARNING_TIME="4 hours"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "pymta: PYMTA_DELAY_WARNING_TIME: not a duration (seconds, or a number with "
        "s/m/h/d/w): '4 hours'"]
