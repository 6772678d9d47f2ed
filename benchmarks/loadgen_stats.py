"""What ``python -m benchmarks.loadgen`` reports: the timeline of a run, its summary, and the
summary as text, as JSON and as a progress line.

Pure functions over plain data (no sockets, no clock of their own), so the numbers a user reads
are unit-tested (``tests/unit/test_loadgen_cli.py``); ``benchmarks/loadgen_cli.py`` feeds them.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from benchmarks.loadgen import LoadResult, Tally, _percentile

PERCENTILES = (50, 90, 99)
"""The latency percentiles printed beside the maximum (nearest rank: values really seen)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """The tally at one moment of the run, ``t`` seconds after its start."""

    t: float
    done: int        # messages that got their final answer (or were lost to an error)
    accepted: int
    temp_failed: int
    perm_failed: int
    errors: int
    latencies: int   # how many end-of-data latencies had been recorded by then


def sample(t: float, tally: Tally, messages: int) -> Sample:
    """Read the live tally (``messages``: the run's total, for the count of those done)."""
    done = tally.accepted + tally.temp_failed + tally.perm_failed + tally.errors
    return Sample(t, min(done, messages), tally.accepted, tally.temp_failed,
                  tally.perm_failed, tally.errors, len(tally.latencies))


@dataclass(slots=True)
class Timeline:
    """Samples taken while the run goes: the rate over time, and when each latency arrived.

    Latencies are appended to the tally in the order replies arrive, so the latency at index
    ``i`` arrived between the last sample that had fewer than ``i + 1`` and the first that had
    at least that many: it is placed at the latter's time (resolution: the sampling interval).
    """

    samples: list[Sample] = field(default_factory=list)

    def add(self, s: Sample) -> None:
        self.samples.append(s)

    def latency_times(self, count: int) -> list[float]:
        """The time (seconds since the start) at which each of the first ``count`` latencies
        had arrived; latencies after the last sample get its time."""
        marks = [s.latencies for s in self.samples]
        times = [s.t for s in self.samples]
        if not times:
            return [0.0] * count
        out = []
        for i in range(count):
            k = bisect.bisect_left(marks, i + 1)
            out.append(times[min(k, len(times) - 1)])
        return out

    def rates(self, width: float) -> tuple[list[float], list[float]]:
        """Accepted messages per second in consecutive windows of at least ``width`` seconds
        (each ends at the first sample past it; the last one at the last sample): the
        windows' edges (one more than the rates, from the first sample's time) and the
        rates."""
        if len(self.samples) < 2 or width <= 0:
            return [], []
        edges = [self.samples[0].t]
        rates: list[float] = []
        last = self.samples[0]
        for s in self.samples[1:]:
            if (s.t >= last.t + width or s is self.samples[-1]) and s.t > last.t:
                edges.append(s.t)
                rates.append((s.accepted - last.accepted) / (s.t - last.t))
                last = s
        return edges, rates


@dataclass(frozen=True, slots=True)
class Summary:
    """Everything the CLI prints at the end, as plain values (``None``: nothing to measure)."""

    host: str
    port: int
    sessions: int
    messages: int
    per_session: int
    size: int
    pipelining: bool        # asked for
    pipelining_used: bool   # asked for and offered by the server
    starttls: bool
    seconds: float
    msgs_per_s: float
    accepted: int
    temp_failed: int
    perm_failed: int
    errors: int
    latency_count: int
    p50_ms: float | None
    p90_ms: float | None
    p99_ms: float | None
    max_ms: float | None

    @property
    def answered(self) -> int:
        """Messages the server gave a final answer to (accepted or refused)."""
        return self.accepted + self.temp_failed + self.perm_failed


