"""The PNG of ``python -m benchmarks.loadgen --plot FILE``: accepted msg/s over time, the
end-of-data latency of each message over time, and the latency histogram.

matplotlib comes with the ``bench`` extra (``pip install 'pymta-server[bench]'``); the CLI asks
:func:`missing` before the run, so that a user never waits out a load to learn the plot
cannot be drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.loadgen_stats import Summary, Timeline, target

INSTALL_HINT = "pip install 'pymta-server[bench]' (or: pip install matplotlib)"


def missing() -> str | None:
    """Why no plot can be drawn here (matplotlib cannot be imported), or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        return f"--plot needs matplotlib, which cannot be imported ({exc}): {INSTALL_HINT}"
    return None


def plot(summary: Summary, timeline: Timeline, latencies: Sequence[float], path: Path) -> Path:
    """Draw the three panels into ``path`` (PNG); OSError when it cannot be written.

    ``latencies``: seconds, in the order they arrived (the tally's list), so that each is
    placed at the time the timeline says it arrived.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rate, ax_lat, ax_hist) = plt.subplots(3, 1, figsize=(8, 9), dpi=110)
    fig.suptitle(
        f"{target(summary.host, summary.port)}: {summary.messages} × {summary.size} B, "
        f"{summary.sessions} sessions — {summary.msgs_per_s:.1f} msg/s, "
        f"{summary.accepted} accepted", fontsize=10)

    width = max(0.05, summary.seconds / 50.0)   # about 50 windows, each several samples
    edges, rates = timeline.rates(width)
    if rates:
        ax_rate.stairs(rates, edges, fill=True, alpha=0.6)
    ax_rate.set_ylabel("accepted msg/s")
    ax_rate.set_xlabel("seconds since start")
    ax_rate.set_ylim(bottom=0)
    ax_rate.grid(True, alpha=0.3)

    ms = [v * 1000.0 for v in latencies]
    ax_lat.scatter(timeline.latency_times(len(ms)), ms, s=4, alpha=0.4)
    ax_lat.set_ylabel("end of data → reply (ms)")
    ax_lat.set_xlabel("seconds since start")
    ax_lat.set_ylim(bottom=0)
    ax_lat.grid(True, alpha=0.3)

    if ms:
        ax_hist.hist(ms, bins=min(60, max(10, len(ms) // 10)))
    for label, value, style in (("p50", summary.p50_ms, "--"), ("p99", summary.p99_ms, ":")):
        if value is not None:
            ax_hist.axvline(value, color="black", linestyle=style, label=f"{label} {value:.2f} ms")
    ax_hist.set_xlabel("end of data → reply (ms)")
    ax_hist.set_ylabel("messages")
    if summary.p50_ms is not None:
        ax_hist.legend()
    ax_hist.grid(True, alpha=0.3)

    fig.tight_layout()
    try:
        fig.savefig(path, format="png")
    finally:
        plt.close(fig)
    return path
