"""The content filter as two pipeline stages: amavis's job in the image, one scan per message.

:class:`ContentCheck` (a check, ``content``) runs the configured inspections over the spooled
message at once -- clamd, the spam engine (spamd or rspamd), the banned-files walk (in a
thread: it is CPU work) and the bad-header check -- and decides by the ``FINAL_*_DESTINY``
settings. :class:`ContentTags` (a modifier, ``content-tags``) writes what the check found into
the header section: ``X-Virus-Scanned``, amavis's ``X-Spam-Flag``/``-Score``/``-Level``/
``-Status`` (fields of our names that came with the message are removed first, so a sender
cannot say ``X-Spam-Flag: NO`` or ``X-Virus-Scanned`` for us),
``X-Amavis-Alert`` for content that passed although found, and the optional subject tag.
The check keeps its findings in ``Transaction.results`` under :data:`REPORT` for the modifier.

**Who is filtered** (the image: amavis only tags mail for ``MAIL_DOMAIN``): a message with a
recipient in our domains gets every check and the header fields, whoever sends it; mail
that only leaves (a trusted client relaying to foreign domains) is scanned for viruses only
and gets no header fields. One verdict per message: a blocking destiny blocks every
recipient of it.

**Destinies.** The kinds in amavis's order of precedence: virus, banned, spam (score at or
above ``SA_KILL_LEVEL_DEFLT``), bad header. The first kind found whose destiny is not PASS
decides: DISCARD accepts the message into the quarantine (``250``, not delivered); REJECT
answers ``554`` at the end of data (nothing for us to bounce: the client's MTA tells its
sender) and keeps a copy in the quarantine; BOUNCE quarantines and sends the sender a
failure notice -- never for a virus, whose sender is almost always forged (it is a DISCARD
then, as amavis does). Everything blocked is quarantined (``pymta.queue.quarantine``).

**Failures** (the lesson of five-daemon setups): a scanner that cannot answer (refused, timed
out, garbled) is a stated policy, not an accident: ``PYMTA_VIRUS_ON_ERROR`` (``tempfail``,
default: ``451 4.7.1``, the client retries; or ``pass``: ``X-Virus-Scanned: unchecked`` and a
NOTICE line) and ``PYMTA_SPAM_ON_ERROR`` (``pass``, default: no spam header fields; or
``tempfail``). Each
scanner's outage is logged when it starts and when it ends, not once per message; each
message says in its own log line that it was not scanned. A message larger than clamd's
``StreamMaxLength`` is passed unchecked with an ``X-Amavis-Alert`` (deferring it would defer
it forever).
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from pymta import metrics
from pymta.pipeline import SpooledBody, Transaction
from pymta.pipeline.headers import field_name
from pymta.types import Action, Reply, Verdict

from .badheader import MISSING, BadHeader, HeaderFinding
from .banned import BannedFiles, BannedItem
from .clamd import ClamdClient, ClamdResult, ClamdStatus
from .netio import ScannerError
from .rspamd import Envelope as RspamdEnvelope
from .rspamd import RspamdClient
from .spamd import SpamdClient

__all__ = ["REPORT", "ContentCheck", "ContentPolicy", "ContentReport", "ContentTags",
           "RspamdEngine", "SpamEngine", "SpamScore", "SpamdEngine"]

log = logging.getLogger("pymta.content")

REPORT = "content-report"
"""``Transaction.results`` key of the check's :class:`ContentReport`."""

VIRUS, BANNED, SPAM, BAD_HEADER = "virus", "banned", "spam", "bad-header"
KINDS = (VIRUS, BANNED, SPAM, BAD_HEADER)
"""The kinds of blocked content, in amavis's order of precedence."""

_SPAM_FIELDS = ("X-Spam-Flag", "X-Spam-Score", "X-Spam-Level", "X-Spam-Status")
# Fields only we write: a copy that came with the message is removed from mail we tag.
_OUR_FIELDS = frozenset(n.lower() for n in (*_SPAM_FIELDS, "X-Virus-Scanned", "X-Amavis-Alert",
                                             "X-Quarantine-ID"))
