"""The outbound client of issue 15 (items 5 and 6), seen from the peer's side: a real Postfix
(and a real Dovecot for LMTP) behind a recording TCP proxy shows the envelope pipelined, the
body in BDAT chunks, one connection carrying many messages, and large messages arriving intact
whether they went as BDAT or dot-stuffed DATA.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pymta.app import MTA
from pymta.config.model import RelayHost
from pymta.types import RcptState, Recipient
from tests.conftest import make_config, wait_for
from tests.integration._outbound import (
    RecordingProxy,
    ScriptedPeer,
    inject,
    message,
    unstuff,
    wait_attempted,
    wait_gone,
)
from tests.services.dovecot import DovecotServer
from tests.services.postfix_peer import PostfixPeer
from tests.services.tls import make_self_signed

BOXES = "alice@example.com:alice/ bob@example.com:bob/"


@pytest.fixture
async def proxy(postfix_peer: PostfixPeer) -> AsyncIterator[RecordingProxy]:
    recording = await RecordingProxy(postfix_peer.port).start()
    try:
        yield recording
    finally:
        await recording.stop()


def _relay_config(tmp_path: Path, port: int, **kw: object):
    return make_config(tmp_path, smtp_relay=RelayHost("127.0.0.1", port, mx_lookup=False),
                       smtp_tls_security_level="none", smtp_connect_timeout=5.0,
                       smtp_timeout=20.0, **kw)


def _big_body(size: int) -> str:
    """Lines that begin with dots, at every offset, so that a piece boundary falls inside and
    right after them."""
    lines = []
    n = total = 0
    while total < size:
        lines.append("." * (n % 3) + f"line {n} " + "x" * (n % 97))
        total += len(lines[-1]) + 2
        n += 1
    return "\r\n".join(lines) + "\r\n"


async def test_issue15_envelope_pipelined_and_body_in_bdat_seen_at_postfix(
        tmp_path: Path, postfix_peer: PostfixPeer, proxy: RecordingProxy) -> None:
    subject = f"pipelined {tmp_path.name}"
    data = message("alice@example.com", "rcpt@example.net", subject)
    async with MTA(_relay_config(tmp_path, proxy.port)) as mta:
        qid = await inject(mta, "alice@example.com", ["rcpt@example.net", "other@example.net"],
                           data)
        await wait_gone(mta, qid, timeout=20)
    await wait_for(lambda: any(subject.encode() in m
                               for m in postfix_peer.messages("other/")))
    turns = proxy.client_turns(0)
    [envelope_turn] = [t for t in turns if t.startswith(b"MAIL FROM")]
    # MAIL and both RCPTs reached Postfix in one turn, before it answered any of them
    assert re.fullmatch(rb"MAIL FROM:<alice@example.com>[^\r\n]*\r\n"
                        rb"RCPT TO:<rcpt@example.net>[^\r\n]*\r\n"
                        rb"RCPT TO:<other@example.net>[^\r\n]*\r\n", envelope_turn)
    sent = b"".join(turns)
    assert re.search(rb"BDAT \d+ LAST\r\n", sent) and b"\r\nDATA\r\n" not in sent
    delivered = await wait_for(lambda: [m for m in postfix_peer.messages("rcpt/")
                                        if subject.encode() in m])
    assert len(delivered) == 1 and delivered[0].endswith(b"Hello.\n")


async def test_issue15_one_connection_carries_many_messages_counted_at_postfix(
        tmp_path: Path, postfix_peer: PostfixPeer, proxy: RecordingProxy) -> None:
    tag = tmp_path.name
    async with MTA(_relay_config(tmp_path, proxy.port, destination_concurrency=1,
                                 connection_cache_time=5.0)) as mta:
        qids = [await inject(mta, "alice@example.com", ["rcpt@example.net"],
                             message("alice@example.com", "rcpt@example.net", f"{tag} {i}"))
                for i in range(8)]
        for qid in qids:
            await wait_gone(mta, qid, timeout=30)
    assert len(proxy.connections) == 1
    sent = b"".join(proxy.client_turns(0))
    assert sent.count(b"MAIL FROM:") == 8 and sent.count(b"RSET\r\n") == 7
    for i in range(8):
        subject = f"{tag} {i}".encode()
        await wait_for(lambda s=subject: any(s in m for m in postfix_peer.messages("rcpt/")))


async def test_issue15_a_cached_session_the_peer_dropped_is_replaced_at_once(
        tmp_path: Path, postfix_peer: PostfixPeer, proxy: RecordingProxy) -> None:
    """The RSET that leads the next pipelined group finds the session gone: the message
    goes over a new connection in the same attempt, not deferred."""
    tag = tmp_path.name
    config = dataclasses.replace(_relay_config(tmp_path, proxy.port, connection_cache_time=30.0),
                                 queue_retry_first=60.0, queue_retry_max=120.0)
    async with MTA(config) as mta:
        first = await inject(mta, "alice@example.com", ["rcpt@example.net"],
                             message("alice@example.com", "rcpt@example.net", f"{tag} 1"))
        await wait_gone(mta, first)
        proxy.drop_all()
        second = await inject(mta, "alice@example.com", ["rcpt@example.net"],
                              message("alice@example.com", "rcpt@example.net", f"{tag} 2"))
        await wait_gone(mta, second)
    assert len(proxy.connections) == 2
    assert b"".join(proxy.client_turns(1)).count(b"MAIL FROM:") == 1
    await wait_for(lambda: any(f"{tag} 2".encode() in m for m in postfix_peer.messages("rcpt/")))


async def test_issue15_dsn_passed_to_postfix_which_sends_the_success_notice(
        tmp_path: Path, postfix_peer: PostfixPeer, proxy: RecordingProxy) -> None:
    """NOTIFY=SUCCESS and the original recipient reach Postfix (a DSN-capable peer), which
    then writes the success notice itself; pymta writes none."""
    subject = f"dsn pass-through {tmp_path.name}"
    async with MTA(_relay_config(tmp_path, proxy.port)) as mta:
        rcpt = Recipient("rcpt@example.net", "Rcpt@example.net", local=False, notify="SUCCESS")
        data = message("alice@example.com", "rcpt@example.net", subject)
        qid = await inject(mta, "alice@example.com", [rcpt], data, envid="env-1", ret="HDRS")
        await wait_gone(mta, qid, timeout=20)
        assert not (Path(mta.config.mail_dir) / "alice").exists()   # no notice of ours
    sent = b"".join(proxy.client_turns(0))
    assert b"RET=HDRS ENVID=env-1" in sent
    assert b"RCPT TO:<rcpt@example.net> NOTIFY=SUCCESS ORCPT=rfc822;Rcpt@example.net" in sent
    found = re.search(rb"Message-ID: <([^>]+)>", data)
    assert found is not None
    queued = postfix_peer.wait_log(rf"(\w+): message-id=<{re.escape(found.group(1).decode())}>")
    postfix_peer.wait_log(rf"{queued.group(1)}: sender delivery status notification: \w+")


async def test_issue15_a_large_message_arrives_intact_by_bdat(
        tmp_path: Path, postfix_peer: PostfixPeer, proxy: RecordingProxy) -> None:
    subject = f"large bdat {tmp_path.name}"
    body = _big_body(3 << 20)
    data = message("alice@example.com", "rcpt@example.net", subject, body)
    async with MTA(_relay_config(tmp_path, proxy.port)) as mta:
        qid = await inject(mta, "alice@example.com", ["rcpt@example.net"], data)
        await wait_gone(mta, qid, timeout=60)
    found = await wait_for(lambda: [m for m in postfix_peer.messages("rcpt/")
                                    if subject.encode() in m])
    assert found[0].endswith(body.replace("\r\n", "\n").encode())
    sent = b"".join(proxy.client_turns(0))
    # in chunks of 1 MiB, the last one marked: never one chunk of the whole message
    assert re.findall(rb"BDAT (\d+)\r\n", sent) == [b"1048576"] * 3
    assert re.search(rb"BDAT \d+ LAST\r\n", sent)


async def test_issue15_a_large_message_arrives_intact_by_dot_stuffed_data(
        tmp_path: Path) -> None:
    peer = await ScriptedPeer(ehlo=("PIPELINING", "8BITMIME", "SIZE 0")).start()
    try:
        subject = f"large data {tmp_path.name}"
        body = _big_body(3 << 20)
        data = message("alice@example.com", "x@example.net", subject, body)
        async with MTA(_relay_config(tmp_path, peer.port)) as mta:
            qid = await inject(mta, "alice@example.com", ["x@example.net"], data)
            await wait_gone(mta, qid, timeout=60)
        [txn] = peer.transactions
        assert unstuff(txn.data).endswith(body.encode())
    finally:
        await peer.stop()


async def test_issue15_lmtp_sessions_are_reused_counted_at_dovecot(
        tmp_path: Path, dovecot: DovecotServer) -> None:
    proxy = await RecordingProxy(dovecot.lmtp_port).start()
    try:
        config = make_config(tmp_path, virtual_transport=f"lmtp:127.0.0.1:{proxy.port}",
                             mail_boxes=BOXES, connection_cache_time=5.0)
        tag = tmp_path.name
        before = len(dovecot.messages("bob@example.com"))
        async with MTA(config) as mta:
            for i in range(5):
                qid = await inject(mta, "alice@example.com", ["bob@example.com"],
                                   message("alice@example.com", "bob@example.com",
                                           f"{tag} {i}"))
                await wait_gone(mta, qid)
        bob = dovecot.messages("bob@example.com")[before:]
        assert sorted(m.count(tag.encode()) for m in bob) == [1] * 5
        assert len(proxy.connections) == 1
        sent = b"".join(proxy.client_turns(0))
        assert sent.count(b"LHLO ") == 1 and sent.count(b"MAIL FROM:") == 5
    finally:
        await proxy.stop()


class InjectingPeer:
    """A server that answers STARTTLS with its 220 followed, in cleartext, by replies an
    attacker would inject (``250 REQUIRETLS``...), then does the TLS handshake."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.port = 0
        self.commands: list[bytes] = []
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> InjectingPeer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(b"220 injector ESMTP\r\n")
            while line := await reader.readline():
                self.commands.append(line)
                if line.upper().startswith(b"EHLO"):
                    writer.write(b"250-injector\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
                elif line.upper().startswith(b"STARTTLS"):
                    writer.write(b"220 2.0.0 go ahead\r\n250-injected\r\n250 REQUIRETLS\r\n"
                                 b"250 2.1.0 fake MAIL ok\r\n")
                    await writer.drain()
                    await writer.start_tls(self.context)
                else:
                    writer.write(b"250 2.0.0 ok\r\n")
                await writer.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            writer.close()


async def test_review_replies_injected_before_the_tls_handshake_drop_the_session(
        tmp_path: Path) -> None:
    cert, key = make_self_signed(tmp_path / "tls", "injector.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    peer = await InjectingPeer(context).start()
    try:
        config = dataclasses.replace(_relay_config(tmp_path, peer.port),
                                     smtp_tls_security_level="encrypt",
                                     queue_retry_first=30.0, queue_retry_max=60.0)
        async with MTA(config) as mta:
            qid = await inject(mta, "alice@example.com", ["x@example.net"],
                               message("alice@example.com", "x@example.net", "injected"))
            env = await wait_attempted(mta, qid)
        rcpt = env.recipients[0]
        assert rcpt.state is RcptState.PENDING
        assert "data after the STARTTLS reply" in rcpt.last_reply
        assert not any(c.upper().startswith((b"MAIL", b"RCPT", b"DATA", b"BDAT"))
                       for c in peer.commands)
    finally:
        await peer.stop()
