"""pymta's spamd and rspamd clients against the daemons' own command-line clients (``spamc``,
``rspamc``) and PyPI ``aiospamc`` (issue 12): wall time and client CPU per scan of a 4 KiB ham
and a 4 KiB GTUBE message, and scans/s of a burst 8 at a time, against the throwaway spamd and
rspamd of ``tests/services`` (shipped rules, ``--local``; rspamd without redis, DNS to an
unused port, so its network lookups fail at once).

    .venv/bin/pip install aiospamc==1.2.0     # optional, for this measurement only
    .venv/bin/python -m benchmarks.spam_clients [--rounds 5]

Rounds are interleaved (every client once per round, in turn); figures are medians over the
rounds. "CPU" is this process's CPU time per scan (the command-line clients run as child
processes: their CPU is not in it, their start-up is in their wall time). The scanner's own
work dominates and is the same for every client of one scanner.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from pymta.content.rspamd import Envelope, RspamdClient
from pymta.content.spamd import SpamdClient
from tests.services.base import require_binary
from tests.services.rspamd import RspamdServer
from tests.services.spamd import SpamdServer

Scan = Callable[[Path], Awaitable[str]]
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*" + "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _messages(folder: Path) -> dict[str, Path]:
    head = ("Received: from mx.example.org (mx.example.org [192.0.2.10]) by mail.example.com\r\n"
            "From: Alice <alice@example.com>\r\nTo: bob@example.com\r\nSubject: figures\r\n"
            "Date: Sun, 06 Dec 2026 12:00:00 +0000\r\nMessage-ID: <bench@example.com>\r\n\r\n")
    filler = "The quick brown fox jumps over the lazy dog, again and again.\r\n" * 70
    ham = (head + filler).encode()[:4094] + b"\r\n"
    spam = (head + GTUBE + "\r\n" + filler).encode()[:4094] + b"\r\n"
    paths = {"ham": folder / "ham.eml", "GTUBE": folder / "gtube.eml"}
    paths["ham"].write_bytes(ham)
    paths["GTUBE"].write_bytes(spam)
    return paths


async def _command(argv: list[str], path: Path) -> str:
    with open(path, "rb") as f:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=f,
                                                    stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.DEVNULL)
        out, _ = await proc.communicate()
    return out.decode().strip().splitlines()[0] if out.strip() else f"exit {proc.returncode}"


def _spamd_clients(address: str) -> dict[str, Scan]:
    host, port = address.rsplit(":", 1)
    own = SpamdClient(address, timeout=60)
    spamc = require_binary("spamc", "spamc")

    async def run_own(path: Path) -> str:
        r = await own.check(path)
        return f"{r.score:g}/{r.threshold:g}"

    async def run_spamc(path: Path) -> str:     # -c: CHECK, prints score/threshold
        return await _command([spamc, "-d", host, "-p", port, "-c"], path)

    clients = {"pymta SpamdClient (SYMBOLS)": run_own, "spamc -c (CHECK)": run_spamc}
    try:
        import aiospamc  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return clients

    async def run_aiospamc(path: Path) -> str:
        r = await aiospamc.symbols(path.read_bytes(), host=host, port=int(port))
        spam = r.headers["Spam"]
        return f"{spam.score:g}/{spam.threshold:g}"

    clients["aiospamc 1.2.0 symbols"] = run_aiospamc
    return clients


def _rspamd_clients(address: str) -> dict[str, Scan]:
    own = RspamdClient(address, timeout=60)
    rspamc = require_binary("rspamc", "rspamd")
    envelope = Envelope(ip="127.0.0.1", helo="mx.example.org", mail_from="alice@example.com",
                        rcpts=("bob@example.com",))

    async def run_own(path: Path) -> str:
        r = await own.check(path, envelope)
        return f"{r.action} {r.score:g}"

    async def run_rspamc(path: Path) -> str:
        out = await _command([rspamc, "-h", address, "-i", "127.0.0.1", "-F",
                              "alice@example.com", "-r", "bob@example.com", "--json"], path)
        return out[:40]

    return {"pymta RspamdClient (/checkv2)": run_own, "rspamc --json": run_rspamc}


async def _one(scan: Scan, path: Path, times: int) -> tuple[float, float, str]:
    wall, cpu = time.perf_counter(), time.process_time()
    verdict = ""
    for _ in range(times):
        verdict = await scan(path)
    return (time.perf_counter() - wall) / times, (time.process_time() - cpu) / times, verdict


async def _burst(scan: Scan, paths: list[Path], total: int, width: int) -> float:
    gate = asyncio.Semaphore(width)

    async def one(i: int) -> None:
        async with gate:
            await scan(paths[i % len(paths)])

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(total)))
    return total / (time.perf_counter() - start)


async def _measure(name: str, clients: dict[str, Scan], messages: dict[str, Path],
                   rounds: int, repeat: int, burst_total: int) -> list[str]:
    wall: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    burst: dict[str, list[float]] = {}
    verdicts: dict[tuple[str, str], str] = {}
    for scan in clients.values():     # warm-up
        for path in messages.values():
            await scan(path)
    for _ in range(rounds):
        for client, scan in clients.items():
            for kind, path in messages.items():
                w, c, verdict = await _one(scan, path, repeat)
                wall.setdefault((client, kind), []).append(w)
                cpu.setdefault((client, kind), []).append(c)
                verdicts[(client, kind)] = verdict
            burst.setdefault(client, []).append(
                await _burst(scan, list(messages.values()), burst_total, 8))
    lines = [f"**{name}**: {rounds} interleaved rounds, medians; {repeat} scans a round per "
             f"message one after another; burst: {burst_total} scans (ham and GTUBE "
             "alternating), 8 at a time.", "",
             "| client | ham ms/scan | ham CPU ms | GTUBE ms/scan | GTUBE CPU ms | "
             "burst scans/s | verdicts ham / GTUBE |", "|---|---:|---:|---:|---:|---:|---|"]
    for client in clients:
        cells = []
        for kind in messages:
            cells.append(f"{statistics.median(wall[(client, kind)]) * 1000:.1f}")
            cells.append(f"{statistics.median(cpu[(client, kind)]) * 1000:.2f}")
        shown = " / ".join(verdicts[(client, kind)] for kind in messages)
        lines.append(f"| {client} | {' | '.join(cells)} | "
                     f"{statistics.median(burst[client]):.1f} | {shown} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        messages = _messages(Path(tmp))
        with SpamdServer() as spamd:
            out = asyncio.run(_measure(f"spamd {spamd.address}", _spamd_clients(spamd.address),
                                       messages, args.rounds, 10, 40))
        with RspamdServer() as rspamd:
            out += [""] + asyncio.run(_measure(f"rspamd {rspamd.address}",
                                               _rspamd_clients(rspamd.address), messages,
                                               args.rounds, 20, 200))
    print("\n".join(out))


if __name__ == "__main__":
    main()
