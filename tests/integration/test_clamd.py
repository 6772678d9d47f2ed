"""The clamd client (issue 12) against a real clamd (tests/services/clamd.py: one EICAR test
signature, StreamMaxLength 1 MiB) over TCP and its unix socket, and against small asyncio
servers that misbehave on purpose: one that never answers, one that answers garbage, one that
counts how many scans it holds at once.

The EICAR string is joined at run time (``eicar()``); no file here contains it whole.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from pymta.content.clamd import ClamdClient, ClamdStatus, ScannerError
from tests.services.base import free_port
from tests.services.clamd import DETECTED_AS, ClamdServer, eicar

TRANSPORTS = ["tcp", "unix"]


def _address(server: ClamdServer, how: str) -> str:
    return server.address if how == "tcp" else server.unix_address


def _message(body: bytes, headers: str = "") -> bytes:
    head = ("From: sender@example.net\r\nTo: alice@example.com\r\nSubject: test\r\n"
            "Message-ID: <clamd-test@example.net>\r\n" + headers)
    return head.encode() + b"\r\n" + body


def _with_attachment(payload: bytes, name: str) -> bytes:
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    return _message(
        b"--b1\r\nContent-Type: text/plain\r\n\r\nSee the attachment.\r\n"
        b"--b1\r\nContent-Type: application/octet-stream\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=\"" + name.encode() + b"\"\r\n\r\n"
        + encoded + b"--b1--\r\n",
        'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b1"\r\n')


def _spool(tmp_path: Path, data: bytes, name: str = "msg") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("how", TRANSPORTS)
async def test_clean_message_is_clean(clamd: ClamdServer, tmp_path: Path, how: str) -> None:
    client = ClamdClient(_address(clamd, how), timeout=10)
    result = await client.scan(_spool(tmp_path, _message(b"Hello, nothing to see.\r\n" * 50)))
    assert result.status is ClamdStatus.CLEAN
    assert result.signatures == ()
    assert not result.infected


@pytest.mark.parametrize("how", TRANSPORTS)
async def test_eicar_inline_is_infected(clamd: ClamdServer, tmp_path: Path, how: str) -> None:
    client = ClamdClient(_address(clamd, how), timeout=10)
    result = await client.scan(_spool(tmp_path, _message(b"Careful:\r\n" + eicar() + b"\r\n")))
    assert result.status is ClamdStatus.INFECTED
    assert result.signatures == (DETECTED_AS,)
    assert DETECTED_AS in result.text


@pytest.mark.parametrize("how", TRANSPORTS)
async def test_eicar_base64_attachment_is_infected(clamd: ClamdServer, tmp_path: Path,
                                                   how: str) -> None:
    data = _with_attachment(eicar(), "eicar.com")
    assert eicar() not in data  # only the decoded attachment holds it
    result = await ClamdClient(_address(clamd, how), timeout=10).scan(_spool(tmp_path, data))
    assert result.status is ClamdStatus.INFECTED
    assert result.signatures == (DETECTED_AS,)


async def test_clean_attachment_is_clean(clamd: ClamdServer, tmp_path: Path) -> None:
    data = _with_attachment(b"just a harmless file\n" * 100, "notes.txt")
    result = await ClamdClient(clamd.address, timeout=10).scan(_spool(tmp_path, data))
    assert result.status is ClamdStatus.CLEAN


@pytest.mark.parametrize("how", TRANSPORTS)
async def test_over_stream_max_length_is_too_large(clamd: ClamdServer, tmp_path: Path,
                                                  how: str) -> None:
    # 3 MiB against StreamMaxLength 1M; with the virus at the end, a "clean" or "infected"
    # answer would mean the limit was not what stopped the scan
    data = _message(b"x" * 76 + b"\r\n") + (b"y" * 76 + b"\r\n") * 42000 + eicar() + b"\r\n"
    assert len(data) > 3 * 1024 * 1024
    started = time.monotonic()
    result = await ClamdClient(_address(clamd, how), timeout=10).scan(_spool(tmp_path, data))
    assert result.status is ClamdStatus.TOO_LARGE
    assert "size limit exceeded" in result.text
    assert not result.infected
    assert time.monotonic() - started < 5


async def test_scan_from_open_file_reads_from_its_position(clamd: ClamdServer,
                                                           tmp_path: Path) -> None:
    """A caller's file object is scanned from where it stands and left open for it."""
    path = _spool(tmp_path, eicar() + b"\r\n" + _message(b"clean body\r\n"))
    client = ClamdClient(clamd.unix_address, timeout=10)
    with open(path, "rb") as f:
        f.seek(len(eicar()) + 2)
        assert (await client.scan(f)).status is ClamdStatus.CLEAN
        assert not f.closed
        f.seek(0)
        assert (await client.scan(f)).status is ClamdStatus.INFECTED
    assert (await client.scan(io.BytesIO(_message(eicar())))).infected


@pytest.mark.parametrize("how", TRANSPORTS)
async def test_ping_and_version(clamd: ClamdServer, how: str) -> None:
    client = ClamdClient(_address(clamd, how), timeout=5)
    await client.ping()
    assert (await client.version()).startswith("ClamAV 1.")


async def test_host_name_is_resolved(clamd: ClamdServer, tmp_path: Path) -> None:
    client = ClamdClient(f"localhost:{clamd.port}", timeout=5)
    assert (await client.scan(_spool(tmp_path, _message(eicar())))).signatures == (DETECTED_AS,)


async def test_many_scans_at_once_all_answered(clamd: ClamdServer, tmp_path: Path) -> None:
    clean = _spool(tmp_path, _message(b"fine\r\n"), "clean")
    bad = _spool(tmp_path, _message(eicar()), "bad")
    client = ClamdClient(clamd.address, timeout=20, max_in_flight=4)
    results = await asyncio.gather(*(client.scan(bad if i % 3 == 0 else clean)
                                     for i in range(30)))
    assert [r.infected for r in results] == [i % 3 == 0 for i in range(30)]
    assert client.in_flight == 0


