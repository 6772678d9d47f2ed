"""The spamd and rspamd clients against scripted in-process servers: what goes on the wire,
how replies are parsed, and what a broken or hostile server gets (issue 12).

The real daemons are in tests/integration/test_spam_scanners.py; here the server is a few
lines of asyncio so that it can hang, lie about lengths or flood us on purpose.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from pymta.content.netio import Address, ScannerError, parse_address
from pymta.content.rspamd import Envelope, RspamdClient, RspamdError, parse_check, parse_head
from pymta.content.spamd import SpamdClient, SpamdError, parse_reply, parse_spam_header

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n\r\nbody line\r\n"
SPAMD_OK = (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 27\r\nSpam: True ; 1000.0 / 5.0\r\n\r\n"
            b"GTUBE,NO_RECEIVED,NO_RELAYS")
CHECK_JSON = (b'{"is_skipped":false,"score":6.5,"required_score":15.0,"action":"add header",'
              b'"symbols":{"B_SYM":{"score":1},"A_SYM":{"score":5.5}},'
              b'"messages":{"smtp_message":"go away"}}')

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on a free loopback port running ``handler`` per connection."""
    async def wrapped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    srv = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    port = srv.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        srv.close()


async def read_request(reader: asyncio.StreamReader, length_header: bytes) -> tuple[bytes, bytes]:
    """(head, body) of one request whose body length is in ``length_header``."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(length_header.lower() + b":"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def http(status: int, body: bytes, extra: bytes = b"") -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n".encode() + extra +
            b"\r\n" + body)


# --- addresses ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "expected"), [
    ("127.0.0.1:783", Address(host="127.0.0.1", port=783)),
    ("spamd.example.com", Address(host="spamd.example.com", port=11333)),
    ("[::1]:11333", Address(host="::1", port=11333)),
    ("unix:/run/spamd.sock", Address(path="/run/spamd.sock")),
])
def test_address_forms(spec: str, expected: Address) -> None:
    assert parse_address(spec, 11333) == expected


@pytest.mark.parametrize(("spec", "complaint"), [
    ("unix:run/x.sock", "must be absolute"),
    ("host:99999", "not 1-65535"),
    ("host:abc", "not 1-65535"),
    ("::1:783", "[addr]:port"),
    (":783", "no host"),
    ("host", "no port"),
])
def test_bad_address_is_a_clear_error(spec: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=r"scanner address .*" + complaint.replace("[", r"\[")):
        parse_address(spec)


def test_bad_constructor_arguments() -> None:
    with pytest.raises(ValueError, match="max_in_flight"):
        SpamdClient("127.0.0.1:783", max_in_flight=0)
    with pytest.raises(ValueError, match="timeout"):
        RspamdClient("127.0.0.1", timeout=0)
    with pytest.raises(ValueError, match="line break"):
        SpamdClient("127.0.0.1:783", user="bob\r\nSet: local")


# --- parsing -----------------------------------------------------------------------------------

def test_spamd_reply_parsing() -> None:
    reply = parse_reply(SPAMD_OK)
    assert reply.body == b"GTUBE,NO_RECEIVED,NO_RELAYS"
    assert parse_spam_header(reply.headers["spam"]) == (1000.0, 5.0, True)
    assert parse_spam_header("False ; -0.1 / 5.0") == (-0.1, 5.0, False)
    assert parse_reply(b"SPAMD/1.5 0 PONG\r\n").message == "PONG"


@pytest.mark.parametrize(("raw", "complaint"), [
    (b"SPAMD/1.0 76 Bad header line: (Content-length)\r\n", "error 76: Bad header line"),
    (b"HTTP/1.1 200 OK\r\n\r\n", "not a spamd reply"),
    (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 99\r\n\r\nshort", "Content-length says 99"),
    (b"SPAMD/1.1 0 EX_OK\r\nno colon here\r\n\r\n", "bad header line"),
])
def test_spamd_bad_replies(raw: bytes, complaint: str) -> None:
    with pytest.raises(SpamdError, match=complaint):
        parse_reply(raw)


@pytest.mark.parametrize("value", ["True 1000 / 5", "Maybe ; 1 / 5", "True ; x / 5"])
def test_spamd_bad_spam_header(value: str) -> None:
    with pytest.raises(SpamdError):
        parse_spam_header(value)


def test_rspamd_check_parsing() -> None:
    import json
    result = parse_check(json.loads(CHECK_JSON))
    assert (result.score, result.required_score, result.action) == (6.5, 15.0, "add header")
    assert result.is_spam
    assert result.symbols == ("A_SYM", "B_SYM")
    assert result.smtp_message == "go away"
    assert not parse_check({"score": 1, "required_score": 15, "action": "no action"}).is_spam
    with pytest.raises(RspamdError, match="required_score"):
        parse_check({"score": 1, "action": "no action"})


def test_rspamd_head_parsing() -> None:
    assert parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n") == (200, 12)
    assert parse_head(b"HTTP/1.0 204 X\r\n\r\n") == (204, None)
    with pytest.raises(RspamdError, match="Transfer-Encoding"):
        parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(RspamdError, match="not an HTTP reply"):
        parse_head(b"SPAMD/1.1 0 EX_OK\r\n\r\n")


# --- on the wire -------------------------------------------------------------------------------

async def test_spamd_request_streams_the_file_with_its_length(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(MESSAGE * 5000)       # ~300 KB: several chunks
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader, b"Content-length"))
        writer.write(SPAMD_OK)

    async with server(handler) as address:
        result = await SpamdClient(address, user="alice").check(path)
    head, body = seen[0]
    assert head.startswith(b"SYMBOLS SPAMC/1.5\r\n")
    assert b"\r\nUser: alice\r\n" in head
    assert f"Content-length: {len(MESSAGE) * 5000}\r\n".encode() in head
    assert body == MESSAGE * 5000
    assert result.rules == ("GTUBE", "NO_RECEIVED", "NO_RELAYS")
    assert result.is_spam and result.score == 1000.0 and result.threshold == 5.0


async def test_spamd_tell_headers() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader, b"Content-length")
        seen.append(head)
        writer.write(b"SPAMD/1.1 0 EX_OK\r\nDidSet: local\r\n\r\n")

    async with server(handler) as address:
        assert await SpamdClient(address).learn(io.BytesIO(MESSAGE), spam=False) is True
    assert seen[0].startswith(b"TELL SPAMC/1.5\r\n")
    assert b"\r\nMessage-class: ham\r\n" in seen[0] and b"\r\nSet: local\r\n" in seen[0]


async def test_spamd_tell_refused_is_reported() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, b"Content-length")
        writer.write(b"SPAMD/1.0 69 TELL commands are not enabled, set the --allow-tell "
                     b"switch.\r\n")

    async with server(handler) as address:
        with pytest.raises(SpamdError, match="error 69: TELL commands are not enabled") as e:
            await SpamdClient(address).learn(io.BytesIO(MESSAGE), spam=True)
    assert not e.value.timeout


async def test_rspamd_request_carries_envelope_and_streams(tmp_path: Path) -> None:
    path = tmp_path / "m.eml"
    path.write_bytes(MESSAGE * 3000)
    seen: list[tuple[bytes, bytes]] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await read_request(reader, b"Content-Length"))
        writer.write(http(200, CHECK_JSON))

    envelope = Envelope(ip="198.51.100.7", helo="mx.example.org", hostname="mx.example.org",
                        mail_from="a@example.org", rcpts=("b@example.com", "c@example.com"),
                        queue_id="Q123", user="alice@example.com")
    async with server(handler) as address:
        result = await RspamdClient(address).check(path, envelope)
    head, body = seen[0]
    assert head.startswith(b"POST /checkv2 HTTP/1.1\r\n")
    for line in (b"IP: 198.51.100.7", b"Helo: mx.example.org", b"Hostname: mx.example.org",
                 b"From: a@example.org", b"Rcpt: b@example.com", b"Rcpt: c@example.com",
                 b"Queue-Id: Q123", b"User: alice@example.com",
                 f"Content-Length: {len(MESSAGE) * 3000}".encode()):
        assert b"\r\n" + line + b"\r\n" in head
    assert body == MESSAGE * 3000
    assert result.action == "add header"


def test_rspamd_envelope_refuses_header_injection() -> None:
    with pytest.raises(ValueError, match="line break"):
        Envelope(mail_from="a@example.org\r\nSettings: {}").headers()


async def test_rspamd_learn_goes_to_the_controller_with_the_password() -> None:
    seen: list[bytes] = []

    async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise AssertionError("learning must not go to the normal worker")

    async def controller(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader, b"Content-Length")
        seen.append(head)
        writer.write(http(200, b'{"success":true}'))

    async with server(worker) as w, server(controller) as c:
        client = RspamdClient(w, controller=c, password="s3cret")
        await client.learn(io.BytesIO(MESSAGE), spam=True)
        await client.learn(io.BytesIO(MESSAGE), spam=False)
    assert seen[0].startswith(b"POST /learnspam HTTP/1.1\r\n")
    assert seen[1].startswith(b"POST /learnham HTTP/1.1\r\n")
    assert all(b"\r\nPassword: s3cret\r\n" in h for h in seen)


async def test_rspamd_learn_error_carries_rspamds_reason() -> None:
    async def controller(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, b"Content-Length")
        writer.write(http(403, b'{"error":"Unauthorized"}'))

    async with server(controller) as c:
        with pytest.raises(RspamdError, match=r"learnham refused \(HTTP 403\): Unauthorized"):
            await RspamdClient(c, controller=c).learn(io.BytesIO(MESSAGE), spam=False)


# --- broken and hostile servers ----------------------------------------------------------------

async def _silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await asyncio.sleep(60)


@pytest.mark.parametrize("make", [
    lambda a: SpamdClient(a, timeout=0.5).check(io.BytesIO(MESSAGE)),
    lambda a: SpamdClient(a, timeout=0.5).ping(),
    lambda a: RspamdClient(a, timeout=0.5).check(io.BytesIO(MESSAGE)),
    lambda a: RspamdClient(a, controller=a, timeout=0.5).learn(io.BytesIO(MESSAGE), spam=True),
], ids=["spamd-check", "spamd-ping", "rspamd-check", "rspamd-learn"])
async def test_server_that_never_answers_times_out_within_the_limit(
        make: Callable[[str], Awaitable[object]]) -> None:
    async with server(_silent) as address:
        started = time.monotonic()
        with pytest.raises(ScannerError) as e:
            await make(address)
        elapsed = time.monotonic() - started
    assert e.value.timeout
    assert "within 0.5s" in str(e.value)
    assert 0.4 < elapsed < 1.0


async def _flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers with headers and then data without end."""
    await reader.read(65536)
    writer.write(b"SPAMD/1.1 0 EX_OK\r\nSpam: True ; 1 / 5\r\n\r\n")
    chunk = b"RULE," * 20000
    for _ in range(2000):       # 200 MB if nobody stops reading
        writer.write(chunk)
        await writer.drain()


