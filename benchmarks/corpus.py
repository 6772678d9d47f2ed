"""``content-corpus``: the same mixed corpus through both stacks, their speed and verdicts.

The ``content`` scenario (``benchmarks/content.py``) sends smtp-source's one plain message;
users of mlan/postfix-amavis get a mix. This scenario sends a fixed mix (:data:`PATTERN`:
85 % ham, 5 % GTUBE spam, 5 % EICAR, 5 % a banned attachment, a zip holding
``invoice.pdf.exe``) with one client of our own (:func:`send_corpus`: 20 sessions, one
message per session, as smtp-source) to pymta + clamd + spamd, pymta + clamd + rspamd and the
image's stack, in interleaved rounds, and reads what each did with every message: the
maildir (delivered, ``X-Spam-Flag: YES``) and the quarantine (pymta: ``pymta quarantine list
--json``; amavis: its ``$QUARANTINEDIR``). With the image's default destinies (virus and
banned D_DISCARD, spam D_PASS) the expected deliveries are the ham and the GTUBE messages;
a round ends when that many are in ``new/``. The EICAR and GTUBE strings are joined from two
halves at run time: no file of the repository holds either whole.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import io
import json
import re
import subprocess
import time
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.compare import CompareOptions, pymta_server, stop_server, wait_files, workdir
from benchmarks.content import (
    STACK_PORT,
    ContentOptions,
    ImageStack,
    Row,
    Scanners,
    _note,
    _stop_on_sigterm,
    _tail,
    clear,
    header,
    rows,
    tree_cpu,
    wait_quiet,
)
from benchmarks.floor import CpuCost, CpuSample
from benchmarks.loadgen import SMTPClientError, _Session, make_message
from benchmarks.report import (
    CONTENT_STACK,
    CONTENT_TARGETS,
    ContentResults,
    ContentRound,
    content_cpu_table,
    content_table,
    fmt,
    ratio,
    verdict,
)
from benchmarks.scenarios import REPO_ROOT, BenchmarkError, free_port, server_python

RESULTS_NAME = "content-corpus.md"
RECIPIENT = "box@example.com"
HAM, GTUBE_SPAM, EICAR_VIRUS, BANNED = "ham", "GTUBE", "EICAR", "banned"
KINDS = (HAM, GTUBE_SPAM, EICAR_VIRUS, BANNED)
PATTERN = tuple(GTUBE_SPAM if i == 5 else EICAR_VIRUS if i == 11 else BANNED if i == 17
                else HAM for i in range(20))
"""One block of 20 messages, repeated: 17 ham, one of each other kind, spread out."""
DELIVERED_KINDS = frozenset({HAM, GTUBE_SPAM})
"""What the image's default destinies deliver: spam D_PASS (tagged); virus and banned
D_DISCARD (quarantined, not delivered)."""
KIND_HEADER = "X-Bench-Kind"
WARM_UP = 20
SIZE = 4096
DEBIAN_DEFAULTS = Path("/etc/amavis/conf.d/20-debian_defaults")


# ---------------------------------------------------------------------- the corpus


def gtube() -> str:
    """SpamAssassin's GTUBE line, joined here (as tests/integration/test_spam_scanners.py)."""
    return "XJS*C4JDBQADN1.NSBN3*2IDNEN*" + "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def eicar() -> bytes:
    """The 68-byte EICAR test file, joined here (as tests/services/clamd.py)."""
    return b"X5O!P%@AP[4\\PZX54(P^)7CC)7}$EICAR" + b"-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"


def sender_of(kind: str) -> str:
    """One envelope sender per kind: pymta's quarantine list names the sender, so each
    quarantined message is matched with its kind without reading it."""
    return f"{kind.lower()}@remote.test"


def _head(kind: str, n: int, content_type: str) -> str:
    return (f"From: <{sender_of(kind)}>\r\nTo: <{RECIPIENT}>\r\n"
            f"Subject: corpus {kind} {n}\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: <{kind.lower()}.{n}.{time.time_ns()}@remote.test>\r\n"
            f"{KIND_HEADER}: {kind}\r\nMIME-Version: 1.0\r\nContent-Type: {content_type}\r\n"
            "\r\n")


