"""DKIM verification of inbound mail (RFC 6376, with RFC 8301's algorithm rules and RFC 8463's
ed25519-sha256): every ``DKIM-Signature`` of the message as spooled gets its own result.

Implementation summary. The check reads the header section, parses each signature's tags and
collects the key names (``<s>._domainkey.<d>``). Those TXT records are fetched concurrently
through pymta's resolver (:func:`pymta.dns.get_resolver`, so ``PYMTA_DNS_RESOLVER`` and
``PYMTA_DNS_TIMEOUT`` apply) *before* any hashing. dkimpy then verifies each signature with a
``dnsfunc`` that only answers from those prefetched records, so the CPU work (body hash, RSA or
ed25519 check) never waits on the network, and runs in a worker thread when the message is
large (:data:`THREAD_THRESHOLD`) so the event loop stays free.

Result per signature (RFC 8601 §2.7.1 names):

- ``pass``: the signature verifies.
- ``fail``: body hash mismatch or a signature that does not verify with the published key.
- ``neutral``: the signature cannot be processed: tag syntax errors, missing required tags,
  ``x=`` expired, ``t=`` in the future, ``i=`` outside ``d=``, an unknown algorithm.
- ``temperror``: the key lookup failed temporarily (timeout, SERVFAIL). Never a pass, and
  never a refusal: the message is accepted and DMARC sees the temperror.
- ``permerror``: no key published (NXDOMAIN/NODATA), a key record that does not parse or is
  revoked (empty ``p=``), a key shorter than 1024 bits, or ``rsa-sha1`` (RFC 8301 §3.1).
- ``none`` (for the message, not a signature): there is no signature at all.

A message dkimpy cannot parse as it is (``Subject :`` with a blank before the colon, a
first line that is not a field, no empty line after the header section: mail Postfix
accepts) is verified as Postfix would hand it to a milter (:func:`.headers.strict_view`):
the blanks before a colon go (relaxed header canonicalization removes them anyway; a
signature with *simple* header canonicalization over such a field is ``permerror``), and the
body starts at the first line that is not a field. What still does not parse gives every
signature ``permerror``: a result for the message, never a temporary failure.

The values in the fragments come from the signature, i.e. from whoever sent the message:
they are written only through :mod:`pymta.headervalue` (``header.d``/``header.s`` a domain
or token, percent-encoded otherwise; ``header.b``/``reason`` tokens or quoted-strings), so a
``d=`` such as ``x; dkim=pass`` cannot become a result of its own.

Results go to ``txn.results["dkim_signatures"]`` (a list of :class:`DkimSignature`, a
:class:`pymta.pipeline.dmarc.DkimSignatureResult`, top signature first, read by DMARC) and
one Authentication-Results fragment per signature,
``dkim=pass header.d=example.com header.s=sel header.b=AbCdEfGh`` (RFC 6008's ``header.b``:
the first 8 characters of ``b=``, which tells two signatures of one domain apart).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import dkim
import dkim.util
import dns.exception
import dns.name
import dns.resolver

from pymta import dns as pymta_dns
from pymta.headervalue import pvalue, quote_value
from pymta.pipeline import PASS, SpooledBody, Transaction, Verdict
from pymta.pipeline.dmarc import DkimSignatureResult
from pymta.pipeline.headers import field_name, split_fields, strict_view

log = logging.getLogger("pymta.pipeline.dkim")

#: Messages larger than this are verified in a worker thread (hashing a few MiB takes ms).
THREAD_THRESHOLD = 32 * 1024
#: At most this many signatures are evaluated per message (the rest are ignored), bounding
#: the DNS queries and public-key operations one message can cause.
MAX_SIGNATURES = 10
MIN_KEY_BITS = 1024


@dataclass(frozen=True, slots=True)
class DkimSignature(DkimSignatureResult):
    """The outcome for one ``DKIM-Signature`` field. The base class (defined by DMARC, which
    reads ``domain``, ``selector`` and ``result``) carries ``d=`` (lower-case), ``s=`` and the
    result (pass, fail, neutral, temperror, permerror); this adds what the
    Authentication-Results fragment and the log show."""

    reason: str = ""
    algorithm: str = ""
    b_prefix: str = ""      # first 8 characters of b= (RFC 6008 header.b)
    identity: str = ""      # i= (AUID), empty when absent

    def auth_result(self) -> str:
        """This signature as an RFC 8601 resinfo fragment."""
        parts = [f"dkim={self.result}"]
        if self.reason:
            parts.append(f"reason={quote_value(self.reason, 120)}")
        if self.domain:
            parts.append(f"header.d={pvalue(self.domain)}")
        if self.selector:
            parts.append(f"header.s={pvalue(self.selector)}")
        if self.b_prefix:
            # ``/`` and ``=`` of base64 are tspecials: quoted when it contains them, and
            # last, as authres reads a quoted property only at the end (pymta.headervalue)
            parts.append(f"header.b={quote_value(self.b_prefix)}")
        return " ".join(parts)


# ------------------------------------------------------------------------------ key lookups

#: A prefetched key record: the TXT text, None for "no record", or TEMPFAIL.
TEMPFAIL = object()


def _key_name(selector: bytes, domain: bytes) -> str:
    return (selector + b"._domainkey." + domain).decode("ascii", "replace").lower().rstrip(".")


async def fetch_txt(name: str) -> bytes | None | object:
    """The DKIM key record at ``name`` through pymta's resolver: the strings of the first
    TXT record (preferring one with ``p=``) joined, None when there is none (NXDOMAIN,
    NODATA), :data:`TEMPFAIL` when the lookup failed temporarily."""
    try:
        answer = await pymta_dns.get_resolver().resolve(name, "TXT", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return None
    except (dns.exception.Timeout, dns.resolver.NoNameservers) as exc:
        log.info("DKIM key lookup %s failed temporarily: %s", name, type(exc).__name__)
        return TEMPFAIL
    except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong,
            dns.exception.SyntaxError, UnicodeError):
        return None
    except Exception as exc:  # noqa: BLE001 - any other resolver fault is temporary
        log.warning("DKIM key lookup %s failed: %r", name, exc)
        return TEMPFAIL
    texts = [b"".join(r.strings) for r in answer]  # type: ignore[attr-defined]
    for text in texts:
        if b"p=" in text:
            return text
    return texts[0] if texts else None


async def prefetch(names: Sequence[str]) -> dict[str, bytes | None | object]:
    unique = list(dict.fromkeys(names))
    found = await asyncio.gather(*(fetch_txt(n) for n in unique))
    return dict(zip(unique, found, strict=True))


def prefetched_dnsfunc(records: dict[str, bytes | None | object]):
    """A dkimpy ``dnsfunc`` answering only from ``records`` (it never touches the network)."""

    def dnsfunc(name: bytes | str, timeout: float = 5) -> bytes | None:
        key = (name.decode("ascii", "replace") if isinstance(name, bytes) else name)
        value = records.get(key.lower().rstrip("."))
        if value is TEMPFAIL:
            raise dkim.DnsTimeoutError(f"temporary DNS failure for {key}")
        return value if isinstance(value, bytes) else None

    return dnsfunc


class _LibLog:
    """dkimpy logs every bad signature at ERROR; for a verifier of other people's mail that is
    debug information, not an error of ours."""

    def debug(self, msg: object, *args: object) -> None:
        log.debug("dkimpy: " + str(msg), *args)

    info = warning = error = exception = debug

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging.Logger's name
        return log.isEnabledFor(logging.DEBUG)


LIB_LOG = _LibLog()


# ------------------------------------------------------------------------------ verification


@dataclass(slots=True)
class _Sig:
    index: int
    tags: dict[bytes, bytes] | None
    error: str = ""

    def text(self, tag: bytes) -> str:
        if not self.tags or tag not in self.tags:
            return ""
        return self.tags[tag].decode("utf-8", "replace")


def parse_signatures(header: bytes) -> list[_Sig]:
    """The DKIM-Signature fields of a header section, top first, with their tags parsed.
    Fields are split as Postfix splits them (:func:`.headers.split_fields`), so this never
    fails on a header section dkimpy cannot parse."""
    out: list[_Sig] = []
    for field in split_fields(header):
        if field_name(field) != "dkim-signature":
            continue
        value = field[field.find(b":") + 1:]
        index = len(out)
        try:
            out.append(_Sig(index, dkim.util.parse_tag_value(value)))
        except Exception as exc:  # noqa: BLE001 - InvalidTagValueList and friends
            out.append(_Sig(index, None, f"signature syntax error: {exc}"))
    return out


def _b_prefix(sig: _Sig) -> str:
    return re.sub(r"\s+", "", sig.text(b"b"))[:8]


def _result(sig: _Sig, result: str, reason: str = "") -> DkimSignature:
    algorithm = sig.text(b"a").lower()
    return DkimSignature(
        domain=sig.text(b"d").lower(), selector=sig.text(b"s"), result=result,
        reason=reason, algorithm=algorithm, b_prefix=_b_prefix(sig), identity=sig.text(b"i"))


def verify_all(message: bytes, sigs: Sequence[_Sig],
               records: dict[str, bytes | None | object]) -> list[DkimSignature]:
    """Verify every signature of ``message`` against prefetched key records (CPU only)."""
    renamed: frozenset[str] = frozenset()
    try:
        checker = dkim.DKIM(message, logger=LIB_LOG, minkey=MIN_KEY_BITS)
    except dkim.MessageFormatError:
        view = strict_view(message)
        renamed = view.renamed
        try:
            checker = dkim.DKIM(view.data, logger=LIB_LOG, minkey=MIN_KEY_BITS)
        except dkim.MessageFormatError as exc:
            log.info("DKIM: message cannot be parsed: %s", exc)
            return [_result(sig, "permerror", "message cannot be parsed") for sig in sigs]
    dnsfunc = prefetched_dnsfunc(records)
    results: list[DkimSignature] = []
    for sig in sigs:
        results.append(_verify_one(checker, sig, records, dnsfunc, renamed))
    return results


def _simple_over_renamed(tags: dict[bytes, bytes], renamed: frozenset[str]) -> bool:
    """Does a signature with *simple* header canonicalization cover a field whose blanks
    before the colon :func:`.headers.strict_view` removed (its hash would then be wrong)?"""
    if not renamed or tags.get(b"c", b"simple").split(b"/")[0].strip().lower() != b"simple":
        return False
    signed = {h.strip().decode("ascii", "replace").lower()
              for h in tags.get(b"h", b"").split(b":")}
    return bool(renamed & (signed | {"dkim-signature"}))


def _verify_one(checker: dkim.DKIM, sig: _Sig, records: dict[str, bytes | None | object],
                dnsfunc, renamed: frozenset[str] = frozenset()) -> DkimSignature:
    if sig.tags is None:
        return _result(sig, "neutral", sig.error)
    tags = sig.tags
    try:
        dkim.validate_signature_fields(tags)
    except dkim.ValidationError as exc:
        return _result(sig, "neutral", str(exc))
    if _simple_over_renamed(tags, renamed):
        return _result(sig, "permerror", "simple canonicalization of a field in obsolete syntax")
    if tags[b"a"].lower() == b"rsa-sha1":
        return _result(sig, "permerror", "rsa-sha1 is not accepted (RFC 8301)")
    name = _key_name(tags[b"s"], tags[b"d"])
    record = records.get(name)
    if record is TEMPFAIL:
        return _result(sig, "temperror", "key lookup failed temporarily")
    if not isinstance(record, bytes):
        return _result(sig, "permerror", "no key for signature")
    try:
        _pk, keysize, ktag, _ = dkim.evaluate_pk(name, record)
    except Exception as exc:  # noqa: BLE001 - KeyFormatError, binascii.Error, nacl errors
        return _result(sig, "permerror", f"bad key record: {exc}")
    if ktag is None:
        return _result(sig, "permerror", "key not for email")
    if ktag == b"rsa" and keysize < MIN_KEY_BITS:
        return _result(sig, "permerror", f"key too short ({keysize} bits)")
    algorithm = tags[b"a"].lower()
    if not algorithm.startswith(ktag + b"-"):
        return _result(sig, "permerror", "key type does not match a=")
    try:
        ok = checker.verify(idx=sig.index, dnsfunc=dnsfunc)
    except dkim.ValidationError as exc:
        text = str(exc)
        if text.startswith("body hash mismatch"):
            return _result(sig, "fail", "body hash did not verify")
        return _result(sig, "neutral", text)
    except dkim.MessageFormatError as exc:
        return _result(sig, "neutral", str(exc))
    except dkim.DKIMException as exc:
        return _result(sig, "permerror", str(exc))
    except Exception as exc:  # noqa: BLE001 - a library fault is this signature's problem
        log.warning("DKIM verification raised %r", exc)
        return _result(sig, "neutral", f"cannot verify: {type(exc).__name__}")
    if ok:
        return _result(sig, "pass")
    return _result(sig, "fail", "signature did not verify")


class DkimVerify:
    """The Check: records results, never rejects (DMARC decides what a failure means)."""

    name = "dkim"

    def __init__(self, thread_threshold: int = THREAD_THRESHOLD,
                 max_signatures: int = MAX_SIGNATURES) -> None:
        self.thread_threshold = thread_threshold
        self.max_signatures = max_signatures

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        results = await self.verify(body)
        txn.results["dkim_signatures"] = results
        if not results:
            if not txn.trusted:  # our own users' unsigned mail needs no "dkim=none"
                txn.auth_results.append("dkim=none")
            return PASS
        for res in results:
            txn.auth_results.append(res.auth_result())
        summary = ", ".join(f"{r.result} (d={r.domain} s={r.selector}"
                            + (f": {r.reason})" if r.reason else ")") for r in results)
        log.info("%s: dkim: %s", txn.qid, summary)
        return PASS

    async def verify(self, body: SpooledBody) -> list[DkimSignature]:
        sigs = parse_signatures(body.header_bytes())[: self.max_signatures]
        if not sigs:
            return []
        names = [_key_name(s.tags[b"s"], s.tags[b"d"]) for s in sigs
                 if s.tags and b"s" in s.tags and b"d" in s.tags]
        records = await prefetch(names)
        message = await body.read_async()
        if len(message) > self.thread_threshold:
            return await asyncio.to_thread(verify_all, message, sigs, records)
        return verify_all(message, sigs, records)
