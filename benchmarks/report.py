"""Rendering of the side-by-side results: medians, ratios, markdown tables, the PNG plot.

Pure functions over plain data (no servers, no timing), so they are unit-tested
(``tests/unit/test_bench_report.py``); ``benchmarks/compare.py`` fills the data.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.floor import CpuCost

PYMTA = "pymta"
POSTFIX = "postfix"


def median(values: Iterable[float | None]) -> float | None:
    """Median of the values that were measured (None and NaN are skipped); None if none."""
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing or b is zero."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt(value: float | None, digits: int = 0, suffix: str = "") -> str:
    """Thousands separators, fixed digits; an en dash for "not measured"."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def verdict(value: float | None, target: float, higher_is_better: bool = True) -> str:
    """"met" / "not met" against a target, "–" when the value is missing."""
    if value is None:
        return "–"
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "not met"


@dataclass
class Results:
    """Everything one ``python -m benchmarks`` run measured, each as a list over rounds.

    ``throughput[(metric, load)][server]``: msg/s per round ("accept" or "end-to-end").
    ``sweep[sessions][server]``: accepted msg/s per round at that concurrency.
    ``latency[server]``: per round a dict with rate/achieved/p50/p99 (ms).
    ``memory``: named figures (see ``memory.py``), one dict per scenario.
    """

    throughput: dict[tuple[str, str], dict[str, list[float]]] = field(default_factory=dict)
    sweep: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    sweep_client: str = ""
    latency: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    memory: dict[str, dict[str, float]] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    # cpu[(metric, load)][server]: machine CPU per message per round (see floor.py)
    cpu: dict[tuple[str, str], dict[str, list[CpuCost]]] = field(default_factory=dict)
    # floor[name]: the least CPU per message (floor.py), per round
    floor: dict[str, list[CpuCost]] = field(default_factory=dict)

    def add_cpu(self, metric: str, load: str, server: str, cost: CpuCost) -> None:
        self.cpu.setdefault((metric, load), {}).setdefault(server, []).append(cost)

    def add_throughput(self, metric: str, load: str, server: str, value: float | None) -> None:
        if value is not None:
            self.throughput.setdefault((metric, load), {}).setdefault(server, []).append(value)

    def add_sweep(self, sessions: int, server: str, value: float) -> None:
        self.sweep.setdefault(sessions, {}).setdefault(server, []).append(value)

    def add_errors(self, what: str, count: int) -> None:
        if count:
            self.errors[what] = self.errors.get(what, 0) + count


# Issue 14: accept ≥ 3×, end-to-end ≥ 2×; issue 15: relay-through ≥ 2× Postfix.
TARGETS = {"accept": 3.0, "end-to-end": 2.0, "relay-through": 2.0}


def throughput_table(results: Results) -> list[str]:
    """Medians per (metric, load) for both servers and the ratio pymta/Postfix."""
    rows = ["| measure | load | rounds | pymta msg/s | Postfix msg/s | pymta/Postfix "
            "| target | |",
            "|---|---|---:|---:|---:|---:|---:|---|"]
    for (metric, load), by_server in results.throughput.items():
        mine, theirs = median(by_server.get(PYMTA, [])), median(by_server.get(POSTFIX, []))
        r = ratio(mine, theirs)
        target = TARGETS.get(metric)
        rounds = max((len(v) for v in by_server.values()), default=0)
        rows.append(
            f"| {metric} | {load} | {rounds} | {fmt(mine)} | {fmt(theirs)} | {fmt(r, 2, '×')} "
            f"| {fmt(target, 0, '×') if target else ''} "
            f"| {verdict(r, target) if target else ''} |")
    return rows


def _cpu_median(costs: Sequence[CpuCost]) -> tuple[float | None, float | None, float | None]:
    """Medians of (user, system, idle) ms per message."""
    return (median(c.user_ms for c in costs), median(c.system_ms for c in costs),
            median(c.idle_ms for c in costs))


def _busy(costs: Sequence[CpuCost]) -> float | None:
    return median(c.busy_ms for c in costs)


