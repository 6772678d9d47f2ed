"""SPF (RFC 7208): is the client allowed to send mail for the sender's domain?

Checked for inbound mail only: clients that are authenticated or in ``MYNETWORKS``
(``Transaction.trusted``) are not checked; loopback is not exempt unless it is listed. The
identity is the MAIL FROM domain, or the HELO name when MAIL FROM is null (§2.4).

Implementation summary. The evaluation is pyspf's (``spf.query``), which does blocking DNS:
it runs in a worker thread, bounded by its own deadline (below the pipeline's stage timeout,
so a slow DNS gives ``temperror`` rather than a pipeline tempfail). Its DNS goes through the
resolver of the server the check belongs to (a blocking twin of its
:class:`pymta.dns.DNSResolver`, ``PYMTA_DNS_RESOLVER``), so two servers in one process each
ask their own DNS servers. Before that, the evaluation is tried once on the event loop
with DNS answered only from that resolver's cache (:class:`CachedAnswers`): most mail comes
from senders seen within their records' TTL, and pyspf over cached records is ~100 µs of
CPU, less than the hand-over to a thread and back (issue 14: the checks-on rate). The first
lookup the cache cannot answer ends that attempt and the thread does the evaluation from
the start, so the result is the thread's whenever DNS had to be asked (pyspf swallows some
lookup errors, e.g. for ``exp=``, so the attempt counts its misses instead of relying on the
exception reaching us). An outcome computed that way is kept for the same client address,
sender and HELO name until the first of the DNS answers it used expires
(:data:`OUTCOMES_KEPT` at most): the same inputs over the same records give the same result
(the one exception, a ``%{t}`` timestamp in an explanation, keeps its first value that long).

How the resolver reaches pyspf, and why through a module-level hook: pyspf (2.0.14) has no
per-query resolver. ``spf.query.dns`` (its cache, CNAME chasing, void-lookup and time
limits) calls the module global ``spf.DNSLookup`` directly; overriding ``query.dns`` would
mean copying that logic. So :func:`install_dns_hook` replaces ``spf.DNSLookup`` once, when
the first :class:`SPFCheck` is built (never at import), by :func:`_dns_lookup`, a
dispatcher: inside an evaluation of ours it uses the resolver set in a ``ContextVar`` for
that evaluation's worker thread (:func:`evaluate` sets and resets it), so concurrent
checks of different servers never see each other's resolver; everywhere else (another
library in the process using pyspf) it calls the function it replaced, unchanged: a no-op
for other pyspf users. dnspython's global default resolver is never touched.

Only a name that is syntactically a multi-label domain is evaluated; anything else (a HELO
that is an address literal, a bare word, ``evil.test;dkim=pass``) is ``none`` without a DNS
query (§2.3, §4.3). Client-supplied text reaches the header fields only through
:mod:`pymta.headervalue`: ``smtp.helo=``/``smtp.mailfrom=`` as an RFC 8601 ``pvalue`` (a
domain as it is, anything else quoted), the ``Received-SPF`` key-values as dot-atoms or
quoted-strings, the comment as comment text.

Results: the Verdict carries ``auth_result`` ``spf=<result> smtp.mailfrom=<domain>`` (or
``smtp.helo=<name>``) and a ``Received-SPF:`` header field (§9.1); the structured outcome is
``txn.results["spf_result"]`` (:class:`SpfResult`) for DMARC. Policy: record only, unless
``SPF_REJECT_FAIL=yes``, which answers ``fail`` with ``550 5.7.23``. ``temperror`` (DNS
failure or timeout) and ``permerror`` are recorded, never a pass and never a 5xx.
"""

from __future__ import annotations

import asyncio
import contextvars
import ipaddress
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.exception
import dns.name
import dns.resolver
import spf

from pymta.dns import DNSResolver
from pymta.headervalue import comment_text, is_fqdn, kv_value, pvalue
from pymta.pipeline import PASS, Action, SpooledBody, Transaction, Verdict
from pymta.pipeline.headers import fold
from pymta.types import Reply

