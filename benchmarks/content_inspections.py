"""Cost of the two message inspections of issue 12, :class:`pymta.content.banned.BannedFiles`
and :class:`pymta.content.badheader.BadHeader`, per message read from a spool file: a 4 KiB
text message, and a 10 MB message with 5 base64 attachments (random data: a PDF, a JPEG, a
DOCX, a 1.45 MB zip, which is decoded and listed, and a BIN).

    .venv/bin/python -m benchmarks.content_inspections [--rounds 20]

Rounds are interleaved (every inspection of every message in turn), figures are medians over
the rounds of the time and of this process's CPU time per message. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from pymta.content.badheader import BadHeader
from pymta.content.banned import BannedFiles

HEADER = (b"From: Alice <alice@example.net>\r\nTo: bob@example.com\r\n"
          b"Date: Sun, 6 Dec 2026 12:00:00 +0000\r\nSubject: hello\r\n"
          b"Message-ID: <bench@example.net>\r\nMIME-Version: 1.0\r\n")


def _part(name: str, ctype: str, data: bytes) -> bytes:
    return (f'--b\r\nContent-Type: {ctype}; name="{name}"\r\nContent-Disposition: attachment; '
            f'filename="{name}"\r\nContent-Transfer-Encoding: base64\r\n\r\n').encode() + \
        base64.encodebytes(data).replace(b"\n", b"\r\n")


def messages(folder: Path) -> dict[str, Path]:
    line = b"The quick brown fox jumps over the lazy dog, again and again.\r\n"
    small = HEADER + b"Content-Type: text/plain\r\n\r\n" + line * 60
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data.bin", os.urandom(1_450_000))
        z.writestr("notes.txt", line * 10)
    big = (HEADER + b'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
           + b"--b\r\nContent-Type: text/plain\r\n\r\n" + line * 20
           + _part("report.pdf", "application/pdf", os.urandom(1_450_000))
           + _part("photo.jpg", "image/jpeg", os.urandom(1_450_000))
           + _part("letter.docx", "application/octet-stream", os.urandom(1_450_000))
           + _part("archive.zip", "application/zip", archive.getvalue())
           + _part("blob.bin", "application/octet-stream", os.urandom(1_450_000)) + b"--b--\r\n")
    paths = {}
    for label, raw in (("4 KiB text", small), ("10 MB, 5 attachments", big)):
        path = folder / f"{len(raw)}.eml"
        path.write_bytes(raw)
        paths[label] = path
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    banned, badheader = BannedFiles(), BadHeader()
    checks: dict[str, Callable[[Path], object]] = {
        "BannedFiles": banned.inspect, "BadHeader": badheader.inspect}
    with tempfile.TemporaryDirectory() as tmp:
        paths = messages(Path(tmp))
        wall: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for label, path in paths.items():
                repeat = 200 if path.stat().st_size < 10_000 else 1
                for name, check in checks.items():
                    t0, c0 = time.perf_counter(), time.process_time()
                    for _ in range(repeat):
                        found = check(path)
                    key = (label, name)
                    wall.setdefault(key, []).append((time.perf_counter() - t0) / repeat)
                    cpu.setdefault(key, []).append((time.process_time() - c0) / repeat)
                    assert found == [], found
        print("| message | size | inspection | time/msg (median) | CPU/msg (median) |")
        print("|---|---:|---|---:|---:|")
        for (label, name), times in wall.items():
            size = paths[label].stat().st_size
            print(f"| {label} | {size:,} B | {name} | {statistics.median(times) * 1e3:.3f} ms "
                  f"| {statistics.median(cpu[(label, name)]) * 1e3:.3f} ms |")


if __name__ == "__main__":
    main()