def _filler(size: int) -> str:
    """Plain text lines, about ``size`` bytes, so that every kind is about 4 KiB."""
    line = "The quarterly figures are attached as agreed; please check the totals.\r\n"
    return line * max(0, size // len(line))


def _b64(data: bytes) -> str:
    import base64

    text = base64.b64encode(data).decode("ascii")
    return "\r\n".join(text[i:i + 76] for i in range(0, len(text), 76)) + "\r\n"


def _zip_with(name: str, data: bytes) -> bytes:
    """A zip archive holding one file ``name`` (fixed date: the same bytes every run)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return buf.getvalue()


def _attachment(kind: str, n: int, filename: str, ctype: str, data: bytes) -> bytes:
    boundary = f"=_corpus_{n}"
    text = (_head(kind, n, f'multipart/mixed; boundary="{boundary}"')
            + f"--{boundary}\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n"
            + _filler(SIZE - 1200)
            + f"--{boundary}\r\nContent-Type: {ctype}; name=\"{filename}\"\r\n"
            + f"Content-Disposition: attachment; filename=\"{filename}\"\r\n"
            + "Content-Transfer-Encoding: base64\r\n\r\n" + _b64(data)
            + f"--{boundary}--\r\n")
    return text.encode("ascii")


def build_message(kind: str, n: int) -> bytes:
    """Message ``n`` of ``kind`` (CRLF, ends with CRLF, no line starts with a dot)."""
    if kind == HAM:
        body = make_message(SIZE, sender_of(kind), RECIPIENT)
        return body.replace(b"\r\n\r\n", f"\r\n{KIND_HEADER}: {kind}\r\n\r\n".encode(), 1)
    if kind == GTUBE_SPAM:
        return (_head(kind, n, "text/plain; charset=us-ascii") + "Buy now!\r\n" + gtube()
                + "\r\n" + _filler(SIZE - 600)).encode("ascii")
    if kind == EICAR_VIRUS:
        return _attachment(kind, n, "eicar.com", "application/octet-stream", eicar())
    if kind == BANNED:
        payload = _zip_with("invoice.pdf.exe", b"not really a program\r\n" * 40)
        return _attachment(kind, n, "invoice.zip", "application/zip", payload)
    raise ValueError(f"unknown kind {kind!r}")


@dataclass(frozen=True, slots=True)
class Item:
    kind: str
    data: bytes


def corpus(messages: int) -> list[Item]:
    """``messages`` messages in :data:`PATTERN`'s order and proportion."""
    return [Item(PATTERN[i % len(PATTERN)], build_message(PATTERN[i % len(PATTERN)], i))
            for i in range(messages)]


def expected_deliveries(accepted: Mapping[str, int]) -> int:
    """How many messages must reach the maildir: the accepted ones of the delivered kinds."""
    return sum(accepted.get(kind, 0) for kind in DELIVERED_KINDS)


# ---------------------------------------------------------------------- the client


@dataclass
class Sent:
    """Replies per kind: ``2xx``, ``4xx``, ``5xx``, ``error`` (no final reply)."""

    replies: dict[str, Counter[str]] = field(default_factory=dict)
    seconds: float = 0.0

    def count(self, kind: str, what: str) -> None:
        self.replies.setdefault(kind, Counter())[what] += 1

    def accepted(self) -> dict[str, int]:
        return {kind: c["2xx"] for kind, c in self.replies.items()}

    @property
    def failed(self) -> int:
        return sum(n for c in self.replies.values() for k, n in c.items() if k != "2xx")


async def _send_one(port: int, item: Item, sent: Sent, timeout: float) -> None:
    """One session, one message, QUIT (as smtp-source without ``-d``)."""
    sender = sender_of(item.kind)
    envelope = (f"MAIL FROM:<{sender}>\r\n".encode(), f"RCPT TO:<{RECIPIENT}>\r\n".encode(),
                b"DATA\r\n")
    session: _Session | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            session = _Session(reader, writer, timeout)
            await session.greet("corpus.remote.test")
            code, _ = await session.transaction(envelope, item.data + b".\r\n",
                                                session.pipelining)
    except (OSError, TimeoutError, asyncio.IncompleteReadError, SMTPClientError):
        sent.count(item.kind, "error")
        if session is not None:
            session.writer.close()
        return
    sent.count(item.kind, f"{code // 100}xx")
    await session.quit()


async def send_corpus(port: int, items: Sequence[Item], sessions: int = 20,
                      timeout: float = 120.0) -> Sent:
    """``sessions`` at a time, each one message, until every item was sent once."""
    sent = Sent()
    queue = iter(items)
    start = time.perf_counter()

    async def worker() -> None:
        for item in queue:
            await _send_one(port, item, sent, timeout)

    await asyncio.gather(*(worker() for _ in range(sessions)))
    sent.seconds = time.perf_counter() - start
    return sent


# ---------------------------------------------------------------------- what each stack did


def _headers(data: bytes) -> dict[str, str]:
    """The header fields of a message (unfolded, lower-case names; the last one wins)."""
    head = re.split(rb"\r?\n\r?\n", data, maxsplit=1)[0].decode("latin-1")
    fields: dict[str, str] = {}
    for m in re.finditer(r"^([!-9;-~]+):[ \t]*(.*(?:\r?\n[ \t].*)*)", head, re.MULTILINE):
        fields[m.group(1).lower()] = re.sub(r"\s+", " ", m.group(2)).strip()
    return fields


def _read_head(path: Path, limit: int = 65536) -> bytes:
    opener: Callable[..., Any] = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data: bytes = f.read(limit)
    return data


def delivered(new: Path) -> Counter[tuple[str, bool]]:
    """(kind, X-Spam-Flag: YES) of every message in the maildir's ``new/``."""
    found: Counter[tuple[str, bool]] = Counter()
    for path in new.iterdir() if new.is_dir() else ():
        fields = _headers(_read_head(path))
        flagged = fields.get("x-spam-flag", "").upper().startswith("YES")
        found[(fields.get(KIND_HEADER.lower(), "?"), flagged)] += 1
    return found


def pymta_quarantine(state_dir: Path) -> dict[str, tuple[str, str]]:
    """Quarantine ID → (kind of the corpus, quarantine kind) from ``pymta quarantine list
    --json``, the command an administrator uses."""
    proc = subprocess.run([server_python(), "-m", "pymta", "quarantine", "list", "--json",
                           "--state-dir", str(state_dir)], capture_output=True, text=True,
                          cwd=REPO_ROOT, timeout=120)
    if proc.returncode:
        raise BenchmarkError(f"pymta quarantine list failed: {proc.stderr.strip()[-500:]}")
    by_sender = {sender_of(k): k for k in KINDS}
    return {e["id"]: (by_sender.get(e["sender"], "?"), e["kind"]) for e in json.loads(proc.stdout)}


def amavis_quarantine(directory: Path) -> dict[str, tuple[str, str]]:
    """File → (kind of the corpus, quarantine kind) of amavis's ``$QUARANTINEDIR``: the file
    name says the kind (``virus-``, ``banned-``, ``spam-...gz``, ``badh-``), the copy has our
    header."""
    found = {}
    for path in directory.rglob("*"):
        if path.is_file():
            kind = _headers(_read_head(path)).get(KIND_HEADER.lower(), "?")
            found[str(path)] = (kind, path.name.split("-", 1)[0])
    return found


@dataclass
class Verdicts:
    """Per corpus kind: messages sent, replies, deliveries (flagged or not), quarantined
    copies by quarantine kind; summed over the rounds of one configuration."""

    sent: Counter[str] = field(default_factory=Counter)
    replies: Counter[tuple[str, str]] = field(default_factory=Counter)
    delivered: Counter[tuple[str, bool]] = field(default_factory=Counter)
    quarantined: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, items: Sequence[Item], sent: Sent, found: Counter[tuple[str, bool]],
            quarantined: Mapping[str, tuple[str, str]]) -> None:
        self.sent.update(item.kind for item in items)
        for kind, codes in sent.replies.items():
            for code, n in codes.items():
                self.replies[(kind, code)] += n
        self.delivered.update(found)
        self.quarantined.update(quarantined.values())

    def outcome(self, kind: str) -> tuple[str, str]:
        """(what happened, the counts behind it): "delivered", "delivered, X-Spam-Flag: YES",
        "quarantined, not delivered", "rejected" or "mixed"; a quarantined copy of a
        delivered message is said in the counts."""
        n = self.sent[kind]
        plain, flagged = self.delivered[(kind, False)], self.delivered[(kind, True)]
        held = {q: c for (k, q), c in self.quarantined.items() if k == kind}
        rejected = self.replies[(kind, "5xx")]
        what = ("delivered" if plain == n else "delivered, X-Spam-Flag: YES" if flagged == n
                else "quarantined, not delivered" if sum(held.values()) == n and not
                plain + flagged else "rejected" if rejected == n else "mixed")
        counts = [f"{plain} delivered" if plain else "", f"{flagged} flagged" if flagged else "",
                  *(f"{c} quarantined as {q}" for q, c in sorted(held.items())),
                  f"{rejected} rejected" if rejected else ""]
        others = {c: m for (k, c), m in self.replies.items() if k == kind and c != "2xx"}
        counts += [f"{m} answered {c}" for c, m in sorted(others.items()) if c != "5xx"]
        return what, f"{', '.join(c for c in counts if c)} of {n}"