log = logging.getLogger("pymta.pipeline.spf")

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
R_SPF_FAIL = "5.7.23"
_MAX_QUERY_TIME = 20.0      # RFC 7208 §4.6.4: at least 20 seconds for the whole evaluation
#: Outcomes kept per check, by (client address, sender, HELO), until their DNS answers expire.
OUTCOMES_KEPT = 4096


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The SPF outcome for DMARC and others: ``result`` is one of :data:`RESULTS`,
    ``domain`` the domain that was checked, ``identity`` ``mailfrom`` or ``helo``."""

    result: str
    domain: str
    identity: str
    explanation: str = ""


# ---------------------------------------------------------------------------- DNS for pyspf

class NotCached(Exception):
    """A lookup :class:`CachedAnswers` cannot answer (not a DNS error: pyspf must not treat
    it as one, and the attempt it ends is discarded)."""


class CachedAnswers:
    """The resolver of the on-loop attempt: ``resolve`` answers from a
    :class:`pymta.dns.DNSResolver`'s cache (positive answers) or raises :class:`NotCached`,
    counting the misses."""

    lifetime = _MAX_QUERY_TIME

    def __init__(self, resolver: DNSResolver) -> None:
        self.resolver = resolver
        self.misses = 0
        self.expires = math.inf      # when the first answer given out expires

    def resolve(self, name: object, qtype: str, **_ignored: object) -> Any:
        answer = self.resolver.cached(str(name), qtype)
        if answer is None:
            self.misses += 1
            raise NotCached(f"{name} {qtype}")
        self.expires = min(self.expires, answer.expiration)
        return answer


_resolver_var: contextvars.ContextVar[dns.resolver.Resolver | CachedAnswers | None] = (
    contextvars.ContextVar("pymta_spf_resolver", default=None))
_library_lookup: Callable[..., Any] | None = None     # what install_dns_hook replaced
_install_lock = threading.Lock()


def _dns_lookup(name: str, qtype: str, strict: bool = True, timeout: float | None = None,
                ) -> list[tuple[tuple[str, str], object]]:
    """pyspf's ``DNSLookup`` contract: ``[((name, qtype), value), ...]``; nothing for NXDOMAIN
    or no data; ``spf.TempError`` for a failure that retrying may cure."""
    resolver = _resolver_var.get()
    if resolver is None:   # pyspf used outside a pymta check: its own behaviour
        library = _library_lookup or spf.DNSLookup
        return library(name, qtype, strict, timeout)
    lifetime = resolver.lifetime if not timeout else min(float(timeout), resolver.lifetime)
    try:
        answer = resolver.resolve(name, qtype, lifetime=lifetime, search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return []
    except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong):
        return []
    except dns.exception.DNSException as exc:
        raise spf.TempError(f"DNS {type(exc).__name__}: {name} {qtype}") from exc
    out: list[tuple[tuple[str, str], object]] = []
    for rdata in answer:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out


def install_dns_hook() -> None:
    """Route pyspf's DNS through :func:`_dns_lookup` (module docstring: why a module-level
    hook, and why it changes nothing for other users of pyspf). Idempotent and thread-safe;
    called when an :class:`SPFCheck` is built and before each evaluation."""
    global _library_lookup
    if spf.DNSLookup is _dns_lookup:
        return
    with _install_lock:
        if spf.DNSLookup is not _dns_lookup:
            _library_lookup = spf.DNSLookup
            spf.DNSLookup = _dns_lookup


# ---------------------------------------------------------------------------- evaluation

def client_ip(peer_ip: str) -> str:
    """The address SPF sees: zone index dropped, IPv4-mapped IPv6 as IPv4."""
    addr = ipaddress.ip_address(peer_ip.partition("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def identity_of(sender: str, helo: str) -> tuple[str, str]:
    """(identity, domain) to check: MAIL FROM's domain, or the HELO name for a null sender."""
    if sender:
        return "mailfrom", sender.rpartition("@")[2].lower().rstrip(".")
    return "helo", helo.lower().rstrip(".")


def evaluate(ip: str, sender: str, helo: str, receiver: str,
             resolver: dns.resolver.Resolver | CachedAnswers,
             querytime: float = _MAX_QUERY_TIME) -> tuple[str, str, str, str]:
    """Blocking: (result, explanation, comment, mechanism) for one message, via pyspf."""
    identity, domain = identity_of(sender, helo)
    if not is_fqdn(domain):     # address literal, bare word, junk, nothing at all
        what = "HELO name" if identity == "helo" else "sender domain"
        return ("none", f"{what} is not a domain", f"{receiver}: {what} is not a domain", "")
    install_dns_hook()
    token = _resolver_var.set(resolver)
    try:
        q = spf.query(i=ip, s=sender, h=helo or domain, receiver=receiver,
                      querytime=querytime)
        result, _code, explanation = q.check()
        try:
            comment = f"{receiver}: {q.get_header_comment(result)}"
        except Exception:  # noqa: BLE001 - only the comment is lost
            comment = receiver
        return result, str(explanation), comment, str(getattr(q, "mechanism", "") or "")
    finally:
        _resolver_var.reset(token)


