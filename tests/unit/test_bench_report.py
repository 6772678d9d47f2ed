"""Pure helpers of the pymta-vs-Postfix benchmark: medians, ratios, tables, pacing.

No server is started and no timing is asserted (numbers belong in benchmarks/results/).
"""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest

from benchmarks import postfix as pf
from benchmarks.compare import COMPARE_SCENARIOS, smtp_source_argv, sweep_messages
from benchmarks.floor import CpuCost, CpuSample, fs_floor
from benchmarks.loadgen import RateLimiter, run_load
from benchmarks.relay import SinkWait, pymta_relay_env, relayhost, suspicious_lines
from benchmarks.report import (
    POSTFIX,
    PYMTA,
    Results,
    budget_table,
    cpu_table,
    floor_table,
    fmt,
    latency_table,
    median,
    memory_table,
    plot,
    ratio,
    render,
    sweep_table,
    throughput_table,
    verdict,
)
from benchmarks.sink import SinkStats, start_sink


def test_median_skips_missing_and_nan() -> None:
    assert median([3.0, None, 1.0, math.nan, 2.0]) == 2.0
    assert median([4.0, 1.0]) == 2.5
    assert median([None, math.nan]) is None
    assert median([]) is None


def test_ratio_and_format() -> None:
    assert ratio(300.0, 100.0) == 3.0
    assert ratio(None, 1.0) is None
    assert ratio(1.0, 0.0) is None
    assert fmt(12345.678) == "12,346"
    assert fmt(2.5, 2, "×") == "2.50×"
    assert fmt(None) == "–"
    assert fmt(math.nan) == "–"


def test_verdict() -> None:
    assert verdict(3.0, 3.0) == "met"
    assert verdict(2.9, 3.0) == "not met"
    assert verdict(19.0, 20.0, higher_is_better=False) == "met"
    assert verdict(None, 1.0) == "–"


def _results() -> Results:
    res = Results()
    for mine, theirs in ((3100.0, 1000.0), (2900.0, 1100.0), (3000.0, 900.0)):
        res.add_throughput("accept", "smtp-source -s 20", PYMTA, mine)
        res.add_throughput("accept", "smtp-source -s 20", POSTFIX, theirs)
    res.add_throughput("end-to-end", "smtp-source -s 20", PYMTA, 1500.0)
    res.add_throughput("end-to-end", "smtp-source -s 20", POSTFIX, None)  # not measured
    for n, (a, b) in {1: (100.0, 200.0), 20: (3000.0, 1000.0)}.items():
        res.add_sweep(n, PYMTA, a)
        res.add_sweep(n, POSTFIX, b)
    res.sweep_client = "smtp-source"
    res.latency[PYMTA] = [{"rate": 1500.0, "achieved": 1490.0, "p50_ms": 2.0, "p99_ms": 25.0}]
    res.memory["idle"] = {"connections": 10000.0, "kb_per_conn_rss": 4.0}
    return res


def test_throughput_table_medians_ratio_and_target() -> None:
    rows = throughput_table(_results())
    accept = next(r for r in rows if r.startswith("| accept"))
    assert "| 3 | 3,000 | 1,000 | 3.00× | 3× | met |" in accept
    e2e = next(r for r in rows if r.startswith("| end-to-end"))
    assert "| 1,500 | – | – |" in e2e


def test_sweep_latency_memory_tables() -> None:
    res = _results()
    # issue 14's targets: ≥ 1.0× at 1 and 5 sessions (none at 20), p99 ≤ 5 ms, p50 ≤ 1.5×
    # Postfix's, ≤ 5 KB per idle connection
    assert sweep_table(res)[2:] == ["| 1 | 100 | 200 | 0.50× | 1.0× | not met |",
                                    "| 20 | 3,000 | 1,000 | 3.00× |  |  |"]
    assert "| pymta | 1,500 | 1,490 | 2.00 | 25.00 | 1 | not met |  |" in latency_table(res)
    res.latency[POSTFIX] = [{"rate": 900.0, "achieved": 900.0, "p50_ms": 1.5, "p99_ms": 4.0}]
    assert "| pymta | 1,500 | 1,490 | 2.00 | 25.00 | 1 | not met | met |" in latency_table(res)
    res.latency[POSTFIX][0]["p50_ms"] = 1.2      # 2.00 > 1.5 × 1.2
    assert "| pymta | 1,500 | 1,490 | 2.00 | 25.00 | 1 | not met | not met |" in (
        latency_table(res))
    mem = memory_table(res)
    assert any("per idle connection" in r and "| 4.00 | 5 | met |" in r for r in mem)