async def test_stopped_clamd_is_an_error_not_a_timeout(tmp_path: Path) -> None:
    server = ClamdServer(port=free_port())
    server.start()
    addresses = [server.address, server.unix_address]
    await ClamdClient(addresses[0], timeout=5).ping()
    server.stop()
    msg = _spool(tmp_path, _message(b"hello\r\n"))
    for address in addresses:
        started = time.monotonic()
        with pytest.raises(ScannerError, match="cannot connect") as info:
            await ClamdClient(address, timeout=5).scan(msg)
        assert info.value.timeout is False
        assert time.monotonic() - started < 1
        with pytest.raises(ScannerError):
            await ClamdClient(address, timeout=5).ping()


# --- misbehaving servers ---------------------------------------------------------------------

class _FakeClamd:
    """A TCP server that reads what it gets and answers ``reply`` after ``delay`` seconds
    (never, when ``reply`` is None); counts the connections it holds at once."""

    def __init__(self, reply: bytes | None, delay: float = 0.0, read: bool = True,
                 host: str = "127.0.0.1") -> None:
        self.host = host
        self.reply = reply
        self.delay = delay
        self.read = read
        self.now = 0
        self.peak = 0
        self.served = 0
        self.server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._release = asyncio.Event()

    @property
    def address(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            if self.read:
                while True:  # up to the zero-length chunk (or EOF)
                    data = await reader.read(65536)
                    if not data or data.endswith(b"\0\0\0\0") or data.endswith(b"PING\0"):
                        break
            if self.reply is None:
                await self._release.wait()  # until the test is over
                return
            await asyncio.sleep(self.delay)
            writer.write(self.reply)
            await writer.drain()
            self.served += 1
        finally:
            self.now -= 1
            self._handlers.discard(task)
            writer.close()

    async def __aenter__(self) -> _FakeClamd:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        self._release.set()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self.server.wait_closed()


@pytest.fixture
async def hanging() -> AsyncIterator[_FakeClamd]:
    async with _FakeClamd(None) as server:
        yield server


async def test_server_that_never_answers_times_out_within_the_limit(
        hanging: _FakeClamd, tmp_path: Path) -> None:
    client = ClamdClient(hanging.address, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(ScannerError, match=r"within 0\.5s") as info:
        await client.scan(_spool(tmp_path, _message(b"hello\r\n")))
    elapsed = time.monotonic() - started
    assert info.value.timeout is True
    assert 0.45 < elapsed < 1.5
    with pytest.raises(ScannerError) as info:
        await client.ping()
    assert info.value.timeout is True
    assert client.in_flight == 0


async def test_server_that_stops_reading_times_out(tmp_path: Path) -> None:
    """clamd stuck mid-stream: our send blocks once the socket buffers fill; the limit holds."""
    big = _spool(tmp_path, _message(b"z" * 78 + b"\r\n") + (b"z" * 78 + b"\r\n") * 200000)
    async with _FakeClamd(None, read=False) as server:
        started = time.monotonic()
        with pytest.raises(ScannerError, match="within") as info:
            await ClamdClient(server.address, timeout=0.5).scan(big)
        assert info.value.timeout is True
        assert time.monotonic() - started < 1.5


async def test_garbage_reply_is_an_error(tmp_path: Path) -> None:
    async with _FakeClamd(b"HTTP/1.1 400 Bad Request\r\n\r\n") as server:
        with pytest.raises(ScannerError, match="not a clamd reply") as info:
            await ClamdClient(server.address, timeout=2).scan(_spool(tmp_path, _message(b"x")))
        assert info.value.timeout is False


async def test_silent_close_is_an_error(tmp_path: Path) -> None:
    async with _FakeClamd(b"") as server:
        with pytest.raises(ScannerError, match="without a reply") as info:
            await ClamdClient(server.address, timeout=2).scan(_spool(tmp_path, _message(b"x")))
        assert info.value.timeout is False


async def test_cap_on_scans_in_flight_holds(tmp_path: Path) -> None:
    msg = _spool(tmp_path, _message(b"hello\r\n"))
    async with _FakeClamd(b"stream: OK\0", delay=0.05) as server:
        client = ClamdClient(server.address, timeout=10, max_in_flight=3)
        results = await asyncio.gather(*(client.scan(msg) for _ in range(20)))
        assert all(r.status is ClamdStatus.CLEAN for r in results)
        assert server.served == 20
        assert server.peak == 3  # the cap, and reached: the burst did queue on it


async def test_waiting_for_a_slot_counts_against_the_limit(hanging: _FakeClamd,
                                                           tmp_path: Path) -> None:
    client = ClamdClient(hanging.address, timeout=0.5, max_in_flight=1)
    msg = _spool(tmp_path, _message(b"hello\r\n"))
    started = time.monotonic()
    first, second = await asyncio.gather(client.scan(msg), client.scan(msg),
                                         return_exceptions=True)
    assert isinstance(first, ScannerError) and first.timeout
    assert isinstance(second, ScannerError) and second.timeout
    assert "free slot" in str(second)
    assert time.monotonic() - started < 1.5
    assert hanging.peak == 1


async def test_ipv6_address(tmp_path: Path) -> None:
    async with _FakeClamd(b"stream: Some.Sig FOUND\0", host="::1") as server:
        assert server.address.startswith("[::1]:")
        result = await ClamdClient(server.address, timeout=2).scan(_spool(tmp_path, _message(b"x")))
        assert result.signatures == ("Some.Sig",)
        assert server.served == 1
