"""STARTTLS over a real socket (RFC 3207): plaintext sent behind the STARTTLS command is
discarded, never answered or executed after the handshake (CVE-2011-0411 class); the session
starts over (EHLO required, STARTTLS no longer offered); mail over TLS is marked ESMTPS with
the TLS parameters in its Received header."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pymta.app import MTA
from pymta.config.model import Config
from pymta.tls import ensure_selfsigned, selfsigned_paths
from tests.conftest import RawClient, maildir_messages, make_config, wait_for
from tests.integration._defences import (
    Collector,
    assert_nothing_accepted,
    greet,
    our_received,
    queue_drained,
    send_message,
    wait_delivered,
)


def client_tls_context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@pytest.fixture(scope="session")
def tls_pair(tmp_path_factory) -> tuple[Path, Path]:
    """One self-signed pair for the whole run (RSA key generation is the slow part)."""
    return ensure_selfsigned(make_config(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def tls_config(tmp_path: Path, tls_pair: tuple[Path, Path]) -> Config:
    cfg = make_config(tmp_path, smtpd_use_tls=True)
    cert, key = selfsigned_paths(cfg)
    cert.parent.mkdir(parents=True, mode=0o700)
    shutil.copy(tls_pair[0], cert)
    shutil.copy(tls_pair[1], key)
    return cfg


@pytest.fixture
async def tls_mta(tls_config: Config) -> AsyncIterator[MTA]:
    async with MTA(tls_config) as server:
        yield server


@pytest.fixture
async def tls_client(tls_mta: MTA) -> AsyncIterator[RawClient]:
    client = await RawClient.connect(*tls_mta.addresses["smtp"][0])
    yield client
    await client.close()


async def upgrade(client: RawClient) -> None:
    await asyncio.wait_for(client.writer.start_tls(client_tls_context()), 5.0)


async def no_reply(client: RawClient, wait: float = 0.3) -> bytes:
    """Whatever the server sent unprompted within ``wait`` seconds (b"" when nothing)."""
    try:
        return await asyncio.wait_for(client.reader.read(65536), wait)
    except TimeoutError:
        return b""


async def test_commands_injected_behind_starttls_are_discarded(tls_client, tls_config) -> None:
    client = tls_client
    text = await greet(client)
    assert "STARTTLS" in text
    await client.send(b"STARTTLS\r\nMAIL FROM:<x@evil.test>\r\n")
    code, text = await client.reply()
    assert (code, text[4:9]) == (220, "2.0.0"), text
    await upgrade(client)
    assert await no_reply(client) == b""          # the injected MAIL was never answered
    code, text = await client.cmd("MAIL FROM:<a@sender.test>")
    assert (code, text[4:9]) == (503, "5.5.1"), text   # EHLO again first
    code, text = await client.cmd("EHLO client.example.net")
    assert code == 250, text
    assert "STARTTLS" not in text
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250


async def test_injected_transaction_behind_starttls_not_delivered(tls_client,
                                                                  tls_config) -> None:
    client = tls_client
    await greet(client)
    await client.send(b"STARTTLS\r\nMAIL FROM:<x@evil.test>\r\n"
                      b"RCPT TO:<postmaster@example.com>\r\nDATA\r\n"
                      b"Subject: injected\r\n\r\nSMUGGLED-PAYLOAD\r\n.\r\n")
    code, text = await client.reply()
    assert code == 220, text
    await upgrade(client)
    assert await no_reply(client) == b""
    assert_nothing_accepted(tls_config)
    # the TLS session works normally afterwards
    await greet_after_tls(client)
    await send_message(client)
    assert len(await wait_delivered(tls_config, "alice")) == 1
    assert maildir_messages(tls_config.mail_dir, "postmaster") == []


async def greet_after_tls(client: RawClient) -> str:
    code, text = await client.cmd("EHLO client.example.net")
    assert code == 250, text
    return text


async def test_ehlo_after_tls_does_not_offer_starttls(tls_client) -> None:
    client = tls_client
    await greet(client)
    assert (await client.cmd("STARTTLS"))[0] == 220
    await upgrade(client)
    text = await greet_after_tls(client)
    assert "STARTTLS" not in text
    assert "PIPELINING" in text
    code, text = await client.cmd("STARTTLS")
    assert code >= 500 and text[4:9] == "5.5.1", text


async def test_message_over_tls_has_esmtps_received(tls_client, tls_config) -> None:
    client = tls_client
    await greet(client)
    assert (await client.cmd("STARTTLS"))[0] == 220
    await upgrade(client)
    ssl_object = client.writer.get_extra_info("ssl_object")
    assert ssl_object is not None
    await greet_after_tls(client)
    await send_message(client, b"Subject: secret\r\n\r\nover tls\r\n")
    msgs = await wait_delivered(tls_config, "alice")
    assert len(msgs) == 1
    received = our_received(msgs[0])
    assert "with ESMTPS" in received, received
    assert f"version={ssl_object.version()}" in received, received
    assert "version=TLS" in received
    await queue_drained(tls_config)


async def test_plain_message_on_tls_server_is_esmtp(tls_client, tls_config) -> None:
    client = tls_client
    await greet(client)
    await send_message(client)
    msgs = await wait_delivered(tls_config, "alice")
    received = our_received(msgs[0])
    assert "with ESMTP id" in received and "version=" not in received, received


async def test_starttls_before_ehlo(tls_client) -> None:
    client = tls_client
    assert (await client.reply())[0] == 220
    code, text = await client.cmd("STARTTLS")
    assert (code, text[4:9]) == (503, "5.5.1"), text


async def test_starttls_discards_half_done_transaction(tls_client, tls_config) -> None:
    """MAIL and RCPT given in plaintext do not survive the upgrade."""
    client = tls_client
    await greet(client)
    assert (await client.cmd("MAIL FROM:<a@sender.test>"))[0] == 250
    assert (await client.cmd("RCPT TO:<alice@example.com>"))[0] == 250
    assert (await client.cmd("STARTTLS"))[0] == 220
    await upgrade(client)
    await greet_after_tls(client)
    code, text = await client.cmd("DATA")
    assert (code, text[4:9]) == (503, "5.5.1"), text
    assert_nothing_accepted(tls_config)


async def test_garbage_instead_of_handshake_closes(tls_client, tls_config) -> None:
    client = tls_client
    await greet(client)
    assert (await client.cmd("STARTTLS"))[0] == 220
    collector = Collector(client)
    await collector.send(b"MAIL FROM:<x@evil.test>\r\nRCPT TO:<postmaster@example.com>\r\n"
                         + b"\x00" * 64)
    assert await collector.eof(), bytes(collector.data)
    assert b"250" not in collector.data
    assert_nothing_accepted(tls_config)


async def test_starttls_not_configured(client_factory) -> None:
    client = await client_factory()
    text = await greet(client)
    assert "STARTTLS" not in text
    code, text = await client.cmd("STARTTLS")
    assert (code, text[4:9]) == (502, "5.5.1"), text
    assert (await client.cmd("NOOP"))[0] == 250


async def test_submission_ports_closed_without_sasl(mta) -> None:
    assert "smtp" in mta.addresses
    assert "submission" not in mta.addresses
    assert "submissions" not in mta.addresses


async def test_submission_ports_closed_without_sasl_even_with_tls(tls_mta) -> None:
    assert "smtp" in tls_mta.addresses
    assert "submission" not in tls_mta.addresses
    assert "submissions" not in tls_mta.addresses


async def test_issue11_start_tls_returning_none_closes_the_connection(
        tls_mta: MTA, monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 11: when the event loop's ``start_tls`` gives back no transport (the connection
    went away during the handshake), the session task ended and left the socket open with
    nobody reading it: the client waited forever, and the connection kept counting against
    the connection limits. Now it is closed and forgotten at once."""
    loop = asyncio.get_running_loop()

    async def no_transport(*args: object, **kwargs: object) -> None:
        return None

    monkeypatch.setattr(loop, "start_tls", no_transport)
    client = await RawClient.connect(*tls_mta.addresses["smtp"][0])
    try:
        await greet(client)
        assert (await client.cmd("STARTTLS"))[0] == 220
        assert await client.closed(5.0)
        listener = tls_mta._listener
        assert listener is not None
        await wait_for(lambda: not listener.active and not listener.per_ip, 5)
    finally:
        await client.close()
