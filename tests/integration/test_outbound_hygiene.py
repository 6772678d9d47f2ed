"""Outbound hygiene on the wire (issue 4): what pymta sends to peers with and without 8BITMIME,
SMTPUTF8, SIZE and DSN, checked byte for byte with the scripted peer (tests/integration/
_outbound.py), plus a round trip through aiosmtpd for dot-stuffing.
"""

from __future__ import annotations

import email
import email.policy
from pathlib import Path

from pymta.app import MTA
from pymta.config.model import RelayHost
from pymta.types import Recipient
from tests.conftest import maildir_messages, make_config, wait_for
from tests.integration._outbound import ScriptedPeer, inject, unstuff, wait_gone

BODY_8BIT = ("Gr\u00fc\u00dfe aus K\u00f6ln\r\n.a line with a leading dot\r\n"
             "..and two\r\n.\r\nend\r\n").encode()


def mime_8bit(subject: str) -> bytes:
    return (f"From: <alice@example.com>\r\nTo: <x@example.net>\r\nSubject: {subject}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
            "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + BODY_8BIT


def config_for(tmp_path: Path, peer: ScriptedPeer, **kw: object):
    return make_config(tmp_path, smtp_relay=RelayHost("127.0.0.1", peer.port),
                       smtp_tls_security_level="none", **kw)


async def _send(tmp_path: Path, peer: ScriptedPeer, rcpts: list[str], data: bytes,
                **env: object) -> MTA:
    mta = MTA(config_for(tmp_path, peer))
    await mta.start()
    try:
        qid = await inject(mta, "alice@example.com", rcpts, data, **env)
        await wait_gone(mta, qid)
    except BaseException:
        await mta.stop()
        raise
    return mta


async def test_8bit_body_to_server_without_8bitmime_is_quoted_printable(tmp_path: Path) -> None:
    peer = await ScriptedPeer(ehlo=("PIPELINING", "SIZE 0")).start()
    try:
        mta = await _send(tmp_path, peer, ["x@example.net"], mime_8bit("downgrade"),
                          body_type="8BITMIME")
        await mta.stop()
        [txn] = peer.transactions
        assert "BODY=" not in txn.mail
        wire = unstuff(txn.data)
        assert wire.isascii()
        assert b"Content-Transfer-Encoding: quoted-printable" in wire
        assert b"Content-Transfer-Encoding: 8bit" not in wire
        msg = email.message_from_bytes(wire, policy=email.policy.default)
        assert msg.get_payload(decode=True) == BODY_8BIT
    finally:
        await peer.stop()


async def test_8bit_body_to_8bitmime_server_is_sent_unchanged_and_dot_stuffed(
        tmp_path: Path) -> None:
    peer = await ScriptedPeer().start()
    try:
        data = mime_8bit("as is")
        mta = await _send(tmp_path, peer, ["x@example.net"], data, body_type="8BITMIME")
        await mta.stop()
        [txn] = peer.transactions
        assert "BODY=8BITMIME" in txn.mail and f"SIZE={len(data)}" in txn.mail
        assert b"\r\n..a line with a leading dot\r\n...and two\r\n..\r\nend\r\n" in txn.data
        assert unstuff(txn.data) == data  # exactly what was queued (CRLF kept)
    finally:
        await peer.stop()


async def test_smtputf8_to_server_without_it_bounces_5_6_7(tmp_path: Path) -> None:
    peer = await ScriptedPeer(ehlo=("8BITMIME", "DSN")).start()
    try:
        data = "From: <alice@example.com>\r\nSubject: \u00fcber\r\n\r\nhi\r\n".encode()
        mta = await _send(tmp_path, peer, ["j\u00f6rg@example.net"], data, smtputf8=True,
                          body_type="8BITMIME")
        try:
            [dsn] = await wait_for(lambda: maildir_messages(mta.config.mail_dir, "alice"))
        finally:
            await mta.stop()
        assert peer.transactions == [] and not any(line.startswith("MAIL")
                                                   for line in peer.lines)
        assert b"Status: 5.6.7" in dsn
        assert b"SMTPUTF8 is required" in dsn
    finally:
        await peer.stop()


async def test_smtputf8_to_server_with_it_is_sent_with_the_parameter(tmp_path: Path) -> None:
    peer = await ScriptedPeer().start()
    try:
        data = "From: <alice@example.com>\r\nSubject: \u00fcber\r\n\r\nhi\r\n".encode()
        mta = await _send(tmp_path, peer, ["j\u00f6rg@example.net"], data, smtputf8=True,
                          body_type="8BITMIME")
        await mta.stop()
        [txn] = peer.transactions
        assert "SMTPUTF8" in txn.mail and txn.rcpts[0].startswith("RCPT TO:<j\u00f6rg@")
    finally:
        await peer.stop()


async def test_size_advertised_too_small_bounces_5_3_4(tmp_path: Path) -> None:
    peer = await ScriptedPeer(ehlo=("8BITMIME", "SIZE 200")).start()
    try:
        data = b"Subject: big\r\n\r\n" + b"x" * 500 + b"\r\n"
        mta = await _send(tmp_path, peer, ["x@example.net"], data)
        try:
            [dsn] = await wait_for(lambda: maildir_messages(mta.config.mail_dir, "alice"))
        finally:
            await mta.stop()
        assert peer.transactions == []
        assert b"Status: 5.3.4" in dsn and b"exceeds size limit 200" in dsn
    finally:
        await peer.stop()


async def test_dsn_parameters_passed_on_only_when_supported(tmp_path: Path) -> None:
    with_dsn = await ScriptedPeer().start()
    without = await ScriptedPeer(ehlo=("8BITMIME",)).start()
    try:
        for peer, sub in ((with_dsn, "a"), (without, "b")):
            mta = MTA(config_for(tmp_path / sub, peer))
            await mta.start()
            try:
                # an alias expansion: the original recipient becomes the ORCPT
                qid = await inject(mta, "alice@example.com", ["x@example.net"],
                                   b"Subject: dsn\r\n\r\nhi\r\n", ret="HDRS", envid="ID+2B1")
                env = mta.store.load(qid)
                assert env is not None
                await wait_gone(mta, qid)
            finally:
                await mta.stop()
        [txn] = with_dsn.transactions
        assert "RET=HDRS" in txn.mail and "ENVID=ID+2B1" in txn.mail
        assert "ORCPT=rfc822;x@example.net" in txn.rcpts[0]
        [plain] = without.transactions
        assert "RET=" not in plain.mail and "ORCPT" not in plain.rcpts[0]
    finally:
        await with_dsn.stop()
        await without.stop()


async def test_notify_and_orcpt_from_the_client_are_passed_on(tmp_path: Path) -> None:
    peer = await ScriptedPeer().start()
    try:
        mta = MTA(config_for(tmp_path, peer))
        await mta.start()
        try:
            rcpt = Recipient("x@example.net", "team@example.com", local=False,
                             notify="SUCCESS,FAILURE", orcpt="rfc822;team@example.com")
            qid = await inject(mta, "alice@example.com", [rcpt], b"Subject: notify\r\n\r\nhi\r\n")
            await wait_gone(mta, qid)
        finally:
            await mta.stop()
        [txn] = peer.transactions
        assert txn.rcpts == ["RCPT TO:<x@example.net> NOTIFY=SUCCESS,FAILURE "
                             "ORCPT=rfc822;team@example.com"]
    finally:
        await peer.stop()


async def test_issue15_success_notice_left_to_a_dsn_peer_and_relayed_from_others(
        tmp_path: Path) -> None:
    """NOTIFY=SUCCESS relayed to a peer that speaks DSN: the peer got the request, so pymta
    sends no success notice of its own (RFC 3461 §4.1); to a peer without DSN: pymta's
    notice says ``Action: relayed`` (RFC 3464 §2.3.3), not ``delivered``."""
    without = await ScriptedPeer(ehlo=("8BITMIME", "ENHANCEDSTATUSCODES")).start()
    with_dsn = await ScriptedPeer().start()
    try:
        for peer, name in ((without, "plain"), (with_dsn, "dsn")):
            async with MTA(config_for(tmp_path / name, peer)) as mta:
                rcpt = Recipient("x@example.net", "x@example.net", local=False,
                                 notify="SUCCESS")
                qid = await inject(mta, "alice@example.com", [rcpt],
                                   b"Subject: notify\r\n\r\nhi\r\n")
                await wait_gone(mta, qid)
                if peer is without:
                    notices = await wait_for(
                        lambda: maildir_messages(mta.config.mail_dir, "alice/") or None, 15)
                else:
                    # a notice is queued before the message leaves the queue: none is there
                    assert mta.store.ids() == []
                    notices = maildir_messages(mta.config.mail_dir, "alice/")
            if peer is without:
                [notice] = notices
                assert b"Action: relayed" in notice and b"Action: delivered" not in notice
            else:
                assert notices == []
        assert with_dsn.transactions[0].rcpts == [
            "RCPT TO:<x@example.net> NOTIFY=SUCCESS ORCPT=rfc822;x@example.net"]
        assert "NOTIFY" not in without.transactions[0].rcpts[0]
    finally:
        await with_dsn.stop()
        await without.stop()
