"""DMARC (RFC 7489): does the author domain (``From:``) stand behind this message?

Evaluated for inbound mail only (``Transaction.trusted`` false), after SPF and DKIM verify,
from their results:

- SPF: ``txn.results["spf_result"]`` (:class:`pymta.pipeline.spf.SpfResult`).
- DKIM: ``txn.results.get("dkim_signatures", [])``, **a list of** :class:`DkimSignatureResult`
  (``domain`` = the signature's ``d=``, ``selector`` = ``s=``, ``result`` = ``pass``,
  ``fail``, ``neutral``, ``policy``, ``temperror``, ``permerror`` or ``none``), one per
  ``DKIM-Signature`` the DKIM verify stage checked. That stage creates them; this module
  only defines the type, so the two stay decoupled. Without that stage (or with an empty
  list), DMARC simply sees no DKIM pass.

Implementation summary. The policy record is the single ``v=DMARC1`` TXT record at
``_dmarc.<author domain>``, else at ``_dmarc.<organizational domain>`` (§6.6.3), looked up
with the server's own asynchronous resolver (``PYMTA_DNS_RESOLVER``, a
:class:`pymta.dns.DNSResolver` the wiring passes in): no thread, no second DNS configuration.
The organizational domain comes from the Public Suffix List shipped inside the
``publicsuffixlist`` package (offline; updated with the package), falling back to the last
two labels if the package is missing. Identifier alignment is relaxed (same organizational
domain) or strict (equal) per ``aspf``/``adkim``. DMARC passes when SPF or any DKIM signature
passes *and* aligns; otherwise it fails, unless an aligned identifier failed temporarily
(``temperror``: never a reject). The disposition: ``p`` (``sp`` for a subdomain whose record
is the organizational domain's), sampled by ``pct`` (outside the sample the next milder
policy applies, §6.6.4). ``reject`` answers ``550 5.7.1``, ``quarantine`` holds the message
in the queue (``pymta queue release`` delivers it); with ``DMARC_ENFORCE=no`` both only tag
the message (``X-DMARC-Disposition:``). A message with several author domains is judged for
each; the strictest outcome wins. A From value longer than :data:`MAX_FROM_VALUE`, or one
the stdlib address parser gives up on, is "no usable From" (``permerror``): the parser
costs ~2 µs a character on the event loop and recurses once per nested comment.

Why not the ``dmarc`` PyPI package: it would need its own DNS configuration and blocking
lookups in a thread, while record parsing and alignment are a page of code; here the
lookups share the server's resolver and failure classification directly.
"""

from __future__ import annotations

import contextlib
import email.utils
import functools
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import dns.exception
import dns.resolver

from pymta.dns import DNSResolver
from pymta.headervalue import comment_text, pvalue
from pymta.pipeline import PASS, Action, SpooledBody, Transaction, Verdict
from pymta.pipeline.headers import field_name, field_value, split_fields
from pymta.types import Reply

log = logging.getLogger("pymta.pipeline.dmarc")


@dataclass(frozen=True, slots=True)
class DkimSignatureResult:
    """One verified DKIM signature, as the DKIM verify stage reports it in
    ``txn.results["dkim_signatures"]`` (a list): ``domain`` is ``d=``, ``selector`` ``s=``,
    ``result`` an RFC 8601 dkim result (``pass``, ``fail``, ``temperror``, ...)."""

    domain: str
    selector: str
    result: str


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    p: str                   # none | quarantine | reject
    sp: str | None = None
    adkim: str = "r"         # r | s
    aspf: str = "r"
    pct: int = 100


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """``txn.results["dmarc_result"]``: ``result`` pass|fail|none|temperror|permerror,
    ``policy`` the policy that applied (``""`` without a record), ``disposition`` what was
    done (none|quarantine|reject)."""

    result: str
    domain: str
    policy: str = ""
    disposition: str = "none"


class TempError(Exception):
    """The policy record could not be fetched now."""


# ---------------------------------------------------------------------------- domains


@functools.cache
def _psl():
    try:
        from publicsuffixlist import PublicSuffixList
    except ImportError:   # pragma: no cover - a dependency; the fallback keeps DMARC usable
        log.warning("publicsuffixlist is not installed: organizational domain = last two labels")
        return None
    return PublicSuffixList()


