"""pymta's clamd client against the PyPI ``clamd`` (sync, run in a thread) and ``aioclamd``
clients (issue 12): time and client CPU per ``INSTREAM`` scan of a 4 KiB and a 10 MiB message,
and scans/s of a burst of 4 KiB messages 8 at a time, against one throwaway clamd
(``tests/services/clamd.py``: the test signature only, StreamMaxLength 25M).

    .venv/bin/pip install clamd==1.0.2 aioclamd==1.1.0   # for this measurement only
    .venv/bin/python -m benchmarks.clamd_clients [--rounds 30] [--address tcp|unix]

Rounds are interleaved and short (every client in turn: 10 scans of 4 KiB, one of 10 MiB, one
burst), so load from other processes falls on all clients alike; figures are medians over the
rounds. "CPU" is this process's CPU time (all threads) per scan: the client's cost, clamd's
own CPU is the same for all. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pymta.content.clamd import ClamdClient
from tests.services.clamd import ClamdServer

Scan = Callable[[Path], Awaitable[str]]


def _messages(folder: Path) -> dict[str, Path]:
    text = ("From: a@example.net\r\nTo: b@example.com\r\nSubject: hello\r\n"
            "Message-ID: <bench@example.net>\r\n\r\n")
    small = text + ("The quick brown fox jumps over the lazy dog, again and again.\r\n" * 70)
    payload = base64.encodebytes(os.urandom(7_800_000)).replace(b"\n", b"\r\n")
    big = (text.replace("\r\n\r\n", "\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; "
                        "boundary=\"b\"\r\n\r\n").encode()
           + b"--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--b\r\n"
           b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
           b"Content-Disposition: attachment; filename=\"data.bin\"\r\n\r\n" + payload
           + b"--b--\r\n")
    paths = {"4 KiB": folder / "small.eml", "10 MiB": folder / "big.eml"}
    paths["4 KiB"].write_bytes(small.encode()[:4096])
    paths["10 MiB"].write_bytes(big)
    return paths


def _clients(address: str) -> dict[str, Scan]:
    try:
        import aioclamd  # type: ignore[import-not-found,import-untyped]
        import clamd  # type: ignore[import-not-found,import-untyped]
    except ImportError as e:
        raise SystemExit(f"{e.name} is missing: .venv/bin/pip install clamd==1.0.2 "
                         "aioclamd==1.1.0 (for this measurement only)") from None

    own = ClamdClient(address, timeout=60)
    own256 = ClamdClient(address, timeout=60, chunk_size=256 * 1024)
    pool = ThreadPoolExecutor(8)

    def sync_client() -> object:
        if address.startswith("unix:"):
            return clamd.ClamdUnixSocket(path=address[5:])
        host, port = address.rsplit(":", 1)
        return clamd.ClamdNetworkSocket(host=host, port=int(port), timeout=60)

    async def run_own(path: Path) -> str:
        return (await own.scan(path)).status.value

    async def run_own256(path: Path) -> str:
        return (await own256.scan(path)).status.value

    def sync_scan(path: Path) -> str:
        with open(path, "rb") as f:
            return str(sync_client().instream(f)["stream"][0])  # type: ignore[attr-defined]

    async def run_clamd(path: Path) -> str:
        return await asyncio.get_running_loop().run_in_executor(pool, sync_scan, path)

    async def run_aioclamd(path: Path) -> str:
        host, port = address.rsplit(":", 1)
        client = aioclamd.ClamdAsyncClient(host, int(port), timeout=60)
        with open(path, "rb") as f:
            return str((await client.instream(f))["stream"][0])

    clients: dict[str, Scan] = {
        "pymta (64 KiB chunks)": run_own, "pymta (256 KiB chunks)": run_own256,
        "clamd 1.0.2 (thread)": run_clamd}
    if not address.startswith("unix:"):  # aioclamd speaks TCP only
        clients["aioclamd 1.1.0"] = run_aioclamd
    return clients


async def _one(scan: Scan, path: Path, times: int) -> tuple[float, float, str]:
    """(wall s, CPU s) per scan over ``times`` scans in a row."""
    wall, cpu = time.perf_counter(), time.process_time()
    status = ""
    for _ in range(times):
        status = await scan(path)
    return ((time.perf_counter() - wall) / times, (time.process_time() - cpu) / times, status)


async def _burst(scan: Scan, path: Path, total: int, width: int) -> float:
    """Scans per second of ``total`` scans, ``width`` at a time."""
    gate = asyncio.Semaphore(width)

    async def one() -> None:
        async with gate:
            await scan(path)

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(total)))
    return total / (time.perf_counter() - start)


async def _measure(address: str, rounds: int, folder: Path) -> str:
    messages = _messages(folder)
    clients = _clients(address)
    repeat = {"4 KiB": 10, "10 MiB": 1}
    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    burst: dict[str, list[float]] = {}
    statuses: dict[tuple[str, str], str] = {}
    for scan in clients.values():  # warm-up
        for path in messages.values():
            await scan(path)
    for _ in range(rounds):
        for name, scan in clients.items():
            for size, path in messages.items():
                w, c, status = await _one(scan, path, repeat[size])
                wall.setdefault((name, size), []).append(w)
                cpu.setdefault((name, size), []).append(c)
                statuses[(name, size)] = status
            burst.setdefault(name, []).append(await _burst(scan, messages["4 KiB"], 400, 8))
    lines = [f"clamd {address}, {rounds} interleaved rounds, medians; "
             f"4 KiB: {repeat['4 KiB']} scans a round, 10 MiB "
             f"({messages['10 MiB'].stat().st_size} bytes, base64 attachment): "
             f"{repeat['10 MiB']} a round; burst: 400 scans of 4 KiB, 8 at a time.",
             "",
             "| client | 4 KiB ms/scan | 4 KiB CPU ms/scan | 10 MiB ms/scan | "
             "10 MiB CPU ms/scan | burst 4 KiB scans/s | verdicts |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for name in clients:
        cells = []
        for size in messages:
            cells.append(f"{statistics.median(wall[(name, size)]) * 1000:.2f}")
            cells.append(f"{statistics.median(cpu[(name, size)]) * 1000:.2f}")
        verdicts = "/".join(statuses[(name, size)] for size in messages)
        lines.append(f"| {name} | {' | '.join(cells)} | "
                     f"{statistics.median(burst[name]):.0f} | {verdicts} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--address", choices=["tcp", "unix"], default="tcp")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, ClamdServer(stream_max="25M") as server:
        address = server.address if args.address == "tcp" else server.unix_address
        print(asyncio.run(_measure(address, args.rounds, Path(tmp))))


if __name__ == "__main__":
    main()