_NOTICE = 25            # the log level pymta logs notices at (pymta.log)
_UNSAFE = re.compile(r"[^\x20-\x7e]")
_RULE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def _safe(text: str, limit: int = 120) -> str:
    """Text from a scanner or the message (a virus name, a file name) made safe for a reply
    line, a header field and a log line: printable ASCII, cut to ``limit``."""
    text = _UNSAFE.sub("?", text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- spam engines


@dataclass(frozen=True, slots=True)
class SpamScore:
    """One spam engine's answer in the terms the levels compare: ``spam`` is the engine's
    own verdict (spamd's required score, rspamd's action), used for a level left unset."""

    engine: str
    score: float
    tests: tuple[str, ...]
    spam: bool
    reject: bool


class SpamEngine(Protocol):
    name: str
    address: object

    async def score(self, path: str, txn: Transaction) -> SpamScore: ...


class SpamdEngine:
    """SpamAssassin's spamd (``SYMBOLS``)."""

    name = "spamd"

    def __init__(self, client: SpamdClient) -> None:
        self.client = client
        self.address = client.address

    async def score(self, path: str, txn: Transaction) -> SpamScore:
        result = await self.client.check(path)
        return SpamScore(self.name, result.score, result.rules, result.is_spam, result.is_spam)


class RspamdEngine:
    """rspamd (``/checkv2``, with the envelope and client as headers)."""

    name = "rspamd"

    def __init__(self, client: RspamdClient) -> None:
        self.client = client
        self.address = client.address

    async def score(self, path: str, txn: Transaction) -> SpamScore:
        envelope = RspamdEnvelope(
            ip=txn.peer_ip, helo=txn.helo, hostname=txn.hostname, mail_from=txn.sender,
            rcpts=tuple(r.address for r in txn.recipients), queue_id=txn.qid,
            user=txn.auth_user or "")
        result = await self.client.check(path, envelope)
        return SpamScore(self.name, result.score, result.symbols,
                         result.is_spam, result.action == "reject")


# --------------------------------------------------------------------------- policy, report


@dataclass(frozen=True, slots=True)
class ContentPolicy:
    """The settings the check decides by (the image's names; ``pymta.config``)."""

    hostname: str = "localhost"
    tag_level: float | None = 2.0          # SA_TAG_LEVEL_DEFLT
    tag2_level: float | None = 6.2         # SA_TAG2_LEVEL_DEFLT
    kill_level: float | None = 6.9         # SA_KILL_LEVEL_DEFLT
    destinies: Mapping[str, str] = field(default_factory=lambda: {
        VIRUS: "discard", BANNED: "discard", SPAM: "pass", BAD_HEADER: "pass"})
    virus_on_error: str = "tempfail"       # PYMTA_VIRUS_ON_ERROR
    spam_on_error: str = "pass"            # PYMTA_SPAM_ON_ERROR
    subject_tag: str = ""                  # PYMTA_SPAM_SUBJECT_TAG

    def tagged(self, spam: SpamScore) -> bool:
        """X-Spam-* fields are written (``SA_TAG_LEVEL_DEFLT``; unset: always)."""
        return self.tag_level is None or spam.score >= self.tag_level

    def flagged(self, spam: SpamScore) -> bool:
        """``X-Spam-Flag: YES`` (``SA_TAG2_LEVEL_DEFLT``; unset: the engine's verdict)."""
        return spam.spam if self.tag2_level is None else spam.score >= self.tag2_level

    def killed(self, spam: SpamScore) -> bool:
        """The spam destiny applies (``SA_KILL_LEVEL_DEFLT``; unset: spamd's verdict or
        rspamd's ``reject`` action)."""
        return spam.reject if self.kill_level is None else spam.score >= self.kill_level


@dataclass(slots=True)
class ContentReport:
    """What the check found in one message, for the modifier and the log."""

    tag: bool = False                       # inbound to our domains: header fields written
    virus_scanned: bool = False
    viruses: tuple[str, ...] = ()
    unchecked: str = ""                     # why the virus scan did not judge it
    banned: tuple[BannedItem, ...] = ()
    bad_header: tuple[HeaderFinding, ...] = ()
    spam: SpamScore | None = None
    kind: str = ""                          # the kind that blocked it, if any

    def found(self, policy: ContentPolicy) -> list[tuple[str, str]]:
        """(kind, text) of everything found, in precedence order."""
        out: list[tuple[str, str]] = []
        if self.viruses:
            out.append((VIRUS, "VIRUS: " + ", ".join(_safe(v, 80) for v in self.viruses[:5])))
        if self.banned:
            item = self.banned[0]
            name = f"{_safe(item.filename, 80)} " if item.filename else ""
            more = f" (+{len(self.banned) - 1} more)" if len(self.banned) > 1 else ""
            out.append((BANNED, f"BANNED: {name}({_safe(item.reason, 80)}){more}"))
        if self.spam is not None and policy.killed(self.spam):
            out.append((SPAM, f"SPAM: score {self.spam.score:.3f} ({self.spam.engine})"))
        if self.bad_header:
            first = self.bad_header[0]
            where = f"{_safe(first.field, 40)}: " if first.field else ""
            # the detail's own words, not the message text it quotes (the log has that)
            detail = first.detail.partition(": ")[0]
            out.append((BAD_HEADER, f"BAD HEADER: {where}{_safe(detail, 80)} "
                        f"({first.kind})"))
        return out


class _Outage:
    """One scanner's state for the log: a line when it stops answering and one when it is
    back, not one per message (each message's own line says it was not scanned)."""

    def __init__(self, what: str, policy: str) -> None:
        self.what = what
        self.policy = policy
        self.failures = 0

    def failed(self, exc: BaseException) -> None:
        if self.failures == 0:
            log.error("%s is not answering (%s); until it does, messages are %s", self.what,
                      _safe(str(exc), 200),
                      "deferred (451)" if self.policy == "tempfail" else "passed unscanned")
        self.failures += 1

    def answered(self) -> None:
        if self.failures:
            log.warning("%s answers again after %d failed scans", self.what, self.failures)
            self.failures = 0


# --------------------------------------------------------------------------- the check


_SCANNER_DOWN = Reply(451, "4.7.1", "Content scanner unavailable; try again later")


class ContentCheck:
    """The ``content`` check (module docstring). Any inspection left None is off."""

    name = "content"

    def __init__(self, *, policy: ContentPolicy, virus: ClamdClient | None = None,
                 spam: SpamEngine | None = None, banned: BannedFiles | None = None,
                 bad_header: BadHeader | None = None) -> None:
        self.policy = policy
        self.virus = virus
        self.spam = spam
        self.banned = banned
        self.bad_header = bad_header
        self._virus_state = _Outage(f"clamd at {virus.address}" if virus else "clamd",
                                    policy.virus_on_error)
        self._spam_state = _Outage(f"{spam.name} at {spam.address}" if spam else "spam engine",
                                   policy.spam_on_error)

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        """Every inspection that applies to this message at once; the verdict by the
        destinies (a TEMPFAIL when a scanner failed under a ``tempfail`` policy)."""
        report = ContentReport()
        txn.results[REPORT] = report
        # for our domains as the client addressed it (an alias forwarding elsewhere counts:
        # we would not forward spam) or after alias expansion
        domains = txn.local_domains
        inbound = any(r.address.rpartition("@")[2].lower() in domains
                      or r.original.rpartition("@")[2].lower() in domains
                      for r in txn.recipients)
        report.tag = inbound
        if inbound and self.bad_header is not None:
            self._find_bad_header(body, txn, report)     # from the head kept in memory
        jobs: list[Awaitable[Verdict | None]] = []
        if self.virus is not None or (inbound and (self.spam or self.banned)):
            # only now is the spool written out on the loop (else the commit thread does it)
            path = body.on_disk()
            if self.virus is not None:
                jobs.append(self._scan_virus(path, txn, report))
            if inbound and self.spam is not None:
                jobs.append(self._score_spam(path, txn, report))
            if inbound and self.banned is not None:
                jobs.append(self._find_banned(path, report))
        for outcome in await asyncio.gather(*jobs):
            if outcome is not None:         # a scanner down under a tempfail policy
                return outcome
        return self._decide(txn, report)

    async def _scan_virus(self, path: str, txn: Transaction,
                          report: ContentReport) -> Verdict | None:
        assert self.virus is not None
        try:
            result: ClamdResult = await self.virus.scan(path)
        except ScannerError as exc:
            return self._virus_failed(txn, exc)
        if result.status is ClamdStatus.ERROR:
            return self._virus_failed(txn, ScannerError(f"clamd: {result.text}"))
        self._virus_state.answered()
        if result.status is ClamdStatus.TOO_LARGE:
            report.unchecked = "larger than clamd's StreamMaxLength"
            log.warning("%s: virus scan: message %s; passed unchecked", txn.qid,
                        report.unchecked)
            return None
        report.virus_scanned = True
        report.viruses = result.signatures
        return None

    def _virus_failed(self, txn: Transaction, exc: BaseException) -> Verdict | None:
        self._virus_state.failed(exc)
        metrics.error("virus_scanner")
        if self.policy.virus_on_error == "tempfail":
            log.info("%s: virus scan failed: %s; deferred", txn.qid, _safe(str(exc), 200))
            return Verdict(Action.TEMPFAIL, _SCANNER_DOWN, reason="virus scan failed")
        log.log(_NOTICE, "%s: virus scan failed: %s; passed unscanned", txn.qid,
                _safe(str(exc), 200))
        report = txn.results.get(REPORT)
        if isinstance(report, ContentReport):
            report.unchecked = "virus scanner unavailable"
        return None

    async def _score_spam(self, path: str, txn: Transaction,
                          report: ContentReport) -> Verdict | None:
        assert self.spam is not None
        try:
            report.spam = await self.spam.score(path, txn)
        except ScannerError as exc:
            self._spam_state.failed(exc)
            metrics.error("spam_scanner")
            if self.policy.spam_on_error == "tempfail":
                log.info("%s: spam check failed: %s; deferred", txn.qid, _safe(str(exc), 200))
                return Verdict(Action.TEMPFAIL, _SCANNER_DOWN, reason="spam check failed")
            log.log(_NOTICE, "%s: spam check failed: %s; passed unchecked", txn.qid,
                    _safe(str(exc), 200))
            return None
        self._spam_state.answered()
        return None

    async def _find_banned(self, path: str, report: ContentReport) -> None:
        assert self.banned is not None
        report.banned = tuple(await asyncio.to_thread(self.banned.inspect, path))

    def _find_bad_header(self, body: SpooledBody, txn: Transaction,
                         report: ContentReport) -> None:
        assert self.bad_header is not None
        head = body.header_bytes(self.bad_header.max_header_bytes + 1)
        findings = self.bad_header.inspect(io.BytesIO(head + b"\r\n"), smtputf8=txn.smtputf8)
        # Our own Received: is always there; a missing Date/From is common in real mail and
        # not amavis's "bad header" either: reported, never blocking.
        report.bad_header = tuple(f for f in findings if f.kind != MISSING)

    def _decide(self, txn: Transaction, report: ContentReport) -> Verdict:
        found = report.found(self.policy)
        if not found:
            return Verdict()
        summary = "; ".join(text for _, text in found)
        for kind, text in found:
            destiny = self.policy.destinies.get(kind, "pass")
            if destiny == "pass":
                continue
            report.kind = kind
            if destiny == "bounce" and kind == VIRUS:
                log.info("%s: %s: no failure notice for a virus (senders are forged); "
                         "discarded into the quarantine", txn.qid, text)
                destiny = "discard"
            if destiny == "reject":
                code = "5.6.0" if kind == BAD_HEADER else "5.7.0"
                return Verdict(Action.REJECT, Reply(554, code, f"Reject, id={txn.qid} - {text}"),
                               reason=summary, quarantine_kind=kind)
            bounce = (Reply(554, "5.6.0" if kind == BAD_HEADER else "5.7.0",
                            f"Message content rejected, id={txn.qid} - {text}")
                      if destiny == "bounce" else None)
            return Verdict(Action.QUARANTINE, reason=summary, quarantine_kind=kind,
                           bounce=bounce)
        log.info("%s: content passed: %s", txn.qid, summary)
        return Verdict(reason=f"passed: {summary}")


# --------------------------------------------------------------------------- the modifier


class ContentTags:
    """The ``content-tags`` modifier: the header fields of what the check found (module
    docstring). Nothing for mail the check did not tag."""

    name = "content-tags"

    def __init__(self, policy: ContentPolicy) -> None:
        self.policy = policy

    async def modify(self, txn: Transaction, body: SpooledBody) -> None:
        report = txn.results.get(REPORT)
        if not isinstance(report, ContentReport) or not report.tag:
            return
        fields: list[str] = []
        if report.virus_scanned:
            fields.append(f"X-Virus-Scanned: ClamAV at {self.policy.hostname} (pymta)")
        elif report.unchecked:
            fields.append("X-Virus-Scanned: unchecked")
        alerts = [text for kind, text in report.found(self.policy) if kind != report.kind]
        if report.unchecked:
            alerts.append(f"UNCHECKED: {report.unchecked}")
        fields.extend(f"X-Amavis-Alert: {text}" for text in alerts)
        spam = report.spam
        head = body.header_bytes()
        if _has_our_fields(head):
            txn.drop_header(_is_our_field)      # forged or stale: only ours may stand
        if spam is not None and self.policy.tagged(spam):
            fields.extend(self._spam_fields(spam))
            if self.policy.subject_tag and self.policy.flagged(spam):
                self._tag_subject(txn, head)
        for line in reversed(fields):
            txn.add_header(line)

    def _spam_fields(self, spam: SpamScore) -> list[str]:
        policy = self.policy
        flagged = policy.flagged(spam)
        # amavis's wording: scripts read "required=" (the tag2 level)
        levels = " ".join(f"{name}={value:g}" for name, value in (
            ("tagged_above", policy.tag_level), ("required", policy.tag2_level))
            if value is not None)
        tests = [t if _RULE.fullmatch(t) else _safe(t, 64).replace(",", "?").replace("]", "?")
                 for t in spam.tests[:100]]
        return [
            f"X-Spam-Flag: {'YES' if flagged else 'NO'}",
            f"X-Spam-Score: {spam.score:.3f}",
            f"X-Spam-Level: {'*' * max(0, min(64, int(spam.score)))}",
            f"X-Spam-Status: {'Yes' if flagged else 'No'}, score={spam.score:.3f} {levels}"
            + _folded_tests(tests),
        ]

    def _tag_subject(self, txn: Transaction, head: bytes) -> None:
        """``Subject: <tag> <original>``: the original field dropped, the new one added (one
        space between: a trailing space of the setting does not survive the environment)."""
        tag = _safe(self.policy.subject_tag, 60)
        try:
            original = _subject_value(head)
        except _Untaggable:
            return
        if original is not None:
            txn.drop_header(_is_subject)
        rest = original.lstrip(" \t") if original is not None else ""
        txn.add_header(f"Subject: {tag.strip()} {rest}".rstrip(" "))


def _folded_tests(tests: Sequence[str]) -> str:
    """`` tests=[A, B, ...]`` folded so no line is longer than about 78 characters."""
    out = "\r\n tests=["
    width = 8
    for i, test in enumerate(tests):
        piece = test + (", " if i < len(tests) - 1 else "")
        if width + len(piece) > 76:
            out += "\r\n "
            width = 1
        out += piece
        width += len(piece)
    return out + "]"


def _is_our_field(raw: bytes) -> bool:
    return field_name(raw) in _OUR_FIELDS


def _is_subject(raw: bytes) -> bool:
    return field_name(raw).lower() == "subject"


def _has_our_fields(head: bytes) -> bool:
    """A cheap first look (most messages have none): any field starting like ours."""
    lower = head.lower()
    return b"\nx-spam-" in lower or b"\nx-virus-scanned" in lower or b"\nx-amavis-" in lower \
        or b"\nx-quarantine-id" in lower or lower.startswith((b"x-spam-", b"x-virus", b"x-amavis",
                                                                 b"x-quarantine"))


def _subject_value(head: bytes) -> str | None:
    """The first Subject field's value as it was folded (CRLFs kept, so the new field keeps
    the original's folding), decoded for writing back; None without one."""
    for match in re.finditer(rb"(?im)^subject[ \t]*:((?:[^\r\n]*\r?\n[ \t])*[^\r\n]*)", head):
        try:
            value = match.group(1).decode("utf-8")
        except UnicodeDecodeError:
            raise _Untaggable from None
        return value if value.startswith((" ", "\t")) else " " + value
    return None


class _Untaggable(Exception):
    """A Subject that is not UTF-8: left as it is rather than re-encoded."""
