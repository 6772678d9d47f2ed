"""ARC (RFC 8617, with dkimpy): verifying an incoming chain, and sealing mail we forward.

Forwarding through an alias breaks SPF (our address sends for someone else's domain) and often
DMARC; an ARC set lets the next receiver trust the results *we* saw. Two stages:

- :class:`ArcVerify` (a Check, after DKIM verify): validates an existing chain
  (``arc=pass``/``fail``/``none`` in Authentication-Results, ``txn.results["arc"]``). Key
  records are fetched first through pymta's resolver (as in :mod:`.dkimverify`), so the
  hashing runs without waiting on DNS, in a thread for large messages. A key lookup that
  fails temporarily makes a failing chain ``temperror``.
- :class:`ArcSeal` (a Modifier): for a message with at least one recipient we forward, i.e.
  a remote target (``Recipient.local`` false) reached through one of our addresses
  (``original`` in a local domain), adds the next ARC set (``ARC-Seal``,
  ``ARC-Message-Signature``, ``ARC-Authentication-Results``) signed with the DKIM key of our
  first domain. The ARC-Authentication-Results are rendered from ``txn.auth_results`` (the
  results of our checks, plus the chain's ``arc=`` from :class:`ArcVerify`) under our
  authserv-id; they are what dkimpy's ``arc_sign`` reads as its input.

Order (decided here; ``app._default_pipeline`` follows it): Authentication-Results modifier,
then ARC seal, then DKIM sign, then SRS. RFC 8617 §5.1: the sealer performs its
authentication checks and records them (A-R) *before* sealing, and the new set stands above
those fields, so sealing comes after the A-R modifier. DKIM signing comes after the seal and
is top-most: the AMS does not cover ``DKIM-Signature`` and our DKIM signature does not cover
``ARC-*`` fields (neither is in the other's signed-field list), so either order verifies;
signing last keeps the rule that the DKIM signature is computed over the final header block.
SRS only changes the envelope sender, which neither signature covers.

The ARC signature algorithm is rsa-sha256 (the only one RFC 8617 defines): with an ed25519
DKIM key (``DKIM_ALGORITHM=ed25519``) the sealer has no usable key and seals nothing (logged
once at start).

Messages that cannot be sealed are still delivered, unsealed (issue 10, defect 9): no
``From:`` (RFC 8617 requires it signed), an incoming chain dkimpy refuses to continue (e.g. a
forged ``i=50``), or a header section dkimpy cannot parse. For a header section with blanks
before a colon (``Received :``) the seal is computed over :func:`.headers.strict_view`
(relaxed canonicalization: the same hashes as the message as sent); without an empty line
after the header section the body boundary is a guess, so nothing is sealed. Only our own
faults (the key cannot be read or used) stay temporary failures. The verifier likewise
reads such a message through the strict view and never fails the message, only the chain.

Bounded work (issue 10 review). The verifier first checks the chain's structure without
dkimpy or DNS (:func:`chain_error`: at most 50 sets, RFC 8617 §4.2.1; tags of RFC 6376
syntax, so a folded CRLF in ``d=`` is neither a DNS query nor a log line) and fails a chain
that breaks it; dkimpy (made linear by :func:`.dkimverify.harden_dkimpy`) is then handed
the ARC fields and only the fields the ARC-Message-Signatures can cover
(:func:`.dkimverify.covered_message`), since it canonicalizes every field it is given twice
per set. The sealer signs the fields dkimpy's default list names, every instance of each,
over all fields several times: a header section of more than :data:`MAX_SEAL_FIELDS`
fields is not sealed (140,000 ``To:`` fields made a 735 KB ARC-Message-Signature in 1.4 s of
CPU, on mail anyone can send through an alias).

What we seal is checked: dkimpy renders the ``ARC-Authentication-Results`` by parsing our
Authentication-Results with ``authres`` and printing it again, so the set is added only when
that AAR reads back as exactly the results we recorded (the values we write survive that
round trip by construction, :mod:`pymta.headervalue`; this check makes sure of it).
"""

from __future__ import annotations

import asyncio
import logging

