"""``content``: pymta's content filter side by side with the image's stack (issue 12).

The users of mlan/postfix-amavis run Postfix → amavisd-new (SpamAssassin in-process, clamd)
→ Postfix → maildir. This scenario puts the same load on that stack and on pymta with its
content filter, on the same machine, and reports delivered msg/s, the ratio to the stack and
the CPU each process tree spent per message. Rows (each ``--rounds`` times, interleaved,
every round on fresh servers after a 20-message warm-up):

* ``off``: pymta with every check off (``PIPELINE_OFF`` of ``compare.py``, which has
  ``PYMTA_BANNED_CHECK=no PYMTA_BAD_HEADER_CHECK=no``: no content stage at all), once with
  the scenario's load and once with the ``end-to-end`` scenario's 5,000 messages;
* ``plain``: the same 5,000 messages to pymta as it was before the content filter was wired
  in (``--plain-rev``, a ``git archive`` of that commit run with ``PYTHONSAFEPATH`` and
  ``PYTHONPATH``): "filtering off costs nothing" is ``off`` against ``plain``, same run, same
  machine (a recorded figure from another day, CPU or event loop says little);
* ``rspamd``: pymta + clamd + rspamd (banned files and bad headers at their defaults);
* ``spamd``: pymta + clamd + spamd (the same SpamAssassin as amavis's);
* ``stack``: the image's stack from its offline recipe (``--stack-recipe DIR``, the scripts
  ``00-install.sh`` … ``90-stop.sh``; ``$max_servers`` = ``--amavis-servers``, 2 as in the
  image), its inbound smtpd on port 2725.

Like for like: the same ``smtp-source -s 20 -m N -l 4096 -f load@remote.test -t
box@example.com`` for every row (the client is never the slower part); end to end = until
N files are in ``new/``; one clamd for everybody, the stack's own (its 2-signature test DB,
its configuration); spamd with the rules Debian ships, local tests only, like amavis's
``$sa_local_tests_only`` and SpamAssassin's defaults for Bayes; enough spamd children for
the cores (``--spamd-children``) and pymta's cap on messages in flight to each scanner
(``PYMTA_SCANNER_CONCURRENCY``, per worker) set so that all workers together match them.

The scanners come from ``tests/services`` (spamd, rspamd); without a stack recipe the pymta
rows run against the tests' clamd and the stack row is left out.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.compare import CompareOptions, pymta_server, stop_server, wait_files, workdir
from benchmarks.floor import CpuCost, CpuSample
from benchmarks.report import CONTENT_STACK, ContentResults, ContentRound
from benchmarks.scenarios import BenchmarkError, ServerProcess, free_port, server_python

SMTP_SOURCE = Path("/usr/sbin/smtp-source")
SENDER = "load@remote.test"
RECIPIENT = "box@example.com"
STACK_PORT = 2725
WARM_UP = 20
RECIPE_ENV = "PYMTA_BENCH_STACK_RECIPE"
RESULTS_NAME = "content.md"
LATEST = Path(__file__).resolve().parent / "results" / "latest.md"
END_TO_END_MESSAGES = CompareOptions().messages   # the end-to-end scenario's load
PLAIN_REV = "6b78530"
"""The last commit before the content filter was wired into the pipeline (issue 12)."""
HZ = os.sysconf("SC_CLK_TCK")
PLAIN = "plain"


@dataclass(frozen=True, slots=True)
class ContentOptions:
    """What ``python -m benchmarks --scenario content`` asked for."""

    rounds: int = 3
    messages: int = 1000
    sessions: int = 20
    size: int = 4096
    workers: int = 2                    # PYMTA_WORKERS: one per core
    spamd_children: int = 4             # enough SpamAssassin processes for 2 cores
    rspamd_workers: int = 2             # rspamd normal workers, one per core
    scanner_concurrency: int = 0        # per pymta worker; 0: spamd_children / workers
    amavis_servers: int = 2             # the image's $max_servers
    stack_recipe: Path | None = None
    plain_rev: str = PLAIN_REV          # "" or a commit git cannot find: no plain row
    install: bool = True                # run the recipe's 00-install.sh when amavisd is missing
    deliver_timeout: float = 120.0

    @property
    def concurrency(self) -> int:
        """Messages in flight to each scanner per pymta worker: all workers together match
        the spamd children (4 children / 2 workers = 2 each)."""
        return self.scanner_concurrency or max(1, self.spamd_children // self.workers)

    def timeout(self, messages: int) -> float:
        """Seconds to wait for the last delivery: the stack needs ~80 s per 1,000."""
        return max(self.deliver_timeout, messages / 4)


@dataclass(frozen=True)
class Row:
    """One configuration: ``env`` for the pymta server, the scanners it needs, its load."""

    key: str
    label: str
    env: Mapping[str, str] = field(default_factory=dict)
    scanners: tuple[str, ...] = ()
    messages: int | None = None         # None: the scenario's --messages


def rows(opts: ContentOptions, stack: bool, plain: bool) -> list[Row]:
    """The rows in table order; the stack's only when its recipe is there, the plain one
    only when its source tree could be made."""
    off = {"PYMTA_BANNED_CHECK": "no", "PYMTA_BAD_HEADER_CHECK": "no"}
    # PIPELINE_OFF switches these two off: the scanner rows put them back to their defaults
    scan = {"PYMTA_SCANNER_CONCURRENCY": str(opts.concurrency),
            "PYMTA_BANNED_CHECK": "yes", "PYMTA_BAD_HEADER_CHECK": "yes"}
    e2e = f"{END_TO_END_MESSAGES:,} messages (the end-to-end load)"
    table = [
        Row("off", "pymta, filter off", off),
        Row("off-e2e", f"pymta, filter off, {e2e}", off, messages=END_TO_END_MESSAGES),
    ]
    if plain:
        table.append(Row(PLAIN, f"pymta {opts.plain_rev} (before the filter), {e2e}",
                         messages=END_TO_END_MESSAGES))
    table += [
        Row("rspamd", "pymta + clamd + rspamd", scan, ("clamd", "rspamd")),
        Row("spamd", "pymta + clamd + spamd", scan, ("clamd", "spamd")),
    ]
    if stack:
        table.append(Row(CONTENT_STACK, f"the image's stack: Postfix + amavisd-new "
                         f"($max_servers={opts.amavis_servers}) + clamd", scanners=("clamd",)))
    return table


# ------------------------------------------------------------------ CPU of process trees


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid → (ppid, utime + stime + cutime + cstime in ticks) of every live process."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()   # comm may hold spaces: split after ')'
        table[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    return table


def tree_cpu(roots: Mapping[str, int | None]) -> dict[str, float]:
    """CPU seconds of each named process tree: every live process under the root plus what
    its exited children spent (cutime/cstime), as the stack's recipe counts it."""
    table = _proc_table()
    spent: dict[str, float] = {}
    for name, root in roots.items():
        if root is None or root not in table:
            continue
        ticks = 0
        for pid, (_, t) in table.items():
            p = pid
            while p not in (root, 0, 1) and p in table:
                p = table[p][0]
            if p == root:
                ticks += t
        spent[name] = ticks / HZ
    return spent


