"""LMTP delivery (issue 4): VIRTUAL_TRANSPORT into a real Dovecot over TCP and over its unix
socket (tests/services/dovecot.py; users alice and bob), with a recipient Dovecot refuses, and
aiosmtpd's LMTP server as an independent implementation for per-recipient replies after DATA.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.lmtp import LMTP

from pymta.app import MTA
from pymta.types import RcptState
from tests.conftest import make_config, wait_for
from tests.integration._outbound import inject, message, wait_attempted, wait_gone
from tests.services.base import ServiceError
from tests.services.dovecot import DovecotServer

BOXES = "alice@example.com:alice/ bob@example.com:bob/ nobody@example.com:nobody/"


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(imap=False, tls=False)
    try:
        server.start()
    except ServiceError as exc:
        pytest.fail(f"dovecot unavailable: {exc}")
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("how", ["tcp", "unix"])
async def test_dovecot_lmtp_one_refused_recipient_bounces(tmp_path: Path,
                                                          dovecot: DovecotServer,
                                                          how: str) -> None:
    transport = (f"lmtp:127.0.0.1:{dovecot.lmtp_port}" if how == "tcp"
                 else f"lmtp:unix:{dovecot.lmtp_socket}")
    config = make_config(tmp_path, virtual_transport=transport, mail_boxes=BOXES)
    subject = f"lmtp over {how} {tmp_path.name}"
    before_alice = len(dovecot.messages("alice@example.com"))
    before_bob = len(dovecot.messages("bob@example.com"))
    async with MTA(config) as mta:
        qid = await inject(mta, "alice@example.com",
                           ["alice@example.com", "bob@example.com", "nobody@example.com"],
                           message("alice@example.com", "bob@example.com", subject))
        await wait_gone(mta, qid)
        # alice: the message and the DSN about nobody (the DSN also goes through LMTP)
        alice = await wait_for(lambda: (m := dovecot.messages("alice@example.com"))
                               and len(m) >= before_alice + 2 and m)
    bob = dovecot.messages("bob@example.com")
    assert len(bob) == before_bob + 1 and subject.encode() in bob[-1]
    new = alice[before_alice:]
    assert any(subject.encode() in m and b"multipart/report" not in m for m in new)
    [dsn] = [m for m in new if b"multipart/report" in m]
    assert b"Final-Recipient: rfc822; nobody@example.com" in dsn
    assert b"Status: 5.1.1" in dsn
    assert b"User doesn't exist" in dsn
    assert not (tmp_path / "mail" / "alice").exists()  # nothing went to local maildirs


class PerRecipient:
    """aiosmtpd LMTP handler answering one status per recipient after DATA."""

    def __init__(self, statuses: dict[str, str]) -> None:
        self.statuses = statuses
        self.received: list[tuple[list[str], bytes]] = []

    async def handle_DATA(self, server, session, envelope):
        self.received.append((list(envelope.rcpt_tos), envelope.original_content))
        return "\r\n".join(self.statuses.get(r, "250 2.0.0 delivered")
                           for r in envelope.rcpt_tos)


class LMTPController(Controller):
    def factory(self):
        return LMTP(self.handler)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_aiosmtpd_lmtp_per_recipient_replies(tmp_path: Path) -> None:
    handler = PerRecipient({"bob@example.com": "452 4.2.2 Mailbox full",
                            "nobody@example.com": "550 5.1.1 gone"})
    port = _free_port()
    controller = LMTPController(handler, hostname="127.0.0.1", port=port, ready_timeout=5)
    controller.start()
    try:
        config = make_config(tmp_path, virtual_transport=f"lmtp:127.0.0.1:{port}",
                             mail_boxes=BOXES, queue_retry_first=30.0, queue_retry_max=60.0)
        body = "line one\r\n.starts with a dot\r\n..two dots\r\n"
        async with MTA(config) as mta:
            qid = await inject(mta, "alice@example.com",
                               ["alice@example.com", "bob@example.com", "nobody@example.com"],
                               message("alice@example.com", "alice@example.com", "per rcpt",
                                       body))
            env = await wait_attempted(mta, qid)
            states = {r.address: (r.state, r.last_reply) for r in env.recipients}
        assert states["alice@example.com"][0] is RcptState.DELIVERED
        assert states["bob@example.com"] == (RcptState.PENDING, "452 4.2.2 Mailbox full")
        assert states["nobody@example.com"] == (RcptState.FAILED, "550 5.1.1 gone")
        rcpts, content = handler.received[0]
        assert rcpts == ["alice@example.com", "bob@example.com", "nobody@example.com"]
        assert content.endswith(body.encode())  # dot-stuffing undone exactly by the server
    finally:
        controller.stop()


async def test_lmtp_server_down_defers(tmp_path: Path) -> None:
    config = make_config(tmp_path, virtual_transport=f"lmtp:127.0.0.1:{_free_port()}",
                         mail_boxes=BOXES, queue_retry_first=30.0, queue_retry_max=60.0)
    async with MTA(config) as mta:
        qid = await inject(mta, "bob@example.com", ["alice@example.com"],
                           message("bob@example.com", "alice@example.com", "down"))
        env = await wait_attempted(mta, qid)
    assert env.recipients[0].state is RcptState.PENDING
    assert env.recipients[0].last_reply.startswith("451 4.4.1 connect to")