def verdict_table(labels: Mapping[str, str], verdicts: Mapping[str, Verdicts]) -> list[str]:
    """Per kind, what each configuration did; "agree" when all did the same."""
    keys = [k for k in labels if k in verdicts]
    rows = ["| kind | " + " | ".join(labels[k] for k in keys) + " | |",
            "|---|" + "---|" * len(keys) + "---|"]
    for kind in KINDS:
        outcomes = [verdicts[k].outcome(kind) for k in keys]
        same = len({what for what, _ in outcomes}) == 1 and outcomes[0][0] != "mixed"
        cells = [f"{what} ({counts})" for what, counts in outcomes]
        rows.append(f"| {kind} | " + " | ".join(cells) + f" | {'agree' if same else 'DISAGREE'} |")
    return rows


# ---------------------------------------------------------------------- the stack's banned rules


def debian_banned_rules(path: Path = DEBIAN_DEFAULTS) -> str:
    """``$banned_filename_re = new_RE(...);`` as Debian's amavisd-new ships it (the image's
    amavisd.conf has the same rules: double extensions, .exe/.com/.scr..., CLSIDs, MS
    executable types)."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise BenchmarkError(f"stack: cannot read {path} for the banned rules: {exc}") from None
    m = re.search(r"^\$banned_filename_re = new_RE\(.*?^\);", text, re.MULTILINE | re.DOTALL)
    if m is None:
        raise BenchmarkError(f"stack: no $banned_filename_re in {path}")
    return m.group(0)


def add_banned_rules(stack: ImageStack) -> None:
    """The recipe's amavisd.conf is read alone (``-c``, no conf.d), and amavisd itself bans
    nothing: without Debian's ``$banned_filename_re`` (from 20-debian_defaults, which the
    recipe otherwise mirrors) the stack would deliver ``invoice.pdf.exe``. Put in before
    the file's final ``1;``; the next restart reads it."""
    conf = stack.dir / "amavisd.conf"
    text = conf.read_text()
    if "$banned_filename_re" in text:
        return
    head, _, tail = text.rpartition("\n1;")
    conf.write_text(f"{head}\n# added by benchmarks/corpus.py: Debian's banned rules\n"
                    f"{debian_banned_rules()}\n1;{tail}")