def wait_quiet(limit: float = 30.0) -> None:
    """Wait (at most ``limit`` s) until the machine is nearly idle (< 0.15 core busy over
    1 s), so that a round does not start into another job's burst."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = CpuSample.now()
        time.sleep(1.0)
        after = CpuSample.now()
        if (after.user + after.system) - (before.user + before.system) < 0.15:
            return


# ---------------------------------------------------------------------- the load


@dataclass(frozen=True, slots=True)
class Load:
    accepted: int
    failed: int
    complaints: tuple[str, ...]
    cpu_s: float                        # smtp-source's own user + system time


def smtp_source(port: int, sessions: int, messages: int, size: int) -> Load:
    """The issue's load: ``smtp-source -s S -m N -l SIZE -f load@remote.test -t
    box@example.com``; each failed session prints one line, nothing else is printed."""
    argv = [str(SMTP_SOURCE), "-s", str(sessions), "-m", str(messages), "-l", str(size),
            "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{port}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, for its rusage
    complaints = tuple(ln for ln in out.decode(errors="replace").splitlines() if ln.strip())
    failed = min(messages, len(complaints) + (1 if proc.returncode else 0))
    return Load(messages - failed, failed, complaints, usage.ru_utime + usage.ru_stime)


def clear(new: Path) -> None:
    """Empty a maildir's ``new/`` (the warm-up's messages)."""
    with contextlib.suppress(FileNotFoundError), os.scandir(new) as it:
        for entry in it:
            os.unlink(entry.path)


async def timed_round(port: int, new: Path, roots: Callable[[], Mapping[str, int | None]],
                      messages: int, opts: ContentOptions) -> tuple[ContentRound, Load]:
    """One timed load: CPU of the trees and of the machine before and after, the time from
    the first connection until ``messages`` files (as many as were accepted) are in ``new``."""
    await asyncio.to_thread(wait_quiet)
    trees = roots()
    cpu0, machine0 = tree_cpu(trees), CpuSample.now()
    started = time.perf_counter()
    load = await asyncio.to_thread(smtp_source, port, opts.sessions, messages, opts.size)
    delivered, seconds = await wait_files(new, load.accepted, started,
                                          opts.timeout(messages))
    cpu1, machine1 = tree_cpu(trees), CpuSample.now()
    cpu = {name: cpu1[name] - cpu0[name] for name in cpu0 if name in cpu1}
    cpu["smtp-source"] = load.cpu_s
    return ContentRound(messages, load.accepted, delivered, seconds, cpu,
                        CpuCost.between(machine0, machine1, delivered)), load


async def warm_up(port: int, new: Path, settled: Callable[[], bool]) -> None:
    """20 messages through, delivered and removed, before the timed load (the stack's
    recipe does the same): first-message costs stay out of the figure."""
    load = await asyncio.to_thread(smtp_source, port, 5, WARM_UP, 4096)
    await wait_files(new, load.accepted, time.perf_counter(), 120.0)
    deadline = time.monotonic() + 60
    while not await asyncio.to_thread(settled) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    clear(new)


# ---------------------------------------------------------------------- scanners


class Scanners:
    """clamd (the stack's, else the tests'), spamd and rspamd from ``tests/services``, started
    once for the whole run and sized for the cores (``ContentOptions``)."""

    def __init__(self, opts: ContentOptions, clamd_socket: Path | None) -> None:
        self.opts = opts
        self.clamd_socket = clamd_socket
        self.services: dict[str, Any] = {}

    def start(self) -> None:
        if self.clamd_socket is None:
            from tests.services.clamd import ClamdServer

            clamd = ClamdServer().start()
            self.services["clamd"] = clamd
            self.clamd_socket = Path(clamd.socket)   # type: ignore[attr-defined]
        self.services["spamd"] = _spamd(self.opts.spamd_children).start()
        self.services["rspamd"] = _rspamd(self.opts.rspamd_workers).start()

    def env(self, row: Row) -> dict[str, str]:
        """pymta's variables for the scanners of ``row``."""
        env = {}
        if "clamd" in row.scanners:
            env["PYMTA_CLAMD"] = f"unix:{self.clamd_socket}"
        if "spamd" in row.scanners:
            env["PYMTA_SPAMD"] = self.services["spamd"].address
        if "rspamd" in row.scanners:
            env["PYMTA_RSPAMD"] = self.services["rspamd"].address
        return env

    def pids(self) -> dict[str, int | None]:
        return {name: service.pid for name, service in self.services.items()}

    def stop(self) -> None:
        from tests.services.base import stop_all

        stop_all(self.services.values())


