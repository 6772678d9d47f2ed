"""The queue-design benchmark (benchmarks/store_designs.py) still runs, and its log format
reads back what it wrote.

The benchmark is run as a user runs it, with a tiny load, so that it cannot rot between the
measurements of issue 14; no timing is asserted (numbers belong in benchmarks/results/). The
log's records are checked the way a restart would read them: torn tails and the records a
recycled segment still holds from its previous use must not come back as messages.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from benchmarks.store_designs import (
    _SEG_HEADER,
    SEGMENT_MAGIC,
    encode_commit,
    encode_done,
    read_segment,
    replay,
)

REPO = Path(__file__).resolve().parents[2]
DESIGNS = ["files", "sqlite", "sqlite-flock", "lmdb", "log", "log-recycled", "none"]


def test_benchmark_runs_every_design_and_leaves_each_store_empty(tmp_path: Path) -> None:
    out = tmp_path / "results.md"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.store_designs", "--messages", "60",
         "--committers", "3", "--processes", "2", "--rounds", "1", "--alone-messages", "10",
         "--warmup", "5", "--designs", ",".join(DESIGNS), "--dir", str(tmp_path),
         "--output", str(out), "--server-ms", "2.0"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = out.read_text()
    assert text.startswith("# Queue designs side by side")
    rows = {m[1]: m[0] for m in re.finditer(r"^\| ([a-z-]+) \|.*$", text, re.M)
            if m[1] != "design"}
    assert sorted(rows) == sorted(DESIGNS)
    header = next(line for line in text.splitlines() if line.startswith("| design |"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    for row in rows.values():
        cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True))
        assert float(cells["commits/s"].replace(",", "")) > 0, row
        assert float(cells["alone commits/s"].replace(",", "")) > 0, row
        assert float(cells["own"]) >= float(cells["process"].split()[0]), row
    # The store of each design was checked empty after the run (every message removed).
    assert "tmp/, data/, env/ empty" in rows["files"]
    assert "0 rows" in rows["sqlite"] and "0 rows" in rows["sqlite-flock"]
    assert "0 entries" in rows["lmdb"]
    assert "replayed: 0 queued" in rows["log"] and "replayed: 0 queued" in rows["log-recycled"]
    assert "- End to end (server 2.000 ms/msg today" in text
    assert re.search(r"^- Rule \(a log of our own must spend > 15 % less .*-> "
                     r"(build the log|keep SQLite)", text, re.M)
    assert not list(tmp_path.glob("store-*")), "run directories left behind"


def _segment(seq: int, *records: bytes) -> bytes:
    return _SEG_HEADER.pack(SEGMENT_MAGIC, seq) + b"".join(records)


def test_log_replay_keeps_commits_without_done_and_drops_a_torn_tail(tmp_path: Path) -> None:
    a = b"".join(encode_commit(7, b"A", b"env-a", b"body a"))
    b = b"".join(encode_commit(7, b"B", b"env-b", b"body b" * 100))
    c = b"".join(encode_commit(7, b"C", b"env-c", b"body c"))
    data = _segment(7, a, b, encode_done(7, b"A"), c)
    (tmp_path / "1.seg").write_bytes(data[:-3])      # the last write was torn
    live = replay(tmp_path)
    assert list(live) == [b"B"]
    assert (live[b"B"].envelope, live[b"B"].body) == (b"env-b", b"body b" * 100)
    # The whole segment: C is there too.
    (tmp_path / "1.seg").write_bytes(data)
    assert sorted(replay(tmp_path)) == [b"B", b"C"]


def test_recycled_segment_ignores_the_previous_use_behind_its_end() -> None:
    old = _segment(3, *(b"".join(encode_commit(3, q, b"e", b"x" * 50)) for q in (b"O1", b"O2")))
    new = _segment(9, b"".join(encode_commit(9, b"N1", b"e", b"y")))
    reused = new + old[len(new):]                   # overwritten from the start
    seq, records = read_segment(reused)
    assert seq == 9
    assert [r.qid for r in records] == [b"N1"]
    # A flipped bit is caught by the CRC, and reading stops there.
    bad = bytearray(new)
    bad[-1] ^= 1
    assert read_segment(bytes(bad))[1] == []
    # A spare segment made ahead (all zeros) holds nothing.
    assert read_segment(bytes(4096)) == (0, [])