def cpu_table(results: Results) -> list[str]:
    """Machine CPU per message in the throughput runs (all processes, load generator too)."""
    rows = ["| measure | load | server | user ms | system ms | busy ms (user + system) "
            "| idle ms |", "|---|---|---|---:|---:|---:|---:|"]
    for (metric, load), by_server in results.cpu.items():
        for server in (PYMTA, POSTFIX):
            costs = by_server.get(server)
            if not costs:
                continue
            user, system, idle = _cpu_median(costs)
            rows.append(f"| {metric} | {load} | {server} | {fmt(user, 3)} | {fmt(system, 3)} "
                        f"| {fmt(_busy(costs), 3)} | {fmt(idle, 3)} |")
    return rows


FLOOR_OF = {"accept": ("smtp-sink", "queue files"),
            "end-to-end": ("smtp-sink", "queue + maildir"),
            # two SMTP hops (client → server, server → sink) and the queue files
            "relay-through": ("smtp-sink", "smtp-sink", "queue files")}


def floor_table(results: Results) -> list[str]:
    """The floor measurements themselves."""
    rows = ["| floor | user ms | system ms | busy ms |", "|---|---:|---:|---:|"]
    for name, costs in results.floor.items():
        user, system, _ = _cpu_median(costs)
        rows.append(f"| {name} | {fmt(user, 3)} | {fmt(system, 3)} | {fmt(_busy(costs), 3)} |")
    return rows