# ---------------------------------------------------------------------- rounds


@dataclass(frozen=True)
class Target:
    """Where one configuration's mail goes: its port, maildir, quarantine reader, CPU roots."""

    port: int
    new: Path
    quarantine: Callable[[], dict[str, tuple[str, str]]]
    roots: Callable[[], Mapping[str, int | None]]
    settled: Callable[[], bool]
    log: Callable[[], str]


@dataclass
class CorpusBench:
    """Options, scanners, the stack (or None), the corpus, the results and the verdicts."""

    opts: ContentOptions
    scanners: Scanners
    stack: ImageStack | None
    items: list[Item]
    results: ContentResults
    verdicts: dict[str, Verdicts] = field(default_factory=dict)

    async def run_row(self, row: Row) -> ContentRound:
        if row.key == CONTENT_STACK:
            stack = self.stack
            assert stack is not None
            await asyncio.to_thread(stack.restart)
            target = Target(STACK_PORT, stack.new,
                            lambda: amavis_quarantine(stack.dir / "amavis" / "virusmails"),
                            stack.roots, stack.queue_empty,
                            lambda: _tail(stack.dir / "log" / "postfix.log"))
            return await self.measure(row, target)
        with workdir("pymta-bench-corpus-") as work:
            port = free_port()
            server = pymta_server(work, port, CompareOptions(workers=self.opts.workers),
                                  **row.env, **self.scanners.env(row))
            target = Target(port, work / "mail" / "box" / "new",
                            lambda: pymta_quarantine(work / "state"),
                            lambda: self._pymta_roots(server.proc, row), lambda: True,
                            lambda: server.log_tail(30))
            try:
                await server.start()
                return await self.measure(row, target)
            finally:
                stop_server(server)

    def _pymta_roots(self, proc: Any, row: Row) -> dict[str, int | None]:
        roots: dict[str, int | None] = {"pymta": proc.pid if proc else None}
        scanners = self.scanners.pids()
        if "clamd" in row.scanners and self.stack is not None:
            scanners["clamd"] = self.stack.roots()["clamd"]
        roots.update({k: v for k, v in scanners.items() if k in row.scanners})
        return roots

    async def measure(self, row: Row, t: Target) -> ContentRound:
        """Warm-up (the corpus's first 20), then the timed corpus; verdicts of the timed
        messages only (the quarantine before the round is subtracted)."""
        await self._deliver(t, self.items[:WARM_UP], 120.0)
        clear(t.new)
        before = await asyncio.to_thread(t.quarantine)
        await asyncio.to_thread(wait_quiet)
        trees = t.roots()
        cpu0, machine0 = tree_cpu(trees), CpuSample.now()
        started = time.perf_counter()
        sent = await send_corpus(t.port, self.items, self.opts.sessions)
        want = expected_deliveries(sent.accepted())
        got, seconds = await wait_files(t.new, want, started, self.opts.timeout(len(self.items)))
        cpu1, machine1 = tree_cpu(trees), CpuSample.now()
        handled = len(self.items) - sent.failed - (want - got)
        await self._settle(t)
        after = await asyncio.to_thread(t.quarantine)
        found = await asyncio.to_thread(delivered, t.new)
        self.verdicts.setdefault(row.key, Verdicts()).add(
            self.items, sent, found, {k: v for k, v in after.items() if k not in before})
        self._check(row, sent, want, got, t.log())
        cpu = {name: cpu1[name] - cpu0[name] for name in cpu0 if name in cpu1}
        return ContentRound(len(self.items), len(self.items) - sent.failed, handled, seconds,
                            cpu, CpuCost.between(machine0, machine1, handled))

    async def _deliver(self, t: Target, items: Sequence[Item], limit: float) -> None:
        sent = await send_corpus(t.port, items, 5)
        await wait_files(t.new, expected_deliveries(sent.accepted()),
                         time.perf_counter(), limit)
        await self._settle(t)

    async def _settle(self, t: Target, limit: float = 120.0) -> None:
        """Until the stack's queue is empty (amavis has judged every message)."""
        deadline = time.monotonic() + limit
        while not await asyncio.to_thread(t.settled) and time.monotonic() < deadline:
            await asyncio.sleep(0.5)

    def _check(self, row: Row, sent: Sent, want: int, got: int, log: str) -> None:
        self.results.add_errors(f"{row.label}: not accepted", sent.failed)
        self.results.add_errors(f"{row.label}: expected in the maildir, not there in time",
                                max(0, want - got))
        if sent.failed or got < want:
            _note(f"warning: {row.label}: replies {dict(sent.replies)}, {got} of {want} "
                  f"expected deliveries\nserver log (tail):\n{log}")