def test_cpu_floor_and_budget_tables() -> None:
    res = _results()
    label = "smtp-source -s 20"
    for busy in (2.0, 2.2, 1.8):
        res.add_cpu("accept", label, POSTFIX, CpuCost(busy / 2, busy / 2, 0.1))
        res.add_cpu("accept", label, PYMTA, CpuCost(busy, 0.5, 0.3))
    res.floor = {"smtp-sink": [CpuCost(0.05, 0.05, 0.0)] * 3,
                 "queue files": [CpuCost(0.01, 0.5, 0.2)] * 3}
    cpu = cpu_table(res)
    assert "| accept | smtp-source -s 20 | postfix | 1.000 | 1.000 | 2.000 | 0.100 |" in cpu
    assert "| accept | smtp-source -s 20 | pymta | 2.000 | 0.500 | 2.500 | 0.300 |" in cpu
    assert "| queue files | 0.010 | 0.500 | 0.510 |" in floor_table(res)
    # 3× Postfix's 2.0 ms leaves 0.667 ms; the floor is 0.1 + 0.51 = 0.61 ms: 2.0 / 0.61
    (row,) = budget_table(res)[2:]
    assert row == ("| accept | smtp-source -s 20 | 2.000 | 3× | 0.667 | 0.610 | 2.500 "
                   "| 3.28× |")
    # no floor measured for end-to-end: the budget is still shown, the floor is not
    res.add_cpu("end-to-end", label, POSTFIX, CpuCost(1.0, 1.0, 0.0))
    assert "| end-to-end | smtp-source -s 20 | 2.000 | 2× | 1.000 | – | – | – |" in (
        budget_table(res))
    res.add_cpu("accept", "loadgen 20 sessions", POSTFIX, CpuCost(1.0, 1.0, 0.0))
    assert not any("loadgen" in r for r in budget_table(res))   # the floor's client differs
    doc = render(res, header=[], command="x")
    assert "## What the targets allow" in doc and "## The floor" in doc


def test_fs_floor_counts_and_cleans_up(tmp_path: Path) -> None:
    before = CpuSample.now()
    cost = fs_floor(tmp_path, 40, 20, 4096, deliver=True)
    after = CpuSample.now()
    assert list(tmp_path.iterdir()) == []       # nothing left behind
    assert cost.user_ms >= 0 and cost.system_ms >= 0
    # the per-message figure is the machine's CPU time over the run divided by 40
    total = (after.user - before.user) + (after.system - before.system)
    assert cost.busy_ms * 40 / 1000 <= total + 1e-9