def _spamd(children: int) -> Any:
    """The tests' spamd with ``children`` SpamAssassin processes, all forked at start, and
    SpamAssassin's own Bayes default (auto-learn on, as amavis runs it) instead of the
    tests' fixed "off"."""
    from tests.services.spamd import SpamdServer

    class BenchSpamd(SpamdServer):
        def _spawn(self, argv: Sequence[str], log: Path,
                   env: dict[str, str] | None = None) -> None:
            argv = [a for a in argv if not a.startswith(("--max-children=", "--min-children="))]
            argv += [f"--max-children={children}", f"--min-children={children}"]
            with open(self.dir / "site" / "local.cf", "a") as f:
                f.write("bayes_auto_learn 1\n")
            super()._spawn(argv, log, env)

    return BenchSpamd()


def _rspamd(workers: int) -> Any:
    """The tests' rspamd (no redis) with ``workers`` normal workers and its network tests off
    (the ``rbl`` module: DNSBL, SURBL, URIBL, DBL), as spamd's ``--local``: with no DNS
    server to ask, each of those lookups waits out rspamd's 1 s DNS timeout, so every message
    took a second and the row measured the timeout, not rspamd or pymta."""
    from tests.services.rspamd import RspamdServer

    class BenchRspamd(RspamdServer):
        def _spawn(self, argv: Sequence[str], log: Path,
                   env: dict[str, str] | None = None) -> None:
            override = self.dir / "etc" / "override.d"
            (override / "worker-normal.inc").write_text(
                f'bind_socket = "{self.address}";\ncount = {workers};\n')
            (override / "rbl.conf").write_text("enabled = false;\n")
            super()._spawn(argv, log, env)

    return BenchRspamd()