import authres
import dkim

from pymta.dns import DNSResolver
from pymta.headervalue import quote_value
from pymta.pipeline import PASS, CannotEvaluate, SpooledBody, Transaction, Verdict, dkimrsa
from pymta.pipeline.dkimkeys import KeyStore
from pymta.pipeline.dkimverify import (
    LIB_LOG,
    TEMPFAIL,
    covered_message,
    parse_tag_value,
    prefetch,
    prefetched_dnsfunc,
    signed_counts,
    tag_error,
)
from pymta.pipeline.headers import field_name, split_fields, strict_view

log = logging.getLogger("pymta.pipeline.arc")

THREAD_THRESHOLD = 32 * 1024
ARC_FIELDS = ("arc-seal", "arc-message-signature", "arc-authentication-results")
_ARC_BYTES = tuple(name.encode() for name in ARC_FIELDS)
#: RFC 8617 §4.2.1: instances 1 to 50; a chain with more sets fails
MAX_ARC_SETS = 50
#: A header section with more fields than this is not sealed (see the module docstring)
MAX_SEAL_FIELDS = 1000
#: dkimpy exceptions that are our fault, not the message's: they stay temporary failures
_LOCAL_FAULTS = (dkim.KeyFormatError, dkim.AuthresNotFoundError, dkim.NaClNotFoundError)


def _arc_fields(header: bytes) -> list[bytes]:
    if b"arc-" not in header.lower():       # most messages: one search, no field split
        return []
    return [f for f in split_fields(header) if field_name(f) in ARC_FIELDS]


def _tags(field: bytes) -> dict[bytes, bytes] | None:
    try:
        return parse_tag_value(field[field.find(b":") + 1:])
    except dkim.util.InvalidTagValueList:      # what it raises for a malformed list
        return None


def chain_error(fields: list[bytes]) -> str:
    """Why the ARC fields of a message cannot form a valid chain before any key lookup, or
    ``""``: more than :data:`MAX_ARC_SETS` sets, an instance outside 1..50, an ARC-Seal or
    ARC-Message-Signature whose tags do not parse or are not RFC 6376 syntax
    (:func:`.dkimverify.tag_error`: ``d=`` and ``s=`` become a DNS name, ``b=``/``bh=``/``h=``
    reach dkimpy checks that backtrack on malformed values). RFC 8617 §5.2: such a chain
    fails."""
    if len(fields) > 3 * MAX_ARC_SETS:
        return f"more than {MAX_ARC_SETS} ARC sets"
    for field in fields:
        name = field_name(field)
        if name == "arc-authentication-results":
            m = dkim.ARC.INSTANCE_RE.search(field[field.find(b":") + 1:])
            instance = m.group(1) if m else None
        else:
            tags = _tags(field)
            if tags is None:
                return f"{name}: tag syntax error"
            error = tag_error(tags, names=name == "arc-message-signature")
            if error:
                return f"{name}: {error}"
            instance = tags.get(b"i")
        if instance is not None and not (instance.isdigit() and len(instance) <= 2
                                         and 1 <= int(instance) <= MAX_ARC_SETS):
            return f"{name}: i= outside 1..{MAX_ARC_SETS}"
    return ""


def arc_key_names(header: bytes) -> list[str]:
    """``<s>._domainkey.<d>`` of every ARC-Seal and ARC-Message-Signature of a header whose
    tags are valid (:func:`chain_error` fails the chain otherwise)."""
    names: list[str] = []
    for field in _arc_fields(header):
        if field_name(field) == "arc-authentication-results":
            continue
        tags = _tags(field)
        if tags and b"s" in tags and b"d" in tags and not tag_error(tags):
            names.append((tags[b"s"] + b"._domainkey." + tags[b"d"])
                         .decode("ascii", "replace").lower().rstrip("."))
    return names


def has_arc(header: bytes) -> bool:
    return bool(_arc_fields(header))


