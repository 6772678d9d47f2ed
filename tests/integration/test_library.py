"""``pymta.MTA`` as a library: several servers in one program, clean shutdown, and mail that
survives a restart on the same state directory."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Sequence
from pathlib import Path

import aiosmtplib
import pytest

from pymta.app import MTA
from pymta.delivery.local import LocalDeliveryAgent
from pymta.queue.choice import detect, make_store
from pymta.types import (
    Address,
    Destination,
    Outcome,
    OutcomeKind,
    QueuedMessage,
    Recipient,
    Reply,
    Target,
)
from tests.conftest import make_config, wait_for
from tests.integration._support import (
    OneAgentRouter,
    ScriptedAgent,
    maildir_bytes,
    our_received,
    queued_id,
    smtp_address,
    split_delivered,
    wait_maildir,
    wait_queue_empty,
)

BODY = b"Subject: library\r\n\r\nfrom a library user\r\n"


async def _send(mta: MTA, rcpt: str = "alice@example.com", data: bytes = BODY) -> str:
    host, port = smtp_address(mta)
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=10) as smtp:
        errors, text = await smtp.sendmail("sender@example.net", [rcpt], data)
    assert errors == {}
    return text


def _refused(host: str, port: int) -> bool:
    """True when nothing listens on host:port any more."""
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    s.settimeout(2)
    try:
        s.connect((host, port))
    except ConnectionRefusedError:
        return True
    except OSError as exc:
        return exc.errno == errno.ECONNREFUSED
    finally:
        s.close()
    return False


async def test_two_servers_in_one_program(tmp_path: Path) -> None:
    one = make_config(tmp_path / "one")
    two = make_config(tmp_path / "two")
    async with MTA(one) as a, MTA(two) as b:
        assert a.addresses["smtp"][0][1] != 0 and b.addresses["smtp"][0][1] != 0
        assert a.addresses["smtp"] != b.addresses["smtp"]
        qa = queued_id(await _send(a, data=b"Subject: for one\r\n\r\n1\r\n"))
        qb = queued_id(await _send(b, data=b"Subject: for two\r\n\r\n2\r\n"))
        [ma] = await wait_maildir(one.mail_dir, "alice/")
        [mb] = await wait_maildir(two.mail_dir, "alice/")
    assert split_delivered(ma)[1] == b"Subject: for one\n\n1\n"
    assert split_delivered(mb)[1] == b"Subject: for two\n\n2\n"
    assert f"id {qa} " in our_received(ma) and f"id {qb} " in our_received(mb)
    assert len(maildir_bytes(one.mail_dir, "alice/")) == 1
    assert len(maildir_bytes(two.mail_dir, "alice/")) == 1

    # and one after the other, reusing the first state directory
    async with MTA(one) as again:
        await _send(again)
        await wait_maildir(one.mail_dir, "alice/", 2)


async def test_stop_leaves_no_listening_socket(tmp_path: Path) -> None:
    config = make_config(tmp_path, smtpd_use_tls=True, smtpd_sasl_clientauth="user:{PLAIN}secret")
    mta = MTA(config)
    await mta.start()
    try:
        addresses = [a for kind in mta.addresses.values() for a in kind]
        assert set(mta.addresses) == {"smtp", "submission", "submissions"}
        assert all(not _refused(h, p) for h, p in addresses)
        # an idle client connected at shutdown is disconnected, not left hanging
        host, port = smtp_address(mta)
        reader, writer = await asyncio.open_connection(host, port)
        assert (await reader.readline()).startswith(b"220 ")
    finally:
        await mta.stop()
    rest = await asyncio.wait_for(reader.read(), 3)
    assert reader.at_eof(), rest
    writer.close()
    for host, port in addresses:
        assert _refused(host, port), (host, port)


async def test_stop_twice_is_harmless(tmp_path: Path) -> None:
    mta = MTA(make_config(tmp_path))
    await mta.start()
    host, port = smtp_address(mta)
    await mta.stop()
    await mta.stop()
    assert _refused(host, port)


async def test_port_is_free_for_a_new_server_after_stop(tmp_path: Path) -> None:
    first = make_config(tmp_path / "a")
    async with MTA(first) as mta:
        host, port = smtp_address(mta)
        await _send(mta)
    from pymta.config.model import ListenAddress
    second = make_config(tmp_path / "b", smtp_listen=(ListenAddress(host, port),))
    async with MTA(second) as mta2:
        assert smtp_address(mta2) == (host, port)
        await _send(mta2)
        await wait_maildir(second.mail_dir, "alice/")


async def test_deferred_message_is_delivered_after_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    agent = ScriptedAgent(LocalDeliveryAgent(config.mail_dir, config.hostname),
                          {"alice@example.com": (OutcomeKind.TEMPORARY,
                                                 Reply(451, "4.3.0", "not now"))})
    async with MTA(config, router=OneAgentRouter(agent)) as mta:
        qid = queued_id(await _send(mta))
        await wait_for(lambda: agent.calls.get("alice@example.com", 0) >= 1)
        await asyncio.sleep(0.05)  # let the attempt save its outcome
    assert maildir_bytes(config.mail_dir, "alice/") == []

    root = str(Path(config.state_dir) / "queue")
    store = make_store(root, detect(root))
    store.open()
    try:
        assert qid in store.ids()  # still queued, on disk
        env = store.load(qid)
        assert env is not None and [r.address for r in env.recipients] == ["alice@example.com"]
    finally:
        await store.aclose()

    async with MTA(config) as mta:  # the standard local router this time
        [stored] = await wait_maildir(config.mail_dir, "alice/")
        await wait_queue_empty(mta)
        await asyncio.sleep(0.3)
        assert len(maildir_bytes(config.mail_dir, "alice/")) == 1
    assert f"id {qid} for <alice@example.com>" in our_received(stored)
    assert split_delivered(stored)[1] == b"Subject: library\n\nfrom a library user\n"


class BlockingAgent:
    """Holds every delivery until released, then answers TEMPORARY (the agent was stopped)."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        self.entered.set()
        await self.release.wait()
        return [Outcome(r.address, OutcomeKind.TEMPORARY, Reply(451, "4.3.0", "shutting down"),
                        "local") for r in rcpts]