def received_spf(result: str, comment: str, ip: str, sender: str, helo: str, receiver: str,
                 identity: str, mechanism: str = "") -> str:
    """The ``Received-SPF:`` field (no CRLF), folded."""
    comment = comment_text(comment, 400)
    parts = [f"client-ip={ip}"]     # from our socket, as pypolicyd-spf writes it
    if identity == "mailfrom":
        parts.append(f"envelope-from={kv_value(sender)}")
    if helo:
        parts.append(f"helo={kv_value(helo)}")
    parts.append(f"receiver={kv_value(receiver)}")
    if mechanism:
        parts.append(f"mechanism={kv_value(mechanism)}")
    parts.append(f"identity={identity}")
    # the result and its comment on the first line, the key-value pairs folded below
    return f"Received-SPF: {result} ({comment})\r\n\t" + fold("", parts).removeprefix(": ")


class SPFCheck:
    """The SPF check (see the module docstring). ``timeout`` bounds one evaluation; keep it
    below the pipeline's stage timeout so a slow DNS ends in ``temperror``."""

    name = "spf"

    def __init__(self, *, receiver: str, reject_fail: bool = False,
                 timeout: float = _MAX_QUERY_TIME, resolver: DNSResolver | None = None) -> None:
        """``resolver``: the server's DNS (the wiring passes it); None: a system resolver of
        this stage's own."""
        self.receiver = receiver
        self.reject_fail = reject_fail
        self.timeout = timeout
        self.resolver = resolver if resolver is not None else DNSResolver()
        self._outcomes: dict[tuple[str, str, str], tuple[float, tuple[str, str, str, str]]] = {}
        install_dns_hook()

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        if txn.trusted:
            return PASS
        identity, domain = identity_of(txn.sender, txn.helo)
        try:
            ip = client_ip(txn.peer_ip)
        except ValueError:
            return PASS     # not an IP client (a unix socket): nothing SPF can say
        mechanism = ""
        try:
            cached = self._from_cache(ip, txn.sender, txn.helo)
            if cached is not None:
                result, explanation, comment, mechanism = cached
            else:
                result, explanation, comment, mechanism = await asyncio.wait_for(
                    asyncio.to_thread(evaluate, ip, txn.sender, txn.helo, self.receiver,
                                      self.resolver.blocking(), max(1.0, self.timeout - 1.0)),
                    self.timeout)
        except TimeoutError:
            result, explanation = "temperror", "SPF evaluation timed out"
            comment = f"{self.receiver}: timeout during lookup of {domain}"
        except Exception as exc:  # noqa: BLE001 - never a pass, never a 5xx
            log.warning("%s: SPF evaluation failed: %r", txn.qid, exc)
            result, explanation = "temperror", f"SPF evaluation failed: {exc!r}"
            comment = f"{self.receiver}: temporary error in processing {domain}"
        if result not in RESULTS:
            result = "temperror"
        txn.results["spf_result"] = SpfResult(result, domain, identity, explanation)
        ptype = "smtp.mailfrom" if identity == "mailfrom" else "smtp.helo"
        auth = f"spf={result} {ptype}={pvalue(domain) if domain else 'unknown'}"
        header = received_spf(result, comment, ip, txn.sender, txn.helo, self.receiver,
                              identity, mechanism)
        if result == "fail" and self.reject_fail:
            return Verdict(Action.REJECT,
                           Reply(550, R_SPF_FAIL,
                                 f"SPF validation failed: {domain} does not designate {ip} "
                                 f"as permitted sender"),
                           auth_result=auth, reason=f"spf=fail {domain}")
        return Verdict(headers=(header,), auth_result=auth,
                       reason="" if result in ("pass", "none") else f"spf={result} {domain}")

    def _from_cache(self, ip: str, sender: str, helo: str) -> tuple[str, str, str, str] | None:
        """The outcome kept for these inputs, or the evaluation on the event loop from cached
        DNS only (module docstring); None when it needed a lookup the cache could not
        answer."""
        key = (ip, sender, helo)
        kept = self._outcomes.get(key)
        now = time.time()
        if kept is not None:
            if kept[0] > now:
                return kept[1]
            del self._outcomes[key]
        answers = CachedAnswers(self.resolver)
        try:
            outcome = evaluate(ip, sender, helo, self.receiver, answers)
        except NotCached:
            return None
        if answers.misses:
            return None
        if answers.expires > now and answers.expires != math.inf:
            if len(self._outcomes) >= OUTCOMES_KEPT:
                self._outcomes.pop(next(iter(self._outcomes)), None)
            self._outcomes[key] = (answers.expires, outcome)
        return outcome