def corpus_rows(opts: ContentOptions, stack: bool) -> list[Row]:
    """The ``content`` scenario's scanner rows and the stack's (no filter-off rows: the
    corpus is about the filter)."""
    return [r for r in rows(opts, stack, plain=False) if r.key in CONTENT_TARGETS
            or r.key == CONTENT_STACK]


async def run_rounds(bench: CorpusBench) -> None:
    """``rounds`` rounds; the row order turns by one each round."""
    table = corpus_rows(bench.opts, bench.stack is not None)
    for n in range(bench.opts.rounds):
        for row in table[n % len(table):] + table[:n % len(table)]:
            r = await bench.run_row(row)
            bench.results.add(row.key, r)
            _note(f"round {n + 1}/{bench.opts.rounds} {row.label}: {r.rate:,.1f} msg/s "
                  f"({r.delivered}/{r.messages} handled in {r.seconds:.1f} s), servers + "
                  f"scanners {r.server_ms:.1f} ms/msg")


# ---------------------------------------------------------------------- the document


def proportions(messages: int) -> str:
    counts = Counter(PATTERN[i % len(PATTERN)] for i in range(messages))
    return ", ".join(f"{counts[k]:,} {k} ({counts[k] / max(1, messages):.0%})" for k in KINDS)


def targets(res: ContentResults) -> list[str]:
    """Issue 12's two ratio targets, on the corpus."""
    stack = res.rate(CONTENT_STACK)
    out = ["| target | measured | |", "|---|---|---|"]
    for key, target in CONTENT_TARGETS.items():
        r = ratio(res.rate(key), stack)
        out.append(f"| {res.labels.get(key, key)} ≥ {target:g}× the image's stack "
                   f"| {fmt(r, 2, '×')} | {verdict(r, target)} |")
    return out