async def test_message_in_flight_at_stop_is_delivered_after_restart(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    agent = BlockingAgent()
    mta = MTA(config, router=OneAgentRouter(agent))
    await mta.start()
    try:
        reply = await _send(mta, rcpt="team@example.com")
        assert reply.startswith("2.0.0 Ok: queued as ")  # acknowledged before delivery
        await asyncio.wait_for(agent.entered.wait(), 3)
        stopping = asyncio.create_task(mta.stop())
        await asyncio.sleep(0.1)
        assert not stopping.done()  # stop() waits for the running attempt
        agent.release.set()
        await asyncio.wait_for(stopping, 3)
    finally:
        agent.release.set()
        await mta.stop()
    assert maildir_bytes(config.mail_dir, "alice/") == []

    async with MTA(config) as mta:
        [a] = await wait_maildir(config.mail_dir, "alice/")
        await wait_for(lambda: (Path(config.mail_dir) / "bob").exists())
        await wait_queue_empty(mta)
    assert f"id {queued_id(reply)} for <team@example.com>" in our_received(a)


class CatchAll:
    """A RecipientLookup: every address of example.org goes to one maildir."""

    async def lookup(self, address: Address) -> Destination | None:
        if address.domain == "example.org":
            return Destination((Target(address.text, True, "catchall/"),))
        return None


async def test_custom_lookups(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    async with MTA(config, lookups=[CatchAll()]) as mta:
        await _send(mta, rcpt="Anything.Goes@example.org")
        [stored] = await wait_maildir(config.mail_dir, "catchall/")
        assert split_delivered(stored)[0][1] == b"Delivered-To: Anything.Goes@example.org"
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await _send(mta, rcpt="alice@example.com")  # the table is not consulted
