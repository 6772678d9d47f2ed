"""Two processes committing to one SQLite WAL database: SQLite's busy handler against a turn
taken with ``flock`` (``pymta.queue.sqlcommit.WriteTurn``).

``python -m benchmarks.write_turn`` runs ``--processes`` writers for ``--seconds`` each round;
every writer commits transactions like a queue batch (``--rows`` inserts of ``--size`` bytes
and a delete, ``synchronous=FULL``), with ``--gap`` seconds between them (the event loop's
time between batches). It prints, per way, the transactions committed and the wait for the
write lock (p50/p99: from asking until ``BEGIN IMMEDIATE`` returned), medians of
``--rounds`` interleaved rounds:

* ``busy handler``: ``BEGIN IMMEDIATE`` with a busy timeout, as SQLite alone does it: a
  writer that finds the database locked sleeps 1, 2, 5, 10 ... ms between tries;
* ``flock turn``: an ``flock`` on ``<db>-turn`` held from ``BEGIN IMMEDIATE`` to ``COMMIT``;
  the kernel wakes the next writer when the holder lets go.

The database is made under ``--dir`` (default: the system's temporary directory), so the
file system there is the one measured.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time

from pymta.queue.sqlcommit import WriteTurn, connect

WAYS = ("busy handler", "flock turn")


def _writer(db: str, turn: bool, seconds: float, rows: int, size: int, gap: float,
            out: multiprocessing.Queue) -> None:        # type: ignore[type-arg]
    con = connect(db)
    writing = WriteTurn(db)
    body = os.urandom(size)
    waits: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        asked = time.perf_counter()
        if turn:
            writing.__enter__()
        con.execute("BEGIN IMMEDIATE")
        waits.append(time.perf_counter() - asked)
        con.executemany("INSERT INTO m (b) VALUES (?)", [(body,)] * rows)
        con.execute("DELETE FROM m WHERE id < (SELECT max(id) - 200 FROM m)")
        con.execute("COMMIT")
        if turn:
            writing.__exit__()
        if gap:
            time.sleep(gap)
    waits.sort()
    out.put((len(waits), waits[len(waits) // 2], waits[int(len(waits) * 0.99)]))
    writing.close()
    con.close()


def one_round(db: str, turn: bool, args: argparse.Namespace) -> tuple[int, float, float]:
    """(transactions, the worst writer's p50 wait, its p99 wait), waits in ms."""
    out: multiprocessing.Queue = multiprocessing.Queue()    # type: ignore[type-arg]
    procs = [multiprocessing.Process(
        target=_writer, args=(db, turn, args.seconds, args.rows, args.size, args.gap, out))
        for _ in range(args.processes)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return (sum(r[0] for r in results), max(r[1] for r in results) * 1000,
            max(r[2] for r in results) * 1000)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.write_turn",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rows", type=int, default=5, help="inserts per transaction")
    ap.add_argument("--size", type=int, default=4096, help="bytes per row")
    ap.add_argument("--gap", type=float, default=0.0005, help="seconds between transactions")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="pymta-turn-", dir=args.dir)
    try:
        db = os.path.join(work, "q.db")
        con = connect(db)
        con.execute("CREATE TABLE m (id INTEGER PRIMARY KEY, b BLOB)")
        con.close()
        got: dict[str, list[tuple[int, float, float]]] = {way: [] for way in WAYS}
        for _ in range(args.rounds):
            for way in WAYS:
                got[way].append(one_round(db, way == "flock turn", args))
        print(f"{args.processes} processes × {args.seconds:g} s, {args.rows} × {args.size} B "
              f"per transaction, medians of {args.rounds} rounds ({work})")
        print("| way | transactions | lock wait p50 ms | lock wait p99 ms |")
        print("|---|---:|---:|---:|")
        for way in WAYS:
            rows = got[way]
            print(f"| {way} | {statistics.median(r[0] for r in rows):,.0f} "
                  f"| {statistics.median(r[1] for r in rows):.2f} "
                  f"| {statistics.median(r[2] for r in rows):.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