def notes(opts: ContentOptions, stack: bool) -> list[str]:
    return [
        f"corpus: {proportions(opts.messages)}; the same {opts.messages:,} messages (built "
        "once, in the same order) for every row and round; ham is the loadgen message "
        f"(4 KiB), the others about 4 KiB too: GTUBE in a text/plain body, EICAR as a "
        "base64 attachment `eicar.com`, banned: a zip `invoice.zip` holding "
        "`invoice.pdf.exe`; each message has a header `X-Bench-Kind` and one envelope "
        "sender per kind (how the quarantines are matched with the kinds)",
        f"client: `benchmarks/corpus.py` (`send_corpus`, asyncio, `loadgen`'s session code): "
        f"{opts.sessions} sessions at a time, one message per session, as smtp-source; the "
        "same for every row (its CPU is in the machine's figure, not in the trees')",
        "msg/s = messages handled (delivered, or discarded into the quarantine) / time from "
        "the first connection until every expected delivery (the ham and the GTUBE "
        "messages: default destinies, spam D_PASS, virus and banned D_DISCARD) is in "
        "`new/`; CPU ms per message divided by the same count",
        "destinies: the image's defaults on both sides (pymta `FINAL_*_DESTINY` unset; "
        "amavis `$final_*_destiny` as in the recipe); amavis's tag2/kill level 6.31 "
        "(Debian), pymta's SA_TAG2_LEVEL_DEFLT 6.2 (the image's): GTUBE scores ~1000",
        "the stack: Postfix 2725 → amavisd-new ($max_servers="
        f"{opts.amavis_servers}, SpamAssassin in-process, clamd) → Postfix 10025 → virtual "
        "maildir, from its offline recipe (`--stack-recipe DIR`) with two fixes: the literal "
        "`$A/` paths of its amavisd.conf filled in (as in `content`), and Debian's "
        f"`$banned_filename_re` (read from {DEBIAN_DEFAULTS}) added, since that file is read "
        "alone (`-c`, no conf.d) and amavisd bans nothing without it; amavis also keeps a "
        "quarantined copy of passed spam (its default), pymta quarantines blocked mail only"
        if stack else "no stack recipe: pymta rows only (the tests' clamd)",
        "verdicts: every timed message of every round; delivered = in the maildir "
        "(`X-Spam-Flag: YES` read from it), quarantined = pymta `pymta quarantine list "
        "--json --state-dir`, amavis the files of its `$QUARANTINEDIR` (name prefix = "
        "kind); warm-up messages (the corpus's first 20) left out",
    ]