def organizational_domain(domain: str) -> str:
    """RFC 7489 §3.2: the public suffix plus one label (``a.b.example.co.uk`` →
    ``example.co.uk``); a public suffix itself is its own organizational domain."""
    domain = domain.lower().rstrip(".")
    psl = _psl()
    if psl is None:
        return ".".join(domain.split(".")[-2:])
    return psl.privatesuffix(domain) or domain


def aligned(identifier: str, author: str, mode: str) -> bool:
    """Identifier alignment: strict (``s``) means equal, relaxed the same org domain."""
    a, b = identifier.lower().rstrip("."), author.lower().rstrip(".")
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return a == b or organizational_domain(a) == organizational_domain(b)


#: Longest ``From:`` value (all From fields together) read for its addresses; longer is
#: "no usable From". The stdlib parser costs ~2 µs a character, on the event loop, so a
#: megabyte of From took ~2 s; no real From is a hundredth of this.
MAX_FROM_VALUE = 8192


def author_domains(header: bytes) -> list[str] | None:
    """The distinct domains of the ``From:`` addresses, or None when there is no usable
    From (missing, an address without a domain, longer than :data:`MAX_FROM_VALUE`, or
    more nested comments than the stdlib parser's recursion allows: such a From got a
    ``RecursionError`` and the message a ``451`` at every attempt)."""
    values = [field_value(f) for f in split_fields(header) if field_name(f) == "from"]
    if not values or sum(map(len, values)) > MAX_FROM_VALUE:
        return None
    try:
        addresses = email.utils.getaddresses(values)
    except (RecursionError, ValueError, IndexError):
        return None
    domains: list[str] = []
    for _name, addr in addresses:
        local, at, domain = addr.rpartition("@")
        domain = domain.strip().lower().rstrip(".")
        if not at or not local or not domain:
            return None
        if domain not in domains:
            domains.append(domain)
    return domains or None


# ---------------------------------------------------------------------------- records