# ---------------------------------------------------------------------- the image's stack


class ImageStack:
    """The image's stack from its offline recipe, in a scratch directory of its own
    (``SEED_STACK_DIR`` to the scripts): Postfix on 2725 → amavisd-new on 10024 →
    Postfix on 10025 → maildir ``mail/example.com/box``, clamd on ``run/clamd.sock``."""

    def __init__(self, recipe: Path, servers: int) -> None:
        self.recipe = recipe
        self.servers = servers
        self.dir = Path(tempfile.mkdtemp(prefix="pymta-bench-stack-"))
        self.dir.chmod(0o755)      # postfix and amavis must traverse it

    @property
    def new(self) -> Path:
        return self.dir / "mail" / "example.com" / "box" / "new"

    @property
    def clamd_socket(self) -> Path:
        return self.dir / "run" / "clamd.sock"

    def script(self, name: str, *args: str, timeout: float = 900) -> str:
        """Run one of the recipe's scripts; BenchmarkError with its output when it fails."""
        env = dict(os.environ, SEED_STACK_DIR=str(self.dir))
        try:
            proc = subprocess.run([str(self.recipe / name), *args], env=env,  # its #!
                                  capture_output=True, text=True, timeout=timeout,
                                  cwd=self.dir, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise BenchmarkError(f"stack: {name} took over {timeout:.0f} s") from None
        if proc.returncode:
            out = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
            raise BenchmarkError(f"stack: {name} {' '.join(args)} failed "
                                 f"(exit {proc.returncode}):\n" + "\n".join(out))
        return proc.stdout

    def setup(self, install: bool) -> None:
        """Install (only when amavisd is missing and allowed), configure, start, filter on."""
        if shutil.which("amavisd", path=os.environ.get("PATH", "") + ":/usr/sbin") is None:
            if not install:
                raise BenchmarkError("amavisd-new is not installed (--no-install)")
            _note("stack: installing the recipe's Debian packages (00-install.sh)")
            self.script("00-install.sh")
        self.script("10-setup.sh")
        self._fill_in_amavis_paths()
        self.script("20-start.sh", str(self.servers))
        self.script("30-filter.sh", "on")

    def _fill_in_amavis_paths(self) -> None:
        """The recipe writes ``amavisd.conf`` from a quoted here-document, so its
        ``$A/...`` paths (MYHOME, the log file, the clamd socket) stay literal and amavisd
        refuses the file (``Global symbol "$A"``); they are put in here."""
        conf = self.dir / "amavisd.conf"
        text = conf.read_text()
        if "$A/" in text:
            conf.write_text(text.replace("$A/", f"{self.dir}/"))
            _note("stack: amavisd.conf: literal $A/ paths replaced by the stack's directory")

    def restart(self) -> None:
        """Fresh servers for a round: Postfix and amavisd stopped and started again (clamd,
        shared with the pymta rows, stays)."""
        master = self._pid("pf-spool/pid/master.pid")
        subprocess.run(["postfix", "-c", str(self.dir / "pf"), "stop"], capture_output=True)
        _wait_gone(master)
        subprocess.run(["amavisd", "-c", str(self.dir / "amavisd.conf"), "-c",
                        str(self.dir / "amavis-maxservers.conf"), "stop"], capture_output=True)
        _wait_gone(self._pid("amavis/amavisd.pid"))
        self.script("20-start.sh", str(self.servers))
        self.script("30-filter.sh", "on")

    def queue_empty(self) -> bool:
        out = subprocess.run(["postqueue", "-c", str(self.dir / "pf"), "-p"],
                             capture_output=True, text=True).stdout
        return "Mail queue is empty" in out

    def roots(self) -> dict[str, int | None]:
        return {"postfix": self._pid("pf-spool/pid/master.pid"),
                "amavis": self._pid("amavis/amavisd.pid"),
                "clamd": self._pid("run/clamd.fgpid")}

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.dir / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        with contextlib.suppress(BenchmarkError):
            self.script("90-stop.sh", timeout=120)
        if not os.environ.get("PYMTA_BENCH_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)


def _wait_gone(pid: int | None, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


# ---------------------------------------------------------------------- pymta before the filter


REPO = Path(__file__).resolve().parent.parent


def plain_tree(rev: str, into: Path) -> Path | None:
    """pymta's source at ``rev`` (``git archive``: read-only) under ``into``, checked to be
    what ``python -m pymta`` imports with :func:`plain_env`; None (with a note) when git or
    the commit is missing."""
    if not rev:
        return None
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev],
                                 capture_output=True, timeout=120, check=True).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        _note(f"note: no plain row: git archive {rev} failed ({exc})")
        return None
    import io
    import tarfile

    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    probe = subprocess.run(
        [server_python(), "-c", "import pymta, pymta.delivery; print(pymta.__file__); "
         "print(pymta.delivery.__file__)"],
        env=dict(os.environ, **plain_env(into)), capture_output=True, text=True, cwd=REPO)
    files = probe.stdout.split()
    if probe.returncode or len(files) != 2 or not all(f.startswith(str(into)) for f in files):
        raise BenchmarkError(f"plain row: pymta at {rev} does not import from {into}: "
                             f"{probe.stdout} {probe.stderr[-500:]}")
    return into


def plain_env(tree: Path) -> dict[str, str]:
    """Run pymta from ``tree``: no working directory on sys.path (``PYTHONSAFEPATH``, kept by
    the forked workers), the tree first."""
    return {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(tree)}


# ---------------------------------------------------------------------- rounds


@dataclass
class Bench:
    """Everything a run holds: options, scanners, the stack (or None), the results."""

    opts: ContentOptions
    scanners: Scanners
    stack: ImageStack | None
    results: ContentResults
    plain: Path | None = None           # pymta's source before the filter (the plain row)

    async def run_row(self, row: Row) -> ContentRound:
        messages = row.messages or self.opts.messages
        if row.key == CONTENT_STACK:
            return await self._stack_round(messages)
        return await self._pymta_round(row, messages)

    async def _pymta_round(self, row: Row, messages: int) -> ContentRound:
        copts = CompareOptions(workers=self.opts.workers)
        with workdir("pymta-bench-content-") as work:
            port = free_port()
            extra = {**row.env, **self.scanners.env(row)}
            if row.key == PLAIN and self.plain is not None:
                extra.update(plain_env(self.plain))
            server = pymta_server(work, port, copts, **extra)
            new = work / "mail" / "box" / "new"
            try:
                await server.start()
                await warm_up(port, new, lambda: True)
                result, load = await timed_round(
                    port, new, lambda: self._pymta_roots(server, row), messages, self.opts)
            finally:
                stop_server(server)
            self._check(row, result, load, server.log_tail(30))
            return result

    def _pymta_roots(self, server: ServerProcess, row: Row) -> dict[str, int | None]:
        assert server.proc is not None
        roots: dict[str, int | None] = {"pymta": server.proc.pid}
        scanners = self.scanners.pids()
        if "clamd" in row.scanners and self.stack is not None:
            scanners["clamd"] = self.stack.roots()["clamd"]
        roots.update({k: v for k, v in scanners.items() if k in row.scanners})
        return roots

    async def _stack_round(self, messages: int) -> ContentRound:
        stack = self.stack
        assert stack is not None
        await asyncio.to_thread(stack.restart)
        await warm_up(STACK_PORT, stack.new, stack.queue_empty)
        result, load = await timed_round(STACK_PORT, stack.new, stack.roots, messages,
                                         self.opts)
        self._check(self.results.labels[CONTENT_STACK], result, load,
                    _tail(stack.dir / "log" / "postfix.log"))
        return result

    def _check(self, row: Row | str, r: ContentRound, load: Load, log: str) -> None:
        """Failures go into the results and, with the complaints and the log, to stderr."""
        label = row.label if isinstance(row, Row) else row
        self.results.add_errors(f"{label}: not accepted", load.failed)
        self.results.add_errors(f"{label}: accepted, not delivered in time",
                                r.accepted - r.delivered)
        if load.failed or r.delivered < r.accepted:
            _note(f"warning: {label}: {load.failed} not accepted, {r.delivered} of "
                  f"{r.accepted} delivered; client said:\n  " + "\n  ".join(load.complaints[:10])
                  + f"\nserver log (tail):\n{log}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _note(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def run_rounds(bench: Bench) -> None:
    """``rounds`` rounds; the row order turns by one each round, so a noisy minute does not
    always hit the same row."""
    table = rows(bench.opts, bench.stack is not None, bench.plain is not None)
    for n in range(bench.opts.rounds):
        order = table[n % len(table):] + table[:n % len(table)]
        for row in order:
            r = await bench.run_row(row)
            bench.results.add(row.key, r)
            _note(f"round {n + 1}/{bench.opts.rounds} {row.label}: {r.rate:,.1f} msg/s "
                  f"({r.delivered}/{r.messages} in {r.seconds:.1f} s), servers + scanners "
                  f"{r.server_ms:.1f} ms/msg, " + ", ".join(
                      f"{k} {1000 * v / max(1, r.delivered):.1f}" for k, v in r.cpu_s.items()))


# ---------------------------------------------------------------------- the document


def recorded_end_to_end(path: Path = LATEST) -> tuple[float, str] | None:
    """The recorded pymta end-to-end figure (smtp-source row) of the side-by-side results:
    (msg/s, where from), None when there is none."""
    try:
        text = path.read_text()
    except OSError:
        return None
    date = re.search(r"^- date: (\S+)", text, re.MULTILINE)
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[0] == "end-to-end" and cells[1].startswith("smtp-source"):
            with contextlib.suppress(ValueError):
                return (float(cells[3].replace(",", "")),
                        f"results/{path.name} of {date.group(1) if date else '?'}, {cells[1]}")
    return None


def _version(package: str) -> str:
    proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package],
                          capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else "not installed"


def header(opts: ContentOptions, took: float, server_loop: str) -> list[str]:
    """The load and the machine, as the other results documents give them."""
    from benchmarks.report import cpu_model, usable_cores

    versions = ", ".join(f"{p} {_version(p)}" for p in (
        "postfix", "amavisd-new", "spamassassin", "clamav-daemon", "rspamd"))
    return [
        f"Load: `smtp-source -s {opts.sessions} -m N -l {opts.size} -f {SENDER} -t "
        f"{RECIPIENT}` (N = {opts.messages:,} unless the row says otherwise); delivered "
        f"msg/s = N / time from the first connection until N files are in the maildir's "
        f"`new/`; medians of {opts.rounds} interleaved rounds, fresh servers and a "
        f"{WARM_UP}-message warm-up per round; took {took / 60:.1f} min.", "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- cores: {usable_cores()} ({cpu_model()})",
        f"- kernel: {platform.system()} {platform.release()}; python "
        f"{platform.python_version()}; pymta server event loop: {server_loop}",
        f"- pymta: PYMTA_WORKERS={opts.workers}, PYMTA_SCANNER_CONCURRENCY={opts.concurrency} "
        f"per worker, {opts.workers * opts.concurrency} in all (in flight to each scanner)",
        f"- packages: {versions}",
    ]


def like_for_like(opts: ContentOptions, stack: bool) -> list[str]:
    """What the rows share and what was chosen, for the document."""
    clamd = ("the stack's own clamd for every row (its 2-signature test DB, hash + body "
             "signature of EICAR; clamd 1.4 defaults)" if stack else
             "the tests' clamd (1 test signature): no stack recipe, no stack row")
    return [
        "the same client for every row: smtp-source (C), the issue's load",
        clamd,
        f"spamd: the rules Debian ships, `--local` (amavis: `$sa_local_tests_only = 1`), "
        f"Bayes at SpamAssassin's defaults (untrained, auto-learn on); "
        f"`--max-children={opts.spamd_children} --min-children={opts.spamd_children}`; "
        f"pymta sends at most {opts.concurrency} per worker × {opts.workers} workers = "
        f"{opts.concurrency * opts.workers} at a time",
        f"rspamd: the tests' set-up (no redis), {opts.rspamd_workers} normal workers, its "
        "network tests off (the rbl module: DNSBL/SURBL/URIBL/DBL), as spamd's `--local`; "
        "with no DNS server each lookup waits out rspamd's 1 s timeout",
        f"filtering off is compared with pymta at {opts.plain_rev} (`git archive`, the last "
        "commit before the filter was wired in) in the same run, same load: a recorded "
        "figure of another day, CPU or event loop says little",
        "pymta: SPF, DKIM, DMARC, ARC, SRS off in every row (the stack does none of them); "
        "banned files and bad headers at their defaults (on) in the scanner rows, as amavis "
        "does them",
        f"the stack: Postfix 2725 → amavisd-new ($max_servers={opts.amavis_servers}, "
        "SpamAssassin in-process, clamd) → Postfix 10025 → virtual maildir, from its offline "
        "recipe (`--stack-recipe DIR`) as it is, but for one fix: its amavisd.conf is written "
        "from a quoted here-document, so the literal `$A/` paths are filled in here",
        "CPU per message: utime + stime (with reaped children) of each process tree from "
        "/proc before and after the round; machine busy from /proc/stat (everything, the "
        "client and the kernel too)",
    ]


async def run_content(opts: ContentOptions) -> ContentResults:
    """Set up the stack and the scanners, run the rounds, stop everything."""
    if not SMTP_SOURCE.exists():
        raise BenchmarkError(f"{SMTP_SOURCE} not found (Debian package postfix)")
    recipe = opts.stack_recipe
    if recipe is not None and not (recipe / "10-setup.sh").exists():
        raise BenchmarkError(f"--stack-recipe {recipe}: no 10-setup.sh there")
    if recipe is None:
        _note(f"note: no stack recipe (--stack-recipe or {RECIPE_ENV}): pymta rows only")
    stack = ImageStack(recipe, opts.amavis_servers) if recipe else None
    scanners = Scanners(opts, stack.clamd_socket if stack else None)
    with workdir("pymta-bench-plain-") as scratch:
        plain = plain_tree(opts.plain_rev, scratch / "src")
        labels = {r.key: r.label for r in rows(opts, stack is not None, plain is not None)}
        results = ContentResults(labels, notes=like_for_like(opts, stack is not None),
                                 off_row="off-e2e", plain_row=PLAIN,
                                 recorded=None if plain else recorded_end_to_end())
        try:
            if stack is not None:
                _note(f"stack: setting up in {stack.dir}")
                await asyncio.to_thread(stack.setup, opts.install)
            await asyncio.to_thread(scanners.start)
            await run_rounds(Bench(opts, scanners, stack, results, plain))
        finally:
            scanners.stop()
            if stack is not None:
                await asyncio.to_thread(stack.stop)
    return results


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the run through the same clean-up as an error (daemons stopped)."""
    def raise_exit(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)
    old = signal.signal(signal.SIGTERM, raise_exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main_content(opts: ContentOptions, *, command: str, results_dir: Path,
                 run: Callable[[Any], Any] = asyncio.run) -> int:
    """Run, print the markdown, write ``results_dir/content.md``."""
    from benchmarks.compare import server_loop_name
    from benchmarks.report import render_content

    started = time.monotonic()
    with _stop_on_sigterm():
        results = run(run_content(opts))
    took = time.monotonic() - started
    doc = render_content(results, header=header(opts, took, server_loop_name(CompareOptions())),
                         command=command)
    print(doc)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / RESULTS_NAME
    out.write_text(doc)
    _note(f"written: {out}")
    return 0