def summarize(result: LoadResult, latencies: Sequence[float], *, host: str, port: int,
              per_session: int, pipelining: bool, starttls: bool) -> Summary:
    """The summary of one run: the result's counts, and percentiles over every end-of-data
    latency (seconds, in any order) rather than the two the result carries."""
    ordered = sorted(latencies)

    def ms(pct: float) -> float | None:
        return _percentile(ordered, pct) * 1000.0 if ordered else None

    p50, p90, p99 = (ms(p) for p in PERCENTILES)
    return Summary(
        host=host, port=port, sessions=result.sessions, messages=result.messages,
        per_session=per_session, size=result.size, pipelining=pipelining,
        pipelining_used=result.pipelining_used, starttls=starttls, seconds=result.seconds,
        msgs_per_s=result.msgs_per_s, accepted=result.accepted,
        temp_failed=result.temp_failed, perm_failed=result.perm_failed, errors=result.errors,
        latency_count=len(ordered), p50_ms=p50, p90_ms=p90, p99_ms=p99,
        max_ms=ordered[-1] * 1000.0 if ordered else None,
    )


def target(host: str, port: int) -> str:
    """``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _pipelining(s: Summary) -> str:
    if not s.pipelining:
        return "pipelining off"
    return "pipelining used" if s.pipelining_used else "pipelining not offered by the server"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} ms"


def render_text(s: Summary) -> str:
    """The human summary: one ``name value`` line per figure, so that ``grep '^accepted'``
    and friends work on it."""
    per = "message" if s.per_session == 1 else "messages"
    lines = [
        f"target      {target(s.host, s.port)}"
        + ("  (STARTTLS)" if s.starttls else ""),
        f"load        {s.messages} messages of {s.size} bytes, {s.sessions} sessions at a time, "
        f"{s.per_session} {per} per session, {_pipelining(s)}",
        f"time        {s.seconds:.2f} s",
        f"rate        {s.msgs_per_s:.1f} msg/s accepted",
        f"accepted    {s.accepted}",
        f"4xx         {s.temp_failed}",
        f"5xx         {s.perm_failed}",
        f"errors      {s.errors}",
        "latency     " + "   ".join(
            [f"p{p} {_ms(v)}" for p, v in zip(PERCENTILES, (s.p50_ms, s.p90_ms, s.p99_ms),
                                              strict=True)]
            + [f"max {_ms(s.max_ms)}"])
        + f"   (end of data → reply, {s.latency_count} messages)",
    ]
    return "\n".join(lines) + "\n"


def render_json(s: Summary) -> str:
    """The same figures as one JSON object (``null`` where nothing was measured)."""
    data = asdict(s)
    data["target"] = target(s.host, s.port)
    data["answered"] = s.answered
    for key, value in data.items():
        if isinstance(value, float) and not math.isfinite(value):
            data[key] = None
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def progress_line(s: Sample, messages: int, width: int) -> str:
    """One progress line for a terminal, at most ``width`` characters: a bar, the count done,
    the rate so far, the refusals and errors, and the time left at that rate."""
    frac = s.done / messages if messages else 1.0
    rate = s.accepted / s.t if s.t > 0 else 0.0
    left = (messages - s.done) / (s.done / s.t) if s.done and s.t > 0 else math.nan
    eta = "" if math.isnan(left) else f"  eta {left:.0f}s"
    text = (f"  {s.done}/{messages} {frac:4.0%}  {rate:.0f} msg/s  "
            f"4xx {s.temp_failed}  5xx {s.perm_failed}  err {s.errors}{eta}")
    bar_width = max(0, min(40, width - len(text) - 3))
    if bar_width >= 10:
        filled = int(frac * bar_width)
        text = "[" + "#" * filled + "-" * (bar_width - filled) + "]" + text
    return text[:max(width - 1, 0)]


def plain_line(s: Sample, messages: int) -> str:
    """The periodic progress line when stderr is not a terminal (a log, a pipe)."""
    rate = s.accepted / s.t if s.t > 0 else 0.0
    return (f"loadgen: {s.t:.1f}s {s.done}/{messages} done, {s.accepted} accepted, "
            f"{rate:.0f} msg/s, 4xx {s.temp_failed}, 5xx {s.perm_failed}, "
            f"errors {s.errors}")