class ArcVerify:
    """The Check: ``arc=pass|fail|none|temperror``, never a rejection."""

    name = "arc"

    def __init__(self, *, resolver: DNSResolver | None = None) -> None:
        """``resolver``: the server's (the wiring passes it); None: a system resolver of
        this stage's own."""
        dkimrsa.install()   # RSA by OpenSSL, parsed key records kept: same verdicts
        self.resolver = resolver if resolver is not None else DNSResolver()

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        header = body.header_bytes()
        fields = _arc_fields(header)
        if not fields:
            txn.results["arc_cv"] = "none"
            if not txn.trusted:
                txn.auth_results.append("arc=none")
            return PASS
        reason = chain_error(fields)
        if reason:
            cv = "fail"
        else:
            records = await prefetch(arc_key_names(header), self.resolver)
            message = await body.read_async()
            if len(message) > THREAD_THRESHOLD:
                cv, reason = await asyncio.to_thread(self._verify, message, records)
            else:
                cv, reason = self._verify(message, records)
            if cv == "fail" and any(v is TEMPFAIL for v in records.values()):
                cv, reason = "temperror", "key lookup failed temporarily"
        txn.results["arc_cv"] = cv
        fragment = f"arc={cv}"
        if reason and cv != "pass":
            fragment += f" reason={quote_value(reason, 100)}"
        txn.auth_results.append(fragment)
        log.info("%s: arc=%s%s", txn.qid, cv, f" ({reason})" if reason else "")
        return PASS

    @staticmethod
    def _verify(message: bytes, records: dict[str, bytes | None | object]) -> tuple[str, str]:
        """The chain of ``message`` as Postfix splits it (:func:`.headers.strict_view`),
        dkimpy reading only the ARC fields and what the ARC-Message-Signatures can cover
        (:func:`.dkimverify.covered_message`): dkimpy canonicalizes every field it is given
        twice per ARC set."""
        dnsfunc = prefetched_dnsfunc(records)
        try:
            data = strict_view(message).data
            fields = [f for f in split_fields(data) if field_name(f) in ARC_FIELDS]
            lists = [t[b"h"] for t in map(_tags, fields) if t and b"h" in t]
            data = covered_message(data, signed_counts(lists),
                                   dict.fromkeys(_ARC_BYTES, len(fields)))
            cv, _results, reason = dkim.arc_verify(data, logger=LIB_LOG, dnsfunc=dnsfunc)
        except Exception as exc:  # noqa: BLE001 - a broken chain is a failed chain
            return "fail", f"{type(exc).__name__}"
        if cv == dkim.CV_Pass:
            return "pass", ""
        if cv == dkim.CV_None:
            return "none", ""
        return "fail", str(reason)[:100]


def forwarded(txn: Transaction) -> bool:
    """Does the message go to a remote target through one of our addresses (an alias)?"""
    for rcpt in txn.recipients:
        if rcpt.local:
            continue
        original = rcpt.original.rpartition("@")[2].lower()
        if original in txn.local_domains and rcpt.original.lower() != rcpt.address.lower():
            return True
    return False


def render_aar_input(authserv_id: str, fragments: list[str]) -> str:
    """The Authentication-Results field handed to ``arc_sign`` (it becomes the AAR)."""
    body = "; ".join(f for f in fragments if f) or "none"
    return f"Authentication-Results: {authserv_id}; {body}\r\n"


def seal(message: bytes, key_pem: bytes, selector: str, domain: str,
         authserv_id: str) -> list[bytes]:
    """The new ARC set for ``message`` (which carries our A-R field), top first.

    Raises :class:`~pymta.pipeline.CannotEvaluate` when this message cannot be sealed (see
    the module docstring); our own faults (the key) propagate."""

    def arc_sign(data: bytes) -> list[bytes]:
        return dkim.arc_sign(data, selector.encode("ascii"), domain.encode("ascii"), key_pem,
                             authserv_id.encode("ascii"), logger=LIB_LOG, linesep=b"\r\n")

    if len(split_fields(message)) > MAX_SEAL_FIELDS:
        raise CannotEvaluate(f"more than {MAX_SEAL_FIELDS} header fields: not ARC-sealed")
    try:
        try:
            return arc_sign(message)
        except dkim.MessageFormatError:
            view = strict_view(message)
            if view.separated:
                raise CannotEvaluate("no empty line after the header section: "
                                     "not ARC-sealed") from None
            return arc_sign(view.data)  # relaxed: the hashes of the message as sent
    except _LOCAL_FAULTS:
        raise
    except (dkim.DKIMException, ValueError, IndexError, KeyError, UnicodeError) as exc:
        raise CannotEvaluate(f"not ARC-sealed: {type(exc).__name__}: {exc}") from exc