def test_render_has_every_section(tmp_path: Path) -> None:
    doc = render(_results(), header=["- cores: 2"], command="python -m benchmarks --all")
    for heading in ("## Throughput", "## Throughput vs concurrency", "## Latency", "## Memory"):
        assert heading in doc
    assert doc.rstrip().endswith("`python -m benchmarks --all`")
    import matplotlib  # noqa: F401 - a test dependency: the plot must be produced
    png = plot(_results(), tmp_path / "p.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rate_limiter_slots() -> None:
    lim = RateLimiter(100.0, t0=10.0)           # one slot every 10 ms from t=10
    assert lim.delay(now=10.0) == 0.0           # slot 0 due now
    assert lim.delay(now=10.0) == pytest.approx(0.01)
    assert lim.delay(now=10.5) == 0.0           # behind schedule: no wait, no catch-up sleep
    assert lim.issued == 3
    with pytest.raises(ValueError):
        RateLimiter(0.0)


def test_sweep_messages_and_smtp_source_argv() -> None:
    assert sweep_messages(1, 2000) == 300
    assert sweep_messages(20, 2000) == 2000
    assert sweep_messages(100, 2000) == 2000
    assert sweep_messages(5, 100) == 100
    argv = smtp_source_argv(2525, 20, 5000, 4096)
    assert argv[1:7] == ["-s", "20", "-m", "5000", "-l", "4096"]
    assert "-d" not in argv  # one message per session
    assert argv[-1] == "127.0.0.1:2525"


async def test_paced_load_counts_every_message() -> None:
    server, stats, port = await start_sink("127.0.0.1", 0)
    try:
        r = await run_load("127.0.0.1", port, sessions=5, messages=20, size=300, rate=2000.0)
    finally:
        server.close()
    assert (r.accepted, r.failed) == (20, 0)
    assert stats.messages == 20


# ------------------------------------------------------------ relay-through (issue 15)


def test_relay_through_table_memory_rows_and_floor() -> None:
    res = Results()
    label = "smtp-source -s 20 -m 5000 -l 4096"
    for mine, theirs in ((900.0, 400.0), (700.0, 420.0), (800.0, 380.0)):
        res.add_throughput("relay-through", label, PYMTA, mine)
        res.add_throughput("relay-through", label, POSTFIX, theirs)
    (row,) = throughput_table(res)[2:]
    assert row == f"| relay-through | {label} | 3 | 800 | 400 | 2.00× | 2× | met |"
    # two SMTP hops and the queue files are the floor of relaying
    res.add_cpu("relay-through", label, POSTFIX, CpuCost(2.0, 2.0, 0.0))
    res.floor = {"smtp-sink": [CpuCost(0.1, 0.1, 0.0)], "queue files": [CpuCost(0.0, 0.5, 0.0)]}
    (budget,) = budget_table(res)[2:]
    assert budget.startswith("| relay-through | smtp-source") and "| 0.900 |" in budget
    res.memory["relay"] = {"messages": 50.0, "size_mb": 25.0, "accepted": 50.0,
                           "delivered": 50.0, "relayed_mb": 1250.0, "growth_mb": 16.0}
    mem = memory_table(res)
    assert "| relay | messages in flight × size MB, relayed to the sink | 50 × 25 |  |  |" in mem
    assert "| relay | RSS growth, MB | 16.0 | 15 | not met |" in mem
    assert {"relay-through", "memory-relay"} <= set(COMPARE_SCENARIOS)


def test_sink_stats_line_round_trip() -> None:
    stats = SinkStats(connections=3, messages=20, data_bytes=81920, last_at=1234.5)
    line = stats.line()
    assert line == b"250 messages=20 bytes=81920 connections=3 last=1234.500000\r\n"
    assert SinkStats.parse(line) == stats
    for bad in (b"500 5.5.2 what\r\n", b"250 2.0.0 Ok\r\n", b"250 messages=x\r\n"):
        with pytest.raises(ValueError):
            SinkStats.parse(bad)


async def test_sink_answers_xstats_with_its_counters() -> None:
    server, stats, port = await start_sink("127.0.0.1", 0)
    try:
        before = time.monotonic()
        r = await run_load("127.0.0.1", port, sessions=3, messages=7, size=500)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        await reader.readline()
        writer.write(b"XSTATS\r\n")
        got = SinkStats.parse(await reader.readline())
        writer.close()
    finally:
        server.close()
    assert r.accepted == 7
    assert (got.messages, got.connections) == (7, stats.connections)
    assert got.data_bytes >= 7 * 500 - 7 * 4 and before <= got.last_at <= time.monotonic()
    wait = SinkWait(got, 0.0, own_connections=1)
    assert wait.connections == got.connections - 1
    assert wait.relay_seconds(before) == pytest.approx(got.last_at - before, abs=1e-5)
    assert SinkWait(SinkStats(), 0.0).relay_seconds(before) is None


def test_both_servers_relay_everything_to_the_sink() -> None:
    """Like for like, from configuration alone: pymta's settings parse into a smart host
    with no MX lookup and no TLS, the recipient's domain is not local and loopback may
    relay; Postfix's main.cf has the same smart host and no local domain."""
    from pymta.config.load import load_config

    env = pymta_relay_env(2526)
    assert env["SMTP_RELAY_HOSTAUTH"] == relayhost(2526) == "[127.0.0.1]:2526"
    config = load_config(env)
    assert config.smtp_relay is not None
    assert (config.smtp_relay.host, config.smtp_relay.port) == ("127.0.0.1", 2526)
    assert not config.smtp_relay.mx_lookup
    assert config.smtp_tls_security_level == "none"
    assert "example.com" not in config.mail_domain
    assert "127.0.0.0/8" in config.mynetworks
    main_cf = pf.MAIN_CF.format(T="/x", size_limit=1) + pf.RELAY_CF.format(
        relayhost=relayhost(2526))
    assert "relayhost = [127.0.0.1]:2526" in main_cf
    assert "smtp_tls_security_level = none" in main_cf
    assert "mydestination =\n" in main_cf and "virtual_mailbox_domains" not in main_cf


def test_suspicious_log_lines() -> None:
    lines = ["QID: to=<a@b>, relay=x, status=sent (250 ok)",
             "QID: to=<a@b>, relay=none, delay=3, status=deferred (connect refused)",
             "Traceback (most recent call last):", "pymta started"]
    assert suspicious_lines(lines) == lines[1:3]
