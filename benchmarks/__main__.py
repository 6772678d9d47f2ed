"""``python -m benchmarks``: run scenarios for several rounds and report medians.

The machine the project runs on is shared and noisy, so one run means little: every client
runs ``--rounds`` times, interleaved (loadgen, smtp-source, loadgen, ...) so that a slow
minute hits both, and the table shows the median of each column. The table goes to stdout
and to ``benchmarks/results/latest.md`` together with the machine it was measured on, since a
figure without its machine cannot be compared with anything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from benchmarks.scenarios import SCENARIOS, SMTP_SOURCE, BenchmarkError, LoadOptions, RoundResult

RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"


def _runner() -> tuple[str, Callable[[Coroutine[Any, Any, Any]], Any]]:
    """uvloop when installed: the Python client then gets closer to smtp-source's rate."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return "asyncio", asyncio.run
    return "uvloop", uvloop.run


def machine_info(loop_name: str) -> list[str]:
    """What the numbers depend on: cores, CPU model, Python, event loop of the client."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- nproc: {cpus}",
        f"- cpu: {model}",
        f"- python: {platform.python_version()} ({platform.python_implementation()}), "
        f"client loop: {loop_name}",
        f"- kernel: {platform.system()} {platform.release()}",
    ]


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None or value != value:  # None or NaN
        return "–"
    return f"{value:,.{digits}f}"


def table(results: dict[tuple[str, str], list[RoundResult]]) -> list[str]:
    """One markdown row per (scenario, client): medians over its rounds."""
    rows = [
        "| scenario | client | rounds | messages | accepted msg/s | delivered msg/s "
        "| p50 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (scenario, client), rounds in results.items():
        rows.append(
            f"| {scenario} | {client} | {len(rounds)} | {rounds[0].messages} "
            f"| {_fmt(_median([r.accepted_per_s for r in rounds]))} "
            f"| {_fmt(_median([r.delivered_per_s for r in rounds]))} "
            f"| {_fmt(_median([r.p50_ms for r in rounds]), 2)} "
            f"| {_fmt(_median([r.p99_ms for r in rounds]), 2)} "
            f"| {_fmt(_median([float(r.errors) for r in rounds]))} |"
        )
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", action="append", choices=sorted(SCENARIOS),
                   help="scenario to run; repeatable (default: accept-deliver)")
    p.add_argument("--sessions", type=int, default=20, help="concurrent sessions (%(default)s)")
    p.add_argument("--messages", type=int, default=2000, help="messages in total (%(default)s)")
    p.add_argument("--per-session", type=int, default=1,
                   help="messages per connection (%(default)s)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (%(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; medians reported (%(default)s)")
    p.add_argument("--no-pipelining", action="store_true",
                   help="one command per write even when the server offers PIPELINING")
    p.add_argument("--smtp-source", action="store_true",
                   help=f"also run the same load with {SMTP_SOURCE} (Debian package postfix)")
    p.add_argument("--deliver-timeout", type=float, default=120.0,
                   help="seconds to wait for all accepted messages in the maildir")
    p.add_argument("--output", type=Path, default=RESULTS, help="markdown file (%(default)s)")
    return p.parse_args(argv)


async def run_all(args: argparse.Namespace) -> dict[tuple[str, str], list[RoundResult]]:
    """Every round runs every client once per scenario; each on a fresh server."""
    opts = LoadOptions(
        sessions=args.sessions, messages=args.messages, per_session=args.per_session,
        size=args.size, pipelining=not args.no_pipelining, deliver_timeout=args.deliver_timeout,
    )
    clients = ["loadgen"]
    if args.smtp_source:
        if SMTP_SOURCE.exists():
            clients.append("smtp-source")
        else:
            print(f"warning: {SMTP_SOURCE} not installed; skipping it", file=sys.stderr)
    results: dict[tuple[str, str], list[RoundResult]] = {}
    for n in range(1, args.rounds + 1):
        for scenario in args.scenario or ["accept-deliver"]:
            for client in clients:
                r = await SCENARIOS[scenario](client, opts)
                results.setdefault((scenario, client), []).append(r)
                delivered = _fmt(r.delivered_per_s)
                print(f"round {n}: {scenario} / {client}: {_fmt(r.accepted_per_s)} accepted/s, "
                      f"{delivered} delivered/s, errors {r.errors}", file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write it with the machine description; 1 on a setup failure."""
    args = parse_args(argv)
    if min(args.sessions, args.messages, args.per_session, args.size, args.rounds) < 1:
        print("error: numeric options must be >= 1", file=sys.stderr)
        return 2
    loop_name, run = _runner()
    try:
        results = run(run_all(args))
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    load = (f"{args.sessions} sessions, {args.messages} messages, {args.per_session} per "
            f"session, {args.size} bytes, pipelining {'off' if args.no_pipelining else 'on'}, "
            f"median of {args.rounds} rounds")
    lines = table(results)
    print("\n".join(lines))
    doc = ["# pymta benchmark results", "", f"Load: {load}.", "", *machine_info(loop_name), "",
           *lines, "", f"Command: `python -m benchmarks {' '.join(sys.argv[1:])}`", ""]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(doc))
    print(f"\nwritten to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
