"""Runs fuzz targets for a time budget, each in its own libFuzzer process, and reports.

Implementation summary. :func:`run_target` starts ``python -m fuzz.worker`` with the
target's working corpus (``fuzz/work/<target>/``, gitignored, where libFuzzer adds what it
finds, so a later run starts where the last one stopped), its seed corpus
(``fuzz/corpus/<target>/``, in git, read only), its dictionary (``fuzz/dicts/``),
``-max_total_time`` and an artifact prefix in ``fuzz/crashes/<target>/``; the process's
output goes to a log file that is parsed for libFuzzer's final statistics. A finding is any
reproducer the run's guard reported (whether or not the file existed before), any file the
run created or changed in ``fuzz/crashes/<target>/``, or a non-zero exit (libFuzzer's own
crash, timeout or OOM). :func:`long_run` gives every target slices of
a long budget in turn and keeps going whatever one target does, writing ``results.jsonl``
and ``summary.md`` as it goes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fuzz.crashes import CRASHES, ROOT
from fuzz.targets import TARGETS

CORPUS = ROOT / "fuzz" / "corpus"
WORK = ROOT / "fuzz" / "work"
DICTS = ROOT / "fuzz" / "dicts"         # libFuzzer dictionaries: tokens mutations insert
MAX_LEN = {"engine": 8192}
DEFAULT_MAX_LEN = 4096
INPUT_TIMEOUT = 30          # seconds one input may take before libFuzzer calls it a timeout
GRACE = 120                 # start-up and corpus loading beyond -max_total_time

_STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.M)
_REPRODUCER = re.compile(r"^=== new finding .*\n    reproducer: (.+)$", re.M)
_PROGRESS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.M)


@dataclass
class Result:
    target: str
    seconds: float
    rc: int
    execs: int = 0
    exec_per_sec: int = 0
    cov: int = 0
    ft: int = 0
    corpus: int = 0
    new_units: int = 0
    peak_rss_mb: int = 0
    findings: list[str] = field(default_factory=list)
    log: str = ""

    @property
    def failed(self) -> bool:
        return self.rc != 0 or bool(self.findings)


def _snapshot(folder: Path) -> dict[Path, float]:
    if not folder.is_dir():
        return {}
    return {p: p.stat().st_mtime for p in folder.iterdir()
            if p.suffix != ".txt" and p.is_file()}


def _parse(text: str, result: Result) -> None:
    stats = {k: int(v) for k, v in _STAT.findall(text)}
    result.execs = stats.get("number_of_executed_units", 0)
    result.exec_per_sec = stats.get("average_exec_per_sec", 0)
    result.new_units = stats.get("new_units_added", 0)
    result.peak_rss_mb = stats.get("peak_rss_mb", 0)
    progress = _PROGRESS.findall(text)
    if progress:
        execs, cov, ft, corp = (int(x) for x in progress[-1])
        result.cov, result.ft, result.corpus = cov, ft, corp
        result.execs = result.execs or execs


def run_target(name: str, seconds: int, log_dir: Path, *, stop: bool = False,
               extra: tuple[str, ...] = ()) -> Result:
    """Fuzz ``name`` for ``seconds``; never raises for what the target does."""
    if name not in TARGETS:
        raise KeyError(name)
    log_dir.mkdir(parents=True, exist_ok=True)
    work, seeds, crash_dir = WORK / name, CORPUS / name, CRASHES / name
    for folder in (work, crash_dir):
        folder.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"
    before = _snapshot(crash_dir)
    cmd = [sys.executable, "-m", "fuzz.worker", name, *(["--stop"] if stop else []),
           str(work), str(seeds), f"-max_total_time={seconds}", f"-timeout={INPUT_TIMEOUT}",
           "-rss_limit_mb=2048", f"-max_len={MAX_LEN.get(name, DEFAULT_MAX_LEN)}",
           "-print_final_stats=1", f"-artifact_prefix={crash_dir}/", *extra]
    words = DICTS / f"{name}.dict"
    if words.exists():
        cmd.append(f"-dict={words}")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    started = time.monotonic()
    with log.open("ab") as out:
        out.write(f"\n==== {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
        out.flush()
        start = out.tell()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, timeout=seconds + GRACE).returncode
        except subprocess.TimeoutExpired:
            rc = -9
    result = Result(name, round(time.monotonic() - started, 1), rc, log=str(log))
    with log.open("rb") as f:
        f.seek(start)
        text = f.read().decode("utf-8", "replace")
    _parse(text, result)
    # What the guard reported in this run (also findings whose reproducer existed already),
    # plus libFuzzer's own artifacts (crash-*, timeout-*, oom-*) the run left.
    found = set(_REPRODUCER.findall(text))
    found.update(str(p) for p, mtime in _snapshot(crash_dir).items() if before.get(p) != mtime)
    result.findings = sorted(found)
    return result


def report_line(r: Result) -> str:
    state = "FAIL" if r.failed else "ok"
    return (f"{r.target:8} {state:4} {r.seconds:7.1f}s  execs={r.execs:<9} "
            f"exec/s={r.exec_per_sec:<6} cov={r.cov:<5} ft={r.ft:<6} corpus={r.corpus:<5} "
            f"rc={r.rc}")


def findings_text(r: Result) -> str:
    lines = []
    for path in r.findings:
        txt = Path(path).with_suffix(".txt")
        first = txt.read_text(errors="replace").splitlines()[0] if txt.exists() else "libFuzzer"
        lines.append(f"  {r.target}: {first}\n    reproducer: {path}\n"
                     f"    run: python -m fuzz repro {path}")
    if r.rc != 0 and not r.findings:
        lines.append(f"  {r.target}: exit status {r.rc}, see {r.log}")
    return "\n".join(lines)


def run(names: list[str], seconds: int, log_dir: Path, *, stop: bool = False,
        seed: int = 0) -> int:
    """Fuzz each target in turn; print a summary; 1 when anything was found. A non-zero
    ``seed`` makes the run repeatable up to the time budget (the test command uses one, so
    a short CI run finds what the same run finds here; hours-long runs use new seeds)."""
    results = []
    extra = (f"-seed={seed}",) if seed else ()
    for name in names:
        r = run_target(name, seconds, log_dir, stop=stop, extra=extra)
        print(report_line(r), flush=True)
        results.append(r)
    bad = [r for r in results if r.failed]
    if bad:
        print(f"\nFUZZ FINDINGS (logs in {log_dir}):")
        for r in bad:
            print(findings_text(r))
        return 1
    return 0


def _summary(log_dir: Path, totals: dict[str, dict], deadline: float, done: bool) -> None:
    lines = [f"# pymta long fuzz run ({'finished' if done else 'running'}, pid {os.getpid()})",
             "", f"ends by {time.strftime('%F %T', time.localtime(deadline))}; updated "
             f"{time.strftime('%F %T')}", "",
             "| target | slices | seconds | executions | exec/s (last) | cov | ft | corpus "
             "| findings |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, t in totals.items():
        lines.append(f"| {name} | {t['slices']} | {t['seconds']:.0f} | {t['execs']} | "
                     f"{t['exec_per_sec']} | {t['cov']} | {t['ft']} | {t['corpus']} | "
                     f"{len(t['findings'])} |")
    lines += ["", "## Findings (reproducers; `python -m fuzz repro PATH`)", ""]
    for t in totals.values():
        for path in sorted(t["findings"]):
            txt = Path(path).with_suffix(".txt")
            sig = txt.read_text(errors="replace").splitlines()[0] if txt.exists() else path
            lines.append(f"- `{path}` -- {sig}")
    (log_dir / "summary.md").write_text("\n".join(lines) + "\n")


def long_run(names: list[str], hours: float, slice_minutes: float, log_dir: Path) -> int:
    """Round-robin slices until the deadline; a target that fails goes on in its next slice."""
    log_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + hours * 3600
    totals = {n: {"slices": 0, "seconds": 0.0, "execs": 0, "exec_per_sec": 0, "cov": 0,
                  "ft": 0, "corpus": 0, "findings": set()} for n in names}
    (log_dir / "pid").write_text(f"{os.getpid()}\n")
    while time.time() < deadline - 30:
        for name in names:
            left = int(deadline - time.time())
            if left < 30:
                break
            try:
                r = run_target(name, min(int(slice_minutes * 60), left), log_dir)
            except Exception as exc:  # noqa: BLE001 - one target must not stop the others
                r = Result(name, 0, -1, log=repr(exc))
            t = totals[name]
            t["slices"] += 1
            t["seconds"] += r.seconds
            t["execs"] += r.execs
            for key in ("exec_per_sec", "cov", "ft", "corpus"):
                t[key] = getattr(r, key) or t[key]
            t["findings"].update(r.findings)
            if r.rc != 0 and not r.findings:
                t["findings"].add(f"{r.log} (exit status {r.rc})")
            with (log_dir / "results.jsonl").open("a") as f:
                f.write(json.dumps({"time": time.strftime("%F %T"), **asdict(r)}) + "\n")
            _summary(log_dir, totals, deadline, done=False)
    _summary(log_dir, totals, deadline, done=True)
    return 1 if any(t["findings"] for t in totals.values()) else 0