def budget_table(results: Results) -> list[str]:
    """Per target: the CPU per message it allows pymta (Postfix's busy CPU per message / the
    ratio), the floor no server can go below, and where pymta is. Only the smtp-source loads:
    the floor's client is smtp-source (our Python loadgen costs more CPU per message itself)."""
    rows = ["| measure | load | Postfix busy ms | target | budget for pymta ms | floor ms "
            "| pymta busy ms | best ratio at the floor |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for (metric, load), by_server in results.cpu.items():
        target = TARGETS.get(metric)
        parts = FLOOR_OF.get(metric, ())
        floors = [_busy(results.floor.get(p, [])) for p in parts]
        floor = None if not parts or None in floors else sum(f for f in floors if f)
        theirs, mine = _busy(by_server.get(POSTFIX, [])), _busy(by_server.get(PYMTA, []))
        if target is None or theirs is None or not load.startswith("smtp-source"):
            continue
        rows.append(f"| {metric} | {load} | {fmt(theirs, 3)} | {fmt(target, 0, '×')} "
                    f"| {fmt(theirs / target, 3)} | {fmt(floor, 3)} | {fmt(mine, 3)} "
                    f"| {fmt(ratio(theirs, floor), 2, '×')} |")
    return rows


# Issue 14: at 1 and 5 concurrent sessions at least as fast as Postfix.
SWEEP_TARGETS = {1: 1.0, 5: 1.0}
# Issue 14: p99 end of DATA → 250 at half of peak; p50 at most this times Postfix's.
LATENCY_P99_MS = 5.0
LATENCY_P50_RATIO = 1.5


def sweep_table(results: Results) -> list[str]:
    """Accepted msg/s per concurrency level, both servers, with the ratio."""
    rows = ["| sessions | pymta msg/s | Postfix msg/s | pymta/Postfix | target | |",
            "|---:|---:|---:|---:|---:|---|"]
    for sessions in sorted(results.sweep):
        by_server = results.sweep[sessions]
        mine, theirs = median(by_server.get(PYMTA, [])), median(by_server.get(POSTFIX, []))
        r = ratio(mine, theirs)
        target = SWEEP_TARGETS.get(sessions)
        rows.append(f"| {sessions} | {fmt(mine)} | {fmt(theirs)} | {fmt(r, 2, '×')} "
                    f"| {fmt(target, 1, '×') if target else ''} "
                    f"| {verdict(r, target) if target else ''} |")
    return rows


def latency_table(results: Results, target_ms: float = LATENCY_P99_MS) -> list[str]:
    """End-of-DATA → 250 latency at half of each server's own peak accept rate."""
    rows = ["| server | offered msg/s | achieved msg/s | p50 ms | p99 ms | rounds | "
            f"p99 ≤ {target_ms:g} ms | p50 ≤ {LATENCY_P50_RATIO:g}× Postfix's |",
            "|---|---:|---:|---:|---:|---:|---|---|"]
    p50s = {server: median(r["p50_ms"] for r in rounds)
            for server, rounds in results.latency.items()}
    theirs = p50s.get(POSTFIX)
    for server, rounds in results.latency.items():
        p99 = median(r["p99_ms"] for r in rounds)
        mine = server == PYMTA
        p50_verdict = (verdict(p50s[server], theirs * LATENCY_P50_RATIO, higher_is_better=False)
                       if mine and theirs is not None else "")
        rows.append(
            f"| {server} | {fmt(median(r['rate'] for r in rounds))} "
            f"| {fmt(median(r['achieved'] for r in rounds))} "
            f"| {fmt(p50s[server], 2)} | {fmt(p99, 2)} | {len(rounds)} "
            f"| {verdict(p99, target_ms, higher_is_better=False) if mine else ''} "
            f"| {p50_verdict} |")
    return rows


MEMORY_ROWS: Sequence[tuple[str, str, str, int, float | None, bool]] = (
    # (scenario, key, label, digits, target, higher is better)
    ("idle", "connections", "idle connections held open", 0, None, True),
    ("idle", "workers", "server processes (supervisor + workers)", 0, None, True),
    ("idle", "baseline_rss_mb", "RSS before, MB (all server processes)", 1, None, True),
    ("idle", "rss_mb", "RSS with the connections open, MB", 1, None, True),
    ("idle", "kb_per_conn_rss", "RSS per idle connection, KB", 2, 5.0, False),
    ("idle", "kb_per_conn_pss", "PSS per idle connection, KB", 2, None, False),
    ("large", "messages", "messages in flight × size MB", 0, None, True),
    ("large", "accepted", "accepted", 0, None, True),
    ("large", "baseline_rss_mb", "RSS before, MB", 1, None, True),
    ("large", "peak_rss_mb", "peak RSS while receiving and delivering, MB", 1, None, True),
    ("large", "growth_mb", "RSS growth, MB", 1, 15.0, False),
    ("relay", "messages", "messages in flight × size MB, relayed to the sink", 0, None, True),
    ("relay", "accepted", "accepted", 0, None, True),
    ("relay", "delivered", "relayed (taken by the sink)", 0, None, True),
    ("relay", "relayed_mb", "MB the sink took", 0, None, True),
    ("relay", "baseline_rss_mb", "RSS before, MB", 1, None, True),
    ("relay", "peak_rss_mb", "peak RSS while receiving and relaying, MB", 1, None, True),
    # issue 15: "memory flat"; the bar is memory-large's
    ("relay", "growth_mb", "RSS growth, MB", 1, 15.0, False),
)


def memory_table(results: Results) -> list[str]:
    """The memory figures of pymta (Postfix is not measured here: one process per session)."""
    rows = ["| scenario | figure | value | target | |", "|---|---|---:|---:|---|"]
    for scenario, key, label, digits, target, higher in MEMORY_ROWS:
        figures = results.memory.get(scenario)
        if not figures or key not in figures:
            continue
        value: float | None = figures[key]
        shown = fmt(value, digits)
        if key == "messages":
            shown = f"{fmt(value)} × {fmt(figures.get('size_mb'))}"
        rows.append(f"| {scenario} | {label} | {shown} | {fmt(target, 0) if target else ''} "
                    f"| {verdict(value, target, higher) if target else ''} |")
    return rows


def cpu_model() -> str:
    """The processor's name from /proc/cpuinfo ("unknown" elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def usable_cores() -> int | None:
    """Cores this process may run on (the affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def machine_info(*, client_loop: str, server_loop: str, workers: str, postfix: str) -> list[str]:
    """What the numbers depend on, as markdown bullet lines."""
    model, cpus = cpu_model(), usable_cores()
    return [
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- cores: {cpus} ({model})",
        f"- kernel: {platform.system()} {platform.release()}",
        f"- python: {platform.python_version()} ({platform.python_implementation()})",
        f"- pymta workers: {workers}; server event loop: {server_loop}; "
        f"client event loop: {client_loop}",
        "- pymta pipeline: content checks off (SPF, DKIM, DMARC, ARC, SRS), like the Postfix "
        "side; see pipeline-cost.md for their price",
        f"- postfix: {postfix or 'not installed'}",
    ]


def render(results: Results, *, header: Sequence[str], command: str) -> str:
    """The whole results document (markdown)."""
    doc = ["# pymta vs Postfix: benchmark results", "", *header, ""]
    if results.throughput:
        doc += ["## Throughput (median of rounds; ratio = pymta / Postfix)", "",
                *throughput_table(results), ""]
    if results.cpu:
        doc += ["## Machine CPU per message (median of rounds; all processes, the load "
                "generator and the kernel included)", "", *cpu_table(results), ""]
    if results.floor:
        doc += ["## The floor: least CPU per message on this machine (benchmarks/floor.py)", "",
                *floor_table(results), ""]
    if results.cpu and results.floor:
        doc += ["## What the targets allow", "",
                "On the same cores, a ratio r needs pymta to spend at most Postfix's CPU per "
                "message / r. The floor (smtp-sink + the bare file-system work) is what any "
                "server spends at the least; \"best ratio at the floor\" is Postfix's cost / "
                "floor, the ratio a server with no user-space cost at all would reach.", "",
                *budget_table(results), ""]
    if results.sweep:
        doc += [f"## Throughput vs concurrency ({results.sweep_client}, accepted msg/s)", "",
                *sweep_table(results), "", "![throughput vs concurrency](latest.png)", ""]
    if results.latency:
        doc += ["## Latency at half of peak (end of DATA → 250, loadgen)", "",
                *latency_table(results), ""]
    if results.memory:
        doc += ["## Memory (pymta)", "", *memory_table(results), ""]
    if results.errors:
        doc += ["## Failed or missing messages", "",
                *(f"- {what}: {n}" for what, n in results.errors.items()), ""]
    doc += [f"Command: `{command}`", ""]
    return "\n".join(doc)


def plot(results: Results, path: Path) -> Path | None:
    """Throughput vs concurrency for both servers as a PNG; None if matplotlib is missing."""
    if not results.sweep:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    levels = sorted(results.sweep)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for server, label, marker in ((PYMTA, "pymta", "o"), (POSTFIX, "Postfix", "s")):
        ys = [median(results.sweep[n].get(server, [])) for n in levels]
        if any(y is not None for y in ys):
            ax.plot(levels, [math.nan if y is None else y for y in ys], marker=marker,
                    label=label)
    ax.set_xscale("log")
    ax.set_xticks(levels)
    ax.set_xticklabels([str(n) for n in levels])
    ax.set_xlabel("concurrent sessions (one 4 KiB message per session)")
    ax.set_ylabel("accepted messages / s (median)")
    ax.set_title(f"Throughput vs concurrency ({results.sweep_client}, {os.cpu_count()} cores)")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# ------------------------------------------------------------ content filter (issue 12)

CONTENT_STACK = "stack"
"""Row key of the image's stack (Postfix → amavisd-new → Postfix), the row ratios divide by."""
CONTENT_TARGETS = {"rspamd": 10.0, "spamd": 1.5}
"""Issue 12's targets: row key → the least ratio to the image's stack."""
CONTENT_OFF_NOISE = 0.10
"""Filtering off "costs nothing" when it stays within this fraction of the recorded figure."""
CONTENT_PROCESSES = ("pymta", "clamd", "spamd", "rspamd", "postfix", "amavis", "smtp-source")
"""Process trees whose CPU the ``content`` scenario records, in table order."""


@dataclass(frozen=True, slots=True)
class ContentRound:
    """One timed round of one row of the ``content`` scenario (``benchmarks/content.py``).

    ``seconds``: first connection until the last file is in ``new/``; ``cpu_s``: CPU seconds
    (user + system, exited children included) of each process tree over the round, by the
    names of ``CONTENT_PROCESSES``; ``machine``: the whole machine's CPU per message."""

    messages: int
    accepted: int
    delivered: int
    seconds: float
    cpu_s: dict[str, float] = field(default_factory=dict)
    machine: CpuCost | None = None

    @property
    def rate(self) -> float:
        """Delivered messages per second, end to end."""
        return self.delivered / self.seconds if self.seconds > 0 else 0.0

    def cpu_ms(self, name: str) -> float | None:
        """CPU ms per delivered message of one process tree; None when not running."""
        if name not in self.cpu_s:
            return None
        return 1000 * self.cpu_s[name] / max(1, self.delivered)

    @property
    def server_ms(self) -> float:
        """CPU ms per message of the servers and scanners (everything but the client), the
        figure the stack's recipe calls "stack CPU ms/msg"."""
        spent = sum(v for k, v in self.cpu_s.items() if k != "smtp-source")
        return 1000 * spent / max(1, self.delivered)


@dataclass
class ContentResults:
    """What one ``content`` run measured: ``labels`` (row key → label, table order), the
    rounds of each row, failures and notes for the document. "Filtering off costs nothing"
    compares ``off_row`` with ``plain_row`` (pymta before the filter, same run) or, when that
    row did not run, with ``recorded`` (msg/s, where it comes from)."""

    labels: dict[str, str]
    rounds: dict[str, list[ContentRound]] = field(default_factory=dict)
    off_row: str = ""
    plain_row: str = ""
    recorded: tuple[float, str] | None = None
    errors: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, key: str, result: ContentRound) -> None:
        self.rounds.setdefault(key, []).append(result)

    def rate(self, key: str) -> float | None:
        return median(r.rate for r in self.rounds.get(key, []))

    def add_errors(self, what: str, count: int) -> None:
        if count:
            self.errors[what] = self.errors.get(what, 0) + count


def content_table(res: ContentResults) -> list[str]:
    """msg/s (median, min–max), the ratio to the image's stack and CPU per message."""
    stack = res.rate(CONTENT_STACK)
    rows = ["| configuration | messages | rounds | msg/s (median) | min–max | ratio to the "
            "image's stack | server + scanner CPU ms/msg | machine busy ms/msg |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for key, label in res.labels.items():
        rounds = res.rounds.get(key, [])
        if not rounds:
            continue
        rates = [r.rate for r in rounds]
        busy = median(r.machine.busy_ms if r.machine else None for r in rounds)
        rows.append(
            f"| {label} | {rounds[0].messages:,} | {len(rounds)} | {fmt(median(rates), 1)} "
            f"| {fmt(min(rates), 1)}–{fmt(max(rates), 1)} "
            f"| {fmt(ratio(median(rates), stack), 2, '×')} "
            f"| {fmt(median(r.server_ms for r in rounds), 1)} | {fmt(busy, 1)} |")
    return rows


def content_cpu_table(res: ContentResults) -> list[str]:
    """Where the CPU goes: ms per message of each process tree (medians over rounds)."""
    present = [p for p in CONTENT_PROCESSES
               if any(p in r.cpu_s for rounds in res.rounds.values() for r in rounds)]
    rows = ["| configuration | " + " | ".join(present) + " |",
            "|---|" + "---:|" * len(present)]
    for key, label in res.labels.items():
        rounds = res.rounds.get(key, [])
        if rounds:
            cells = [fmt(median(r.cpu_ms(p) for r in rounds), 2) for p in present]
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    return rows


def content_targets(res: ContentResults) -> list[str]:
    """Issue 12's targets, each "met"/"not met" ("–" when a row is missing)."""
    stack = res.rate(CONTENT_STACK)
    rows = ["| target | measured | |", "|---|---|---|"]
    for key, target in CONTENT_TARGETS.items():
        r = ratio(res.rate(key), stack)
        rows.append(f"| {res.labels.get(key, key)} ≥ {target:g}× the image's stack "
                    f"| {fmt(r, 2, '×')} | {verdict(r, target)} |")
    off = res.rate(res.off_row) if res.off_row else None
    plain = res.rate(res.plain_row) if res.plain_row else None
    reference = ((plain, res.labels.get(res.plain_row, res.plain_row)) if plain is not None
                 else res.recorded)
    if reference is None:
        rows.append("| filter off within noise of the plain end-to-end figure | "
                    f"{fmt(off, 0)} msg/s, nothing to compare with | – |")
    else:
        figure, where = reference
        r = ratio(off, figure)
        rows.append(f"| filter off within {CONTENT_OFF_NOISE:.0%} of the plain end-to-end "
                    f"figure ({fmt(figure, 0)} msg/s: {where}) | {fmt(off, 0)} msg/s, "
                    f"{fmt(r, 2, '×')} | {verdict(r, 1 - CONTENT_OFF_NOISE)} |")
    return rows


def render_content(res: ContentResults, *, header: Sequence[str], command: str) -> str:
    """The ``content`` scenario's results document (markdown)."""
    doc = ["# pymta's content filter vs the image's stack (Postfix + amavisd-new)", "",
           *header, "",
           "## End-to-end throughput (median of rounds; ratio = row / the image's stack)", "",
           *content_table(res), "", "## Targets (issue 12)", "", *content_targets(res), "",
           "## CPU ms per message by process tree (median of rounds)", "",
           *content_cpu_table(res), ""]
    if res.notes:
        doc += ["## Like for like", "", *(f"- {n}" for n in res.notes), ""]
    if res.errors:
        doc += ["## Failed or missing messages", "",
                *(f"- {what}: {n}" for what, n in res.errors.items()), ""]
    doc += [f"Command: `{command}`", ""]
    return "\n".join(doc)
