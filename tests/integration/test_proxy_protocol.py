"""PROXY protocol behind a real HAProxy (``send-proxy`` and ``send-proxy-v2``).

pymta trusts headers from 127.0.0.1 (where HAProxy connects from); the client connects to
HAProxy from 127.0.0.2, and that is the address pymta must see: in the Received line and in
the log. A direct connection from 127.0.0.1 has to carry a header (without one, or with a
broken one, it is closed without a greeting); one from elsewhere is served as usual.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from pymta.app import MTA
from tests.conftest import RawClient, make_config
from tests.integration._defences import greet, send_message, wait_delivered
from tests.services import HAProxy

CLIENT_IP = "127.0.0.2"


@pytest.fixture
async def mta(tmp_path: Path) -> AsyncIterator[MTA]:
    cfg = make_config(tmp_path, proxy_protocol_from=("127.0.0.1/32",))
    async with MTA(cfg) as server:
        yield server


async def connect(host: str, port: int, source: str) -> RawClient:
    reader, writer = await asyncio.open_connection(host, port, local_addr=(source, 0))
    return RawClient(reader, writer)


def first_received(message: bytes) -> bytes:
    """Our ``Received:`` field (the first one), continuation lines unfolded."""
    text = message.replace(b"\r\n", b"\n")
    head = text.split(b"\n\n", 1)[0].replace(b"\n\t", b" ").replace(b"\n ", b" ")
    (line, *_) = [f for f in head.split(b"\n") if f.startswith(b"Received:")]
    return line


async def no_greeting(client: RawClient) -> bool:
    """The server closed without sending a byte."""
    data = await asyncio.wait_for(client.reader.read(), 5.0)
    return data == b""


@pytest.mark.parametrize("version", [1, 2])
async def test_client_address_from_haproxy(version: int, mta: MTA, caplog: pytest.LogCaptureFixture,
                                           haproxy_factory: Callable[[str], HAProxy]) -> None:
    host, port = mta.addresses["smtp"][0]
    proxy = await asyncio.to_thread(haproxy_factory, f"{host}:{port}")
    caplog.set_level(logging.INFO, logger="pymta.smtpd")
    client = await connect(proxy.host, proxy.port_v1 if version == 1 else proxy.port_v2,
                           CLIENT_IP)
    try:
        await greet(client)
        text = await send_message(client)
        assert text.startswith("250"), text
        await client.cmd("QUIT")
    finally:
        await client.close()
    (message,) = await wait_delivered(mta.config, "alice")
    received = first_received(message)
    assert f"[{CLIENT_IP}]".encode() in received, received
    assert b"[127.0.0.1]" not in received, received
    assert f"connect from unknown[{CLIENT_IP}]" in caplog.text


async def test_direct_client_from_the_proxy_address_needs_a_header(mta: MTA) -> None:
    host, port = mta.addresses["smtp"][0]
    client = await connect(host, port, "127.0.0.1")
    try:
        await client.send(b"EHLO client.example.net\r\n")
        assert await no_greeting(client)
    finally:
        await client.close()


@pytest.mark.parametrize("garbage", [
    b"PROXY TCP4 999.1.1.1 127.0.0.1 1 25\r\nEHLO x\r\n",
    b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff" + b"\x00" * 600,
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",
])
async def test_garbage_header_closed_without_greeting(garbage: bytes, mta: MTA,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    host, port = mta.addresses["smtp"][0]
    client = await connect(host, port, "127.0.0.1")
    try:
        await client.send(garbage)
        assert await no_greeting(client)
    finally:
        await client.close()
    assert "bad PROXY header from [127.0.0.1]" in caplog.text


async def test_header_and_commands_in_one_write(mta: MTA) -> None:
    host, port = mta.addresses["smtp"][0]
    client = await connect(host, port, "127.0.0.1")
    try:
        await client.send(b"PROXY TCP4 192.0.2.9 127.0.0.1 4000 25\r\nEHLO c.example.net\r\n")
        code, _ = await client.reply()
        assert code == 220
        code, text = await client.reply()
        assert code == 250, text
    finally:
        await client.close()


async def test_other_addresses_are_served_directly(mta: MTA) -> None:
    host, port = mta.addresses["smtp"][0]
    client = await connect(host, port, CLIENT_IP)
    try:
        await greet(client)
        assert (await client.cmd("QUIT"))[0] == 221
    finally:
        await client.close()


async def test_no_header_in_time_is_closed(mta: MTA, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    from pymta.receiving import listener
    monkeypatch.setattr(listener, "PROXY_HEADER_TIMEOUT", 0.3)
    host, port = mta.addresses["smtp"][0]
    client = await connect(host, port, "127.0.0.1")
    try:
        await client.send(b"PROXY TCP4 192.0")          # a header that never ends
        assert await no_greeting(client)
    finally:
        await client.close()
    assert "no PROXY header from [127.0.0.1]" in caplog.text


async def test_per_address_limit_counts_the_proxied_client(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, proxy_protocol_from=("127.0.0.1/32",), max_connections_per_ip=1)
    async with MTA(cfg) as server:
        host, port = server.addresses["smtp"][0]
        clients = [await connect(host, port, "127.0.0.1") for _ in range(3)]
        try:
            await clients[0].send(b"PROXY TCP4 192.0.2.9 127.0.0.1 4000 25\r\n")
            assert (await clients[0].reply())[0] == 220
            await clients[1].send(b"PROXY TCP4 192.0.2.9 127.0.0.1 4001 25\r\n")
            code, text = await clients[1].reply()
            assert (code, "192.0.2.9" in text) == (421, True), text
            await clients[2].send(b"PROXY TCP4 192.0.2.10 127.0.0.1 4002 25\r\n")
            assert (await clients[2].reply())[0] == 220
        finally:
            for c in clients:
                await c.close()


def test_setting_is_read_from_the_environment() -> None:
    from pymta.config.errors import ConfigError
    from pymta.config.load import load_config

    cfg = load_config({"MAIL_DOMAIN": "example.com",
                       "PYMTA_PROXY_PROTOCOL_FROM": "10.0.0.5 172.18.0.0/16"})
    assert cfg.proxy_protocol_from == ("10.0.0.5/32", "172.18.0.0/16")
    with pytest.raises(ConfigError, match="PYMTA_PROXY_PROTOCOL_FROM"):
        load_config({"MAIL_DOMAIN": "example.com", "PYMTA_PROXY_PROTOCOL_FROM": "nope"})