_DOMAIN = re.compile(r"^(?=.{1,253}$)([a-z0-9](?:[a-z0-9_-]{0,61}[a-z0-9])?\.)+"
                     r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_V_DMARC1 = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")


def parse_record(text: str) -> DmarcRecord | None:
    """A ``v=DMARC1`` record, or None if it is not one DMARC can use (§6.3, §6.6.3)."""
    if not _V_DMARC1.match(text):
        return None
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if sep and key and key not in tags:
            tags[key] = value.strip()
    p = tags.get("p", "").lower()
    sp = tags.get("sp", "").lower() or None
    valid = {"none", "quarantine", "reject"}
    if p not in valid or (sp is not None and sp not in valid):
        if "mailto:" not in tags.get("rua", "").lower():
            return None
        p, sp = "none", None   # §6.6.3 step 6: act as if p=none was published
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    try:
        pct = int(tags.get("pct", "100"))
    except ValueError:
        pct = 100
    return DmarcRecord(p=p, sp=sp, adkim=adkim if adkim in ("r", "s") else "r",
                       aspf=aspf if aspf in ("r", "s") else "r",
                       pct=min(100, max(0, pct)))


async def _txt(name: str, resolver: DNSResolver) -> list[str]:
    try:
        answer = await resolver.resolve(name, "TXT")
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except dns.exception.DNSException as exc:
        raise TempError(f"{name} TXT: {type(exc).__name__}") from exc
    return [b"".join(r.strings).decode("utf-8", "replace") for r in answer]


async def _record_at(domain: str, resolver: DNSResolver) -> DmarcRecord | None:
    records = [t for t in await _txt(f"_dmarc.{domain}", resolver) if _V_DMARC1.match(t)]
    if len(records) != 1:       # none, or ambiguous: no policy here (§6.6.3 step 3)
        return None
    return parse_record(records[0])


async def fetch_policy(domain: str, resolver: DNSResolver) -> tuple[DmarcRecord | None, bool]:
    """(record, found at the organizational domain rather than the author domain)."""
    record = await _record_at(domain, resolver)
    if record is not None:
        return record, False
    org = organizational_domain(domain)
    if org != domain:
        record = await _record_at(org, resolver)
        if record is not None:
            return record, True
    return None, False


# ---------------------------------------------------------------------------- evaluation


def evaluate(domain: str, record: DmarcRecord, from_org: bool, spf_result: object,
             dkim: Sequence[object], rng: random.Random | None = None) -> DmarcResult:
    """The DMARC result and disposition for one author domain (pure)."""
    policy = record.sp if from_org and record.sp else record.p
    spf_res = getattr(spf_result, "result", "none")
    spf_dom = getattr(spf_result, "domain", "")
    spf_aligned = aligned(spf_dom, domain, record.aspf)
    dkim_aligned = [s for s in dkim if aligned(getattr(s, "domain", ""), domain, record.adkim)]
    if (spf_res == "pass" and spf_aligned) or any(
            getattr(s, "result", "") == "pass" for s in dkim_aligned):
        return DmarcResult("pass", domain, policy)
    if (spf_res == "temperror" and spf_aligned) or any(
            getattr(s, "result", "") == "temperror" for s in dkim_aligned):
        return DmarcResult("temperror", domain, policy)
    disposition = policy
    if record.pct < 100 and (rng or random).random() * 100 >= record.pct:
        disposition = {"reject": "quarantine", "quarantine": "none"}.get(policy, "none")
    return DmarcResult("fail", domain, policy, disposition)


class DMARCCheck:
    """The DMARC check (see the module docstring)."""

    name = "dmarc"

    def __init__(self, *, enforce: bool = True, rng: random.Random | None = None,
                 resolver: DNSResolver | None = None) -> None:
        """``resolver``: the server's (the wiring passes it); None: a system resolver of
        this stage's own."""
        self.enforce = enforce
        self.rng = rng
        self.resolver = resolver if resolver is not None else DNSResolver()

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        if txn.trusted:
            return PASS
        domains = author_domains(body.header_bytes())
        if domains is None:
            txn.results["dmarc_result"] = DmarcResult("permerror", "")
            return Verdict(auth_result="dmarc=permerror (no usable From) header.from=unknown",
                           reason="no usable From address")
        verdicts = [await self._judge(txn, d) for d in domains]
        return max(verdicts, key=lambda v: v.action)   # first of the strictest

    async def _judge(self, txn: Transaction, domain: str) -> Verdict:
        with contextlib.suppress(UnicodeError):
            domain = domain.encode("idna").decode("ascii")
        if not _DOMAIN.match(domain):
            txn.results.setdefault("dmarc_result", DmarcResult("permerror", ""))
            return Verdict(auth_result="dmarc=permerror (invalid From domain) "
                                       "header.from=unknown", reason="invalid From domain")
        try:
            record, from_org = await fetch_policy(domain, self.resolver)
        except TempError as exc:
            txn.results.setdefault("dmarc_result", DmarcResult("temperror", domain))
            return Verdict(auth_result=f"dmarc=temperror header.from={pvalue(domain)}",
                           reason=f"DMARC record lookup failed: {exc}")
        if record is None:
            txn.results.setdefault("dmarc_result", DmarcResult("none", domain))
            return Verdict(auth_result=f"dmarc=none header.from={pvalue(domain)}")
        signatures = txn.results.get("dkim_signatures")     # DKIM verify's list, if it ran
        res = evaluate(domain, record, from_org, txn.results.get("spf_result"),
                       list(signatures) if isinstance(signatures, list) else [], self.rng)
        # domain and policy are checked already (``_DOMAIN``, ``parse_record``); written
        # through pymta.headervalue all the same, as every value in a header field we write
        auth = (f"dmarc={res.result} ({comment_text('p=' + res.policy)}) "
                f"header.from={pvalue(domain)}")
        if res.result != "fail" or res.disposition == "none":
            txn.results.setdefault("dmarc_result", res)
            return Verdict(auth_result=auth,
                           reason="" if res.result == "pass" else f"dmarc={res.result} {domain}")
        txn.results["dmarc_result"] = res
        why = f"DMARC policy of {domain}: p={res.policy}, disposition {res.disposition}"
        if not self.enforce:
            return Verdict(auth_result=auth, reason=why, headers=(
                f"X-DMARC-Disposition: {res.disposition} (not enforced; "
                f"{comment_text('p=' + res.policy)}; {comment_text('header.from=' + domain)})",))
        if res.disposition == "reject":
            return Verdict(Action.REJECT,
                           Reply(550, "5.7.1", f"Email rejected per DMARC policy for {domain}"),
                           auth_result=auth, reason=why)
        return Verdict(Action.QUARANTINE, auth_result=auth, reason=why)