def _method_result(fragment: str) -> tuple[str, str]:
    method, _, rest = fragment.partition("=")
    return method.strip().lower(), (rest.split(None, 1) or [""])[0].lower()


def aar_matches(aar_field: bytes, fragments: list[str]) -> bool:
    """Does the ``ARC-Authentication-Results`` dkimpy made hold exactly the results of
    ``fragments``, in order? (One ``authres`` parse, ~0.4 ms; only forwarded mail is sealed.)"""
    value = aar_field.decode("ascii", "replace").partition(":")[2].partition(";")[2]
    try:
        parsed = authres.AuthenticationResultsHeader.parse_value(" ".join(value.split()))
    except authres.core.SyntaxError:
        return False
    want = [_method_result(f) for f in fragments if f] or [("none", "")]
    got = [(r.method, getattr(r, "result", "") or "") for r in parsed.results]
    if not parsed.results:
        got = [("none", "")]
    return got == want


class ArcSeal:
    """The Modifier (see the module docstring)."""

    name = "arc-seal"

    def __init__(self, keys: KeyStore, domain: str, authserv_id: str) -> None:
        dkimrsa.install()   # RSA by OpenSSL: ~10× faster than dkimpy's, same signature
        self.keys = keys
        self.domain = domain.lower()
        self.authserv_id = authserv_id
        self._warned = False

    async def modify(self, txn: Transaction, body: SpooledBody) -> None:
        if not forwarded(txn):
            return
        spooled = await body.read_async()
        fragments = list(txn.auth_results)
        if not any(f.split("=", 1)[0].strip().lower() == "arc" for f in fragments):
            cv = txn.results.get("arc_cv")
            if cv is None:  # no ArcVerify stage ran: an existing chain cannot be continued
                cv = "fail" if has_arc(body.header_bytes()) else "none"
            fragments.append(f"arc={cv}")
        # our own A-R (already in the prepend) is replaced by the rendered one: arc_sign would
        # otherwise read both and list every result twice
        prepend = "".join(f for f in txn.prepend
                          if not f.lower().startswith("authentication-results:"))
        message = (render_aar_input(self.authserv_id, fragments).encode("utf-8", "replace")
                   + prepend.encode("utf-8", "surrogateescape") + spooled)
        fields = await asyncio.to_thread(self._seal, message)
        if not fields:
            log.warning("%s: not ARC-sealed (chain terminated or no usable results)", txn.qid)
            return
        aar = next((f for f in fields if f.lower().startswith(b"arc-authentication-results:")),
                   b"")
        if not aar_matches(aar, fragments):
            log.error("%s: not ARC-sealed: the ARC-Authentication-Results would not say what "
                      "our checks found: %r", txn.qid, aar[:300])
            return
        for field in reversed(fields):  # AAR, AMS, then AS on top
            txn.add_header(field.decode("ascii", "replace").rstrip("\r\n"))
        log.info("%s: ARC-sealed i=%s d=%s s=%s", txn.qid, _instance(fields[0]), self.domain,
                 self.keys.selector)

    def _seal(self, message: bytes) -> list[bytes]:
        key = self.keys.get(self.domain)
        if key.algorithm != "rsa":
            if not self._warned:
                log.warning("ARC sealing needs an RSA key; %s has an %s key: not sealing",
                            self.domain, key.algorithm)
                self._warned = True
            return []
        return seal(message, key.dkimpy_private, key.selector, key.domain, self.authserv_id)


def _instance(field: bytes) -> str:
    m = dkim.ARC.INSTANCE_RE.search(field)
    return m.group(1).decode() if m else "?"
