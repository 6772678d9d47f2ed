"""``python -m benchmarks``: run scenarios for several rounds and report medians.

The machine the project runs on is shared and noisy, so one run means little: every client
runs ``--rounds`` times, interleaved (loadgen, smtp-source, loadgen, ...) so that a slow
minute hits both, and the table shows the median of each column. The table goes to stdout
and to ``benchmarks/results/latest.md`` together with the machine it was measured on, since a
figure without its machine cannot be compared with anything.

The side-by-side scenarios against Postfix (``accept``, ``end-to-end``, ``sweep``, ``latency``,
``relay-through``) and the memory scenarios (``memory-idle``, ``memory-large``,
``memory-relay``) live in ``benchmarks/compare.py``, ``benchmarks/relay.py`` and
``benchmarks/memory.py``; ``--all`` runs all of them and writes
``benchmarks/results/<date>.md``, ``latest.md`` and the plot ``latest.png``. The relay
scenarios (issue 15) also write ``relay-through.md``, and only that when run alone.

``content`` (``benchmarks/content.py``, not part of ``--all``: it installs and runs the image's
Postfix + amavisd-new stack) sets pymta's content filter side by side with that stack and
writes ``benchmarks/results/content.md``; ``content-corpus`` (``benchmarks/corpus.py``) sends
them a mixed corpus (ham, GTUBE, EICAR, a banned attachment), compares their verdicts and
writes ``benchmarks/results/content-corpus.md``.
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

from benchmarks.compare import COMPARE_SCENARIOS, CompareOptions, main_compare
from benchmarks.content import PLAIN_REV, RECIPE_ENV, ContentOptions, main_content
from benchmarks.corpus import main_corpus
from benchmarks.scenarios import SCENARIOS, SMTP_SOURCE, BenchmarkError, LoadOptions, RoundResult

RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"
CONTENT = "content"
CORPUS = "content-corpus"


def _runner() -> tuple[str, Callable[[Coroutine[Any, Any, Any]], Any]]:
    """uvloop when installed: the Python client then gets closer to smtp-source's rate."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return "asyncio", asyncio.run
    return "uvloop", uvloop.run


def machine_info(loop_name: str) -> list[str]:
    """What the numbers depend on: cores, CPU model, Python, event loop of the client."""
    from benchmarks.report import cpu_model, usable_cores

    model, cpus = cpu_model(), usable_cores()
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
    p.add_argument("--scenario", action="append",
                   choices=sorted(SCENARIOS) + list(COMPARE_SCENARIOS) + [CONTENT, CORPUS],
                   help="scenario to run; repeatable (default: accept-deliver)")
    p.add_argument("--all", action="store_true",
                   help="every pymta-vs-Postfix and memory scenario: "
                        + ", ".join(COMPARE_SCENARIOS))
    p.add_argument("--sessions", type=int, default=20, help="concurrent sessions (%(default)s)")
    p.add_argument("--messages", type=int, default=None,
                   help="messages in total per run (2000; 5000 for accept/end-to-end)")
    p.add_argument("--per-session", type=int, default=1,
                   help="messages per connection (%(default)s)")
    p.add_argument("--size", type=int, default=4096, help="message size in bytes (%(default)s)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds; medians reported (3; 5 for accept/end-to-end)")
    p.add_argument("--no-pipelining", action="store_true",
                   help="one command per write even when the server offers PIPELINING")
    p.add_argument("--smtp-source", action="store_true",
                   help=f"also run the same load with {SMTP_SOURCE} (Debian package postfix)")
    p.add_argument("--deliver-timeout", type=float, default=120.0,
                   help="seconds to wait for all accepted messages in the maildir")
    p.add_argument("--output", type=Path, default=RESULTS, help="markdown file (%(default)s)")
    side = p.add_argument_group("side by side with Postfix, memory (benchmarks/compare.py)")
    side.add_argument("--workers", type=int, default=None,
                      help="PYMTA_WORKERS for the pymta server (default: its own default)")
    side.add_argument("--server-loop", choices=("auto", "asyncio"), default="auto",
                      help="auto: pymta uses uvloop when installed; asyncio: hide uvloop "
                           "from the server (%(default)s)")
    side.add_argument("--no-postfix", action="store_true", help="measure pymta only")
    side.add_argument("--no-install", action="store_true",
                      help="do not apt-get install postfix when it is missing")
    side.add_argument("--sweep-rounds", type=int, default=3, help="(%(default)s)")
    side.add_argument("--sweep-messages", type=int, default=2000,
                      help="messages per sweep point, at most (%(default)s)")
    side.add_argument("--sweep-levels", default="1,5,20,50,100",
                      help="concurrency levels of the sweep (%(default)s)")
    side.add_argument("--sweep-held", action="store_true",
                      help="sweep with delivery paused (as accept); default: delivery running")
    side.add_argument("--latency-rounds", type=int, default=3, help="(%(default)s)")
    side.add_argument("--latency-seconds", type=float, default=5.0,
                      help="length of one paced latency run (%(default)s)")
    side.add_argument("--idle-connections", type=int, default=10_000, help="(%(default)s)")
    side.add_argument("--large-sessions", type=int, default=50, help="(%(default)s)")
    side.add_argument("--large-size-mb", type=int, default=25, help="(%(default)s)")
    side.add_argument("--results-dir", type=Path, default=RESULTS.parent,
                      help="where <date>.md, latest.md and the plot go (%(default)s)")
    content = p.add_argument_group("content filter vs the image's stack (benchmarks/content.py;"
                                   " --rounds 3, --messages 1000, --workers 2 by default)")
    content.add_argument("--stack-recipe", type=Path,
                         default=os.environ.get(RECIPE_ENV) or None,
                         help="folder of the image's stack recipe (00-install.sh ... "
                              f"90-stop.sh); default ${RECIPE_ENV}; without: pymta rows only")
    content.add_argument("--plain-rev", default=PLAIN_REV,
                         help="pymta before the filter, for the filter-off comparison "
                              "(%(default)s; '' for none)")
    content.add_argument("--amavis-servers", type=int, default=2,
                         help="amavisd-new $max_servers (%(default)s, the image's)")
    content.add_argument("--spamd-children", type=int, default=4,
                         help="spamd --max-children (%(default)s: enough for 2 cores)")
    content.add_argument("--rspamd-workers", type=int, default=2,
                         help="rspamd normal workers (%(default)s)")
    content.add_argument("--scanner-concurrency", type=int, default=0,
                         help="PYMTA_SCANNER_CONCURRENCY per worker (default: spamd "
                              "children / workers)")
    return p.parse_args(argv)