def render(res: ContentResults, verdicts: Mapping[str, Verdicts], *, head: Sequence[str],
           command: str, extra_notes: Sequence[str]) -> str:
    doc = ["# The mixed corpus: pymta's content filter vs the image's stack", "", *head, "",
           "## End-to-end throughput on the corpus (median of rounds; ratio = row / the "
           "image's stack)", "", *content_table(res), "", "## Targets (issue 12)", "",
           *targets(res), "", "## Verdicts on the same corpus (all timed rounds)", "",
           *verdict_table(res.labels, verdicts), "",
           "## CPU ms per message by process tree (median of rounds)", "",
           *content_cpu_table(res), "", "## Like for like", "",
           *(f"- {n}" for n in [*extra_notes, *res.notes]), ""]
    if res.errors:
        doc += ["## Failed or missing messages", "",
                *(f"- {what}: {n}" for what, n in res.errors.items()), ""]
    return "\n".join([*doc, f"Command: `{command}`", ""])


# ---------------------------------------------------------------------- running


async def run_corpus(opts: ContentOptions) -> tuple[ContentResults, dict[str, Verdicts]]:
    """Set up the stack and the scanners, run the rounds, stop everything."""
    from benchmarks.content import like_for_like

    recipe = opts.stack_recipe
    if recipe is not None and not (recipe / "10-setup.sh").exists():
        raise BenchmarkError(f"--stack-recipe {recipe}: no 10-setup.sh there")
    stack = ImageStack(recipe, opts.amavis_servers) if recipe else None
    scanners = Scanners(opts, stack.clamd_socket if stack else None)
    labels = {r.key: r.label for r in corpus_rows(opts, stack is not None)}
    shared = [n for n in like_for_like(opts, stack is not None)
              if not n.startswith(("the same client", "filtering off", "the stack:"))]
    results = ContentResults(labels, notes=shared)
    bench = CorpusBench(opts, scanners, stack, corpus(opts.messages), results)
    try:
        if stack is not None:
            _note(f"stack: setting up in {stack.dir}")
            await asyncio.to_thread(stack.setup, opts.install)
            add_banned_rules(stack)
        await asyncio.to_thread(scanners.start)
        await run_rounds(bench)
    finally:
        scanners.stop()
        if stack is not None:
            await asyncio.to_thread(stack.stop)
    return results, bench.verdicts


def main_corpus(opts: ContentOptions, *, command: str, results_dir: Path,
                run: Callable[[Any], Any] = asyncio.run) -> int:
    """Run, print the markdown, write ``results_dir/content-corpus.md``."""
    from benchmarks.compare import server_loop_name

    started = time.monotonic()
    with _stop_on_sigterm():
        results, verdicts = run(run_corpus(opts))
    took = time.monotonic() - started
    head = header(opts, took, server_loop_name(CompareOptions()))
    head[0] = (f"Load: the mixed corpus below, {opts.messages:,} messages, "
               f"{opts.sessions} sessions at a time, one message per session; medians of "
               f"{opts.rounds} interleaved rounds, fresh servers and a {WARM_UP}-message "
               f"warm-up (the corpus's first {WARM_UP}) per round; took {took / 60:.1f} min.")
    doc = render(results, verdicts, head=head, command=command,
                 extra_notes=notes(opts, opts.stack_recipe is not None))
    print(doc)
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / RESULTS_NAME
    out.write_text(doc)
    _note(f"written: {out}")
    return 0
