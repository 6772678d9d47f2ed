"""``python -m benchmarks.loadgen``: its arguments, and the summary a user reads at the end.

The runs here go against the in-process sink of ``benchmarks/sink.py`` over loopback (the CLI
as a subprocess against pymta and Postfix's smtp-sink is in
``tests/integration/test_loadgen_any_server.py``). No timing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import struct
from pathlib import Path

import pytest

from benchmarks import loadgen_cli
from benchmarks.loadgen import LoadResult
from benchmarks.loadgen_cli import Options, parse_args, parse_size, parse_target
from benchmarks.loadgen_stats import (
    Sample,
    Timeline,
    plain_line,
    progress_line,
    render_json,
    render_text,
    summarize,
)
from benchmarks.sink import SinkReplies, start_sink


def _result(**kw: object) -> LoadResult:
    fields: dict[str, object] = dict(
        messages=100, accepted=97, temp_failed=2, perm_failed=1, errors=0, seconds=2.0,
        msgs_per_s=48.5, p50_ms=50.0, p99_ms=99.0, sessions=5, size=4096,
        pipelining_used=True)
    fields.update(kw)
    return LoadResult(**fields)  # type: ignore[arg-type]


def _field(text: str, name: str) -> str:
    match = re.search(rf"^{re.escape(name)}\s+(.+)$", text, re.M)
    assert match, f"no {name!r} line in:\n{text}"
    return match[1]


# ------------------------------------------------------------------ arguments

@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:25", ("127.0.0.1", 25)),
    ("mx.example.com:2525", ("mx.example.com", 2525)),
    ("mx.example.com", ("mx.example.com", 25)),
    ("[::1]:587", ("::1", 587)),
    ("[::1]", ("::1", 25)),
])
def test_targets_that_parse(text: str, expected: tuple[str, int]) -> None:
    assert parse_target(text) == expected


@pytest.mark.parametrize("text", [
    "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:smtp", ":25", "::1", "[::1", "[::1]x",
    "[not-v6]:25", "",
])
def test_targets_that_do_not(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_target(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("4096", 4096), ("4k", 4096), ("64KiB", 65536), ("1M", 1048576), ("2 kB", 2048),
])
def test_sizes(text: str, expected: int) -> None:
    assert parse_size(text) == expected


def test_defaults_and_every_option() -> None:
    opts = parse_args(["127.0.0.1:2525"])
    assert (opts.sessions, opts.messages, opts.size, opts.per_session) == (20, 1000, 4096, 1)
    assert opts.pipelining and not opts.starttls and not opts.json and opts.plot is None
    opts = parse_args([
        "127.0.0.1:25", "-s", "3", "-m", "50", "-l", "8k", "--per-session", "4",
        "--no-pipelining", "--from", "", "--to", "x@y.test", "--helo", "me.test",
        "--starttls", "--rate", "12.5", "--timeout", "3", "--plot", "out.png", "--json",
        "-q"])
    assert opts == Options(
        host="127.0.0.1", port=25, sessions=3, messages=50, size=8192, per_session=4,
        pipelining=False, sender="", recipient="x@y.test", helo="me.test", starttls=True,
        timeout=3.0, rate=12.5, plot=Path("out.png"), json=True, quiet=True)


@pytest.mark.parametrize(("argv", "complaint"), [
    ([], "the following arguments are required"),
    (["127.0.0.1:99999"], "port must be 1-65535"),
    (["h:25", "-s", "0"], "'0' must be at least 1"),
    (["h:25", "-m", "many"], "'many' is not a whole number"),
    (["h:25", "-l", "4q"], "bad size '4q'"),
    (["h:25", "--to", "a b@x"], "bad address 'a b@x'"),
    (["h:25", "--to", ""], "bad address ''"),
    (["h:25", "--rate", "0"], "'0' must be greater than 0"),
    (["h:25", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_arguments_are_one_line_and_exit_2(
        argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        loadgen_cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and complaint in err, err
    assert err.startswith("python -m benchmarks.loadgen: ")


# ------------------------------------------------------------------ summary

def test_summary_percentiles_over_every_latency() -> None:
    latencies = [ms / 1000.0 for ms in range(100, 0, -1)]   # 1..100 ms, in any order
    s = summarize(_result(), latencies, host="mx.test", port=25, per_session=2,
                  pipelining=True, starttls=True)
    assert (s.p50_ms, s.p90_ms, s.p99_ms, s.max_ms) == pytest.approx((50, 90, 99, 100))
    assert (s.accepted, s.temp_failed, s.perm_failed, s.errors, s.answered) == (97, 2, 1, 0,
                                                                                  100)
    text = render_text(s)
    assert _field(text, "accepted") == "97"
    assert _field(text, "4xx") == "2"
    assert _field(text, "5xx") == "1"
    assert _field(text, "errors") == "0"
    assert _field(text, "rate") == "48.5 msg/s accepted"
    assert _field(text, "target") == "mx.test:25  (STARTTLS)"
    assert "2 messages per session, pipelining used" in _field(text, "load")
    assert _field(text, "latency") == (
        "p50 50.00 ms   p90 90.00 ms   p99 99.00 ms   max 100.00 ms   "
        "(end of data → reply, 100 messages)")
    data = json.loads(render_json(s))
    assert data["target"] == "mx.test:25"
    assert (data["accepted"], data["temp_failed"], data["perm_failed"]) == (97, 2, 1)
    assert data["p90_ms"] == pytest.approx(90.0) and data["max_ms"] == pytest.approx(100.0)


def test_summary_without_latencies_says_so() -> None:
    s = summarize(_result(accepted=0, temp_failed=0, perm_failed=0, errors=100,
                          msgs_per_s=0.0, p50_ms=float("nan"), p99_ms=float("nan")),
                  [], host="::1", port=2525, per_session=1, pipelining=False, starttls=False)
    text = render_text(s)
    assert _field(text, "target") == "[::1]:2525"
    assert _field(text, "errors") == "100"
    assert "pipelining off" in _field(text, "load")
    assert _field(text, "latency").startswith("p50 –   p90 –   p99 –   max –")
    data = json.loads(render_json(s))
    assert data["p50_ms"] is None and data["max_ms"] is None and data["answered"] == 0


def test_timeline_places_latencies_and_rates() -> None:
    tl = Timeline()
    for t, accepted in ((0.0, 0), (0.5, 10), (1.0, 30), (1.5, 30), (2.0, 70)):
        tl.add(Sample(t, accepted, accepted, 0, 0, 0, accepted))
    assert tl.latency_times(31) == [0.5] * 10 + [1.0] * 20 + [2.0]
    edges, rates = tl.rates(1.0)
    assert edges == [0.0, 1.0, 2.0] and rates == [30.0, 40.0]


def test_progress_lines() -> None:
    s = Sample(2.0, 250, 240, 6, 3, 1, 249)
    line = progress_line(s, 1000, 100)
    assert len(line) < 100 and line.startswith("[##########")
    assert "250/1000" in line and "120 msg/s" in line and "err 1" in line
    assert "eta 6s" in line
    assert "[" not in progress_line(s, 1000, 50)   # too narrow for a bar: just the figures
    assert plain_line(s, 1000) == ("loadgen: 2.0s 250/1000 done, 240 accepted, 120 msg/s, "
                                   "4xx 6, 5xx 3, errors 1")


# ------------------------------------------------------------------ runs against the sink

async def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    status = await loadgen_cli._run(parse_args(argv), out, err)
    return status, out.getvalue(), err.getvalue()


async def test_a_run_prints_what_the_sink_counted() -> None:
    server, stats, port = await start_sink()
    async with server:
        status, out, err = await _cli([f"127.0.0.1:{port}", "-s", "4", "-m", "37",
                                       "--per-session", "3", "-l", "1k"])
    assert status == 0, err
    assert stats.messages == 37
    assert _field(out, "accepted") == str(stats.messages)
    assert (_field(out, "4xx"), _field(out, "5xx"), _field(out, "errors")) == ("0", "0", "0")
    assert "37 messages of 1024 bytes, 4 sessions at a time, 3 messages per session, " \
           "pipelining used" in out
    assert _field(out, "latency").endswith("(end of data → reply, 37 messages)")


async def test_a_run_counts_refusals_as_json() -> None:
    server, stats, port = await start_sink(replies=SinkReplies(
        data_end=b"452 4.3.1 Insufficient system storage\r\n"))
    async with server:
        status, out, _ = await _cli([f"127.0.0.1:{port}", "-s", "2", "-m", "9", "--json",
                                     "--no-pipelining"])
    data = json.loads(out)
    assert status == 0   # refusals are an answer
    assert (data["accepted"], data["temp_failed"], data["perm_failed"]) == (0, 9, 0)
    assert data["latency_count"] == 9 and data["pipelining"] is False
    assert stats.messages == 0


async def test_a_server_gone_is_exit_1_with_a_reason() -> None:
    server, _, port = await start_sink()
    server.close()
    await server.wait_closed()
    status, out, err = await _cli([f"127.0.0.1:{port}", "-m", "5"])
    assert status == 1 and out == ""
    assert f"cannot connect to 127.0.0.1:{port}: Connection refused" in err


async def test_starttls_not_offered_is_exit_1() -> None:
    server, stats, port = await start_sink(replies=SinkReplies())   # no STARTTLS
    async with server:
        status, out, err = await _cli([f"127.0.0.1:{port}", "-m", "5", "--starttls"])
    assert status == 1 and out == ""
    assert "STARTTLS answered 250, expected 220" in err
    assert stats.messages == 0


async def test_plot_is_a_png(tmp_path: Path) -> None:
    png = tmp_path / "run.png"
    server, _, port = await start_sink()
    async with server:
        status, _, err = await _cli([f"127.0.0.1:{port}", "-m", "40", "--plot", str(png)])
    assert status == 0, err
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", head[16:24])
    assert width > 400 and height > 400


async def test_an_unwritable_plot_is_exit_1_after_the_summary(tmp_path: Path) -> None:
    server, _, port = await start_sink()
    async with server:
        status, out, _ = await _cli([f"127.0.0.1:{port}", "-m", "5", "--plot",
                                     str(tmp_path / "no" / "such" / "dir.png")])
    assert status == 1
    assert _field(out, "accepted") == "5"


async def test_review_an_endless_reply_line_is_exit_1_not_a_traceback() -> None:
    """Review of issue 14: a greeting longer than the stream's limit (64 KiB without a
    newline) raised ValueError out of the client: a traceback. Now one line, exit 1."""
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 " + b"x" * 70_000)
        await writer.drain()
        await asyncio.sleep(2)
        writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        status, out, err = await _cli([f"127.0.0.1:{port}", "-m", "3"])
    assert status == 1 and out == ""
    assert "reply line too long" in err and "Traceback" not in err