def compare_main(args: argparse.Namespace, names: list[str], loop_name: str,
                 run: Callable[[Coroutine[Any, Any, Any]], Any]) -> int:
    """The pymta-vs-Postfix and memory scenarios (benchmarks/compare.py, memory.py)."""
    from benchmarks import postfix

    if args.no_install and not args.no_postfix and not postfix.postfix_installed():
        print("warning: postfix not installed (--no-install): pymta only", file=sys.stderr)
        args.no_postfix = True
    opts = CompareOptions(
        rounds=args.rounds or 5, sessions=args.sessions, messages=args.messages or 5000,
        size=args.size, workers=args.workers, deliver_timeout=args.deliver_timeout,
        sweep_levels=tuple(int(x) for x in args.sweep_levels.split(",") if x.strip()),
        sweep_messages=args.sweep_messages, sweep_rounds=args.sweep_rounds,
        sweep_delivery=not args.sweep_held,
        latency_seconds=args.latency_seconds, latency_rounds=args.latency_rounds,
        postfix=not args.no_postfix, server_loop=args.server_loop,
    )
    command = "python -m benchmarks " + " ".join(sys.argv[1:])
    try:
        return main_compare(names, opts, client_loop=loop_name, command=command.strip(),
                            results_dir=args.results_dir,
                            idle_connections=args.idle_connections,
                            large_sessions=args.large_sessions,
                            large_size_mb=args.large_size_mb, run=run)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def public_argv(argv: list[str]) -> list[str]:
    """The arguments as the results document shows them: the stack recipe's folder is a
    path on this machine, outside the repository, so it is written as ``DIR``."""
    shown, hide = [], False
    for arg in argv:
        shown.append("DIR" if hide else
                     "--stack-recipe=DIR" if arg.startswith("--stack-recipe=") else arg)
        hide = arg == "--stack-recipe"
    return shown


def content_main(args: argparse.Namespace,
                 run: Callable[[Coroutine[Any, Any, Any]], Any], corpus: bool = False) -> int:
    """The content filter against the image's stack (benchmarks/content.py); ``corpus``:
    on the mixed corpus, with the verdicts (benchmarks/corpus.py)."""
    opts = ContentOptions(
        rounds=args.rounds or 3, messages=args.messages or 1000, sessions=args.sessions,
        size=args.size, workers=args.workers or 2, spamd_children=args.spamd_children,
        rspamd_workers=args.rspamd_workers, scanner_concurrency=args.scanner_concurrency,
        amavis_servers=args.amavis_servers, stack_recipe=args.stack_recipe,
        install=not args.no_install, deliver_timeout=args.deliver_timeout,
        plain_rev=args.plain_rev)
    command = "python -m benchmarks " + " ".join(public_argv(sys.argv[1:]))
    main = main_corpus if corpus else main_content
    try:
        return main(opts, command=command.strip(), results_dir=args.results_dir, run=run)
    except BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


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
                out = await SCENARIOS[scenario](client, opts)
                # a list is one row per result, named by its scenario (pipeline-cost)
                for r in out if isinstance(out, list) else [out]:
                    name = r.scenario if isinstance(out, list) else scenario
                    results.setdefault((name, client), []).append(r)
                    delivered = _fmt(r.delivered_per_s)
                    print(f"round {n}: {name} / {client}: {_fmt(r.accepted_per_s)} "
                          f"accepted/s, {delivered} delivered/s, errors {r.errors}",
                          file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write it with the machine description; 1 on a setup failure."""
    args = parse_args(argv)
    if min(args.sessions, args.messages or 1, args.per_session, args.size,
           args.rounds or 1) < 1:
        print("error: numeric options must be >= 1", file=sys.stderr)
        return 2
    loop_name, run = _runner()
    selected = args.scenario or ([] if args.all else ["accept-deliver"])
    compare = [n for n in COMPARE_SCENARIOS if args.all or n in selected]
    content = CONTENT in selected
    corpus = CORPUS in selected
    selected = [n for n in selected if n not in COMPARE_SCENARIOS and n not in (CONTENT, CORPUS)]
    status = compare_main(args, compare, loop_name, run) if compare else 0
    if content and not status:
        status = content_main(args, run)
    if corpus and not status:
        status = content_main(args, run, corpus=True)
    if not selected or status:
        return status
    args.scenario = selected
    args.rounds = args.rounds or 3
    args.messages = args.messages or 2000
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