async def test_spamd_over_long_reply_is_refused() -> None:
    async with server(_flood) as address:
        started = time.monotonic()
        with pytest.raises(SpamdError, match="exceeds 65536 bytes: refused") as e:
            await SpamdClient(address, timeout=10).check(io.BytesIO(MESSAGE))
    assert not e.value.timeout
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(("reply", "complaint"), [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n{", "999999999 bytes exceeds"),
    (b"HTTP/1.1 200 OK\r\nX-Junk: " + b"j" * 300_000 + b"\r\n\r\n", "headers longer than"),
    (b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 300_000, "exceeds 262144 bytes"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nnope!", "not JSON"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "ended after 5 of 10"),
    (b"", "without a reply"),
])
async def test_rspamd_bad_replies_are_refused(reply: bytes, complaint: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader, b"Content-Length")
        writer.write(reply)
        await writer.drain()

    async with server(handler) as address:
        with pytest.raises(RspamdError, match=complaint) as e:
            await RspamdClient(address, timeout=5).check(io.BytesIO(MESSAGE))
    assert not e.value.timeout
    assert address in str(e.value)


async def test_requests_in_flight_are_capped() -> None:
    """Ten concurrent checks through a client allowing three: the server never sees more."""
    current = peak = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal current, peak
        current += 1
        peak = max(peak, current)
        await read_request(reader, b"Content-length")
        await asyncio.sleep(0.05)
        current -= 1
        writer.write(SPAMD_OK)

    async with server(handler) as address:
        client = SpamdClient(address, max_in_flight=3)
        results = await asyncio.gather(*(client.check(io.BytesIO(MESSAGE)) for _ in range(10)))
    assert len(results) == 10
    assert peak == 3
