"""DKIM verification of inbound mail (RFC 6376, with RFC 8301's algorithm rules and RFC 8463's
ed25519-sha256): every ``DKIM-Signature`` of the message as spooled gets its own result.

Implementation summary. The check reads the header section, parses each signature's tags and
collects the key names (``<s>._domainkey.<d>``). Those TXT records are fetched concurrently
through the server's resolver (a :class:`pymta.dns.DNSResolver` given by the wiring, so
``PYMTA_DNS_RESOLVER`` and ``PYMTA_DNS_TIMEOUT`` apply) *before* any hashing. dkimpy then
verifies each signature with a ``dnsfunc`` that only answers from those prefetched records,
so the CPU work (body hash, RSA or ed25519 check) never waits on the network, and runs in a
worker thread when the message is large (:data:`THREAD_THRESHOLD`) so the event loop stays free.

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

Every message is verified as Postfix would hand it to a milter
(:func:`.headers.strict_view`), which is what dkimpy needs for mail it cannot parse as it is
(``Subject :`` with a blank before the colon, a first line that is not a field, no empty
line after the header section: mail Postfix accepts): the blanks before a colon go
(relaxed header canonicalization removes them anyway; a signature with *simple* header
canonicalization over such a field is ``permerror``), and the body starts at the first line
that is not a field (also a ``From `` line, which dkimpy alone would skip). What still does
not parse gives every signature ``permerror``: a result for the message, never a temporary
failure.

Bounded work, whatever the sender wrote (issue 10 review). dkimpy was quadratic in what a
sender controls, in a worker thread that still holds the GIL, so every other client waited:
its header parser (``+=`` per continuation line: a 1 MB folded field took 4.8 s), its
field selection (every field scanned for every name of ``h=``: 24 s), its ``b=`` blanking
regex (a signature ending in 60 KB of blank lines: 17 s) and its relaxed body rule (1.9 s
for 40,000 blanks in a body line). What we do, and why:

- :func:`harden_dkimpy` (run at import) replaces those four module-level helpers with
  linear ones that compute the same results (tests compare them with dkimpy's on
  generated input). The replacements are process-wide, so they are written to be
  behaviour-preserving for every other user of dkimpy in the process, not only for us: same
  return values, same exceptions (``MessageFormatError``, and ``IndexError`` where dkimpy's
  parser raises it), no state of their own, thread-safe; only the time they take differs.
  ``test_issue10_review_dkimpy_helpers_compute_what_dkimpy_computes`` compares them with
  dkimpy's originals (kept in :data:`DKIMPY_ORIGINALS`) on generated input, including the
  error cases; :mod:`.dkimrsa` does the same for RSA signing (byte-identical signatures).
  Chosen over a header-size threshold because a threshold would change
  verdicts for large but ordinary header sections and would not cover the two
  per-signature cases at all (a 60 KB signature is far below any sensible threshold).
- :func:`covered_message`: dkimpy is handed the message as Postfix splits it with only the
  header fields a signature can cover (the lowest fields of each name in ``h=``, as many
  as it names them). dkimpy canonicalizes every field it is given once per signature, so
  this makes its work follow the signatures, not the header section: ten signatures
  below 200,000 small fields went from ~2.5 s to ~0.3 s (most of it our own linear split).
  The verdicts are those of the whole message (see :func:`covered_message`; a test
  compares both on generated messages).
- :func:`tag_error` checks ``d=``, ``s=``, ``b=``, ``bh=``, ``h=``, ``t=``, ``x=`` before any key
  lookup: malformed is ``neutral`` (RFC 6376 §6.1.1, RFC 8601's result for a signature
  syntax error). ``d=`` and ``s=`` must be a domain name and a selector, so a folded CRLF
  in them (which dkimpy keeps) reaches neither a DNS query nor a log line; the others keep
  malformed values from dkimpy's own checks, which backtrack on them.

Measured on a 1 MB header section (CPU of this stage, before → after): 250,000
continuation lines 4.8 → 0.16 s; 200,000 fields 0.59 → 0.34 s; a 62 KB signature ending in
blank lines 17.4 → 0.05 s; 6,000 absent ``h=`` names over 200,000 fields 24.5 → 0.2 s.

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
import bisect
import functools
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dkim
import dkim.canonicalization
import dkim.util
import dns.exception
import dns.name
import dns.resolver

from pymta.dns import DNSResolver
from pymta.headervalue import is_fqdn, pvalue, quote_value
from pymta.pipeline import PASS, SpooledBody, Transaction, Verdict, dkimrsa
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


async def fetch_txt(name: str, resolver: DNSResolver) -> bytes | None | object:
    """The DKIM key record at ``name`` through ``resolver``: the strings of the first
    TXT record (preferring one with ``p=``) joined, None when there is none (NXDOMAIN,
    NODATA), :data:`TEMPFAIL` when the lookup failed temporarily."""
    try:
        answer = await resolver.resolve(name, "TXT")
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
    texts = [b"".join(r.strings) for r in answer]
    for text in texts:
        if b"p=" in text:
            return text
    return texts[0] if texts else None


async def prefetch(names: Sequence[str],
                   resolver: DNSResolver) -> dict[str, bytes | None | object]:
    """The key records at ``names``, looked up concurrently (see :func:`fetch_txt`)."""
    unique = list(dict.fromkeys(names))
    found = await asyncio.gather(*(fetch_txt(n, resolver) for n in unique))
    return dict(zip(unique, found, strict=True))


# dkimpy's key lookup: dnsfunc(name, timeout=...) -> the TXT record or None
DnsFunc = Callable[..., bytes | None]


def prefetched_dnsfunc(records: dict[str, bytes | None | object]) -> DnsFunc:
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

    def isEnabledFor(self, level: int) -> bool:  # logging.Logger's name
        return log.isEnabledFor(logging.DEBUG)


LIB_LOG = _LibLog()


# ------------------------------------------------------------------------------ dkimpy, linear

_DKIMPY_NAME = re.compile(rb"([\x21-\x7e]+?):").match    # dkimpy's field-name rule
_LF_ONLY = re.compile(rb"\r?\n")


def rfc822_parse(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """dkimpy's ``rfc822_parse`` (header fields as ``[name, value]``, values unfolded to CRLF
    line ends; the body with CRLF line ends), with the same result in linear time: each
    value is joined once instead of growing by ``+=``, and the body is not split into lines
    unless it has bare LFs to rewrite. Errors are dkimpy's too: ``MessageFormatError`` for a
    line that is neither a field nor a continuation, and ``IndexError`` for a continuation
    line before the first field (dkimpy's ``headers[-1]`` on an empty list), so another user
    of dkimpy in the process sees exactly what dkimpy's own function gives."""
    headers: list[list[bytes]] = []
    parts: list[bytes] = []
    pos = 0
    rest = b""
    while True:
        nl = message.find(b"\n", pos)
        if nl < 0:
            line, nxt = message[pos:], -1
        else:
            line = message[pos:nl - 1] if nl > pos and message[nl - 1] == 13 else message[pos:nl]
            nxt = nl + 1
        if not line:                                    # the empty line: the body follows
            if nxt >= 0:
                rest = message[nxt:]
            break
        if line[0] in (9, 32):
            if not headers:
                raise IndexError("list index out of range")   # as dkimpy's headers[-1]
            parts += (line, b"\r\n")
        else:
            m = _DKIMPY_NAME(line)
            if m is not None:
                if headers:
                    headers[-1][1] = b"".join(parts)
                headers.append([m.group(1), b""])
                parts = [line[m.end():], b"\r\n"]
            elif not line.startswith(b"From "):
                raise dkim.MessageFormatError(
                    f"Unexpected characters in RFC822 header: {line[:100]!r}")
        if nxt < 0:
            break
        pos = nxt
    if headers:
        headers[-1][1] = b"".join(parts)
    if rest.count(b"\n") != rest.count(b"\r\n"):
        rest = _LF_ONLY.sub(b"\r\n", rest)
    return headers, rest


def select_headers(headers: Sequence[Sequence[bytes]], include_headers: Sequence[bytes]
                   ) -> list[Sequence[bytes]]:
    """dkimpy's ``select_headers`` (for each name of ``h=``, the next instance upwards from
    the bottom), with an index of positions per name instead of a scan of every field per
    name: O(fields + names) instead of O(fields × names)."""
    where: dict[bytes, list[int]] = {}
    for i, field in enumerate(headers):
        where.setdefault(field[0].lower(), []).append(i)
    selected: list[Sequence[bytes]] = []
    below: dict[bytes, int] = {}
    for name in include_headers:
        assert name == name.lower()
        positions = where.get(name, ())
        k = bisect.bisect_left(positions, below.get(name, len(headers))) - 1
        if k >= 0:
            selected.append(headers[positions[k]])
            below[name] = positions[k]
        else:
            below[name] = 0
    return selected


#: dkimpy's ``RE_BTAG`` (the ``b=`` value to blank before hashing a signature field) with its
#: folding-whitespace part ``(?:(?:\s*\r?\n)?\s+)?`` written as ``\s*``: the same language
#: and the same matches, without the nested overlap that backtracked quadratically over a
#: run of blank continuation lines after ``b=`` (6 KB of them: 0.17 s; 60 KB: 17 s).
RE_BTAG = re.compile(rb"([;\s]b\s*=)(?:\s*[a-zA-Z0-9+/=])*(?:\r?\n\Z)?")

# dkimpy's ``[\t ]+\r\n`` tried again from every blank of a run that no CRLF ends
# (quadratic: 40,000 blanks inside a body line took 1.9 s); a match now starts only where a
# run starts, and removes the same bytes.
_TRAILING_BLANKS = re.compile(rb"(?<![\t ])[\t ]+\r\n")


def strip_trailing_whitespace(content: bytes) -> bytes:
    """dkimpy's relaxed body rule "remove blanks at line ends", in linear time."""
    return _TRAILING_BLANKS.sub(b"\r\n", content)


_BLANKS = re.compile(rb"[\t ]+")
_LINE_END = re.compile(rb"\r?\n")


def compress_whitespace(content: bytes) -> bytes:
    """dkimpy's relaxed rule "blanks to one space" with its pattern compiled once: dkimpy's
    ``re.sub`` looks its pattern up in ``re``'s cache for every header field of every
    signature (issue 14: ~10 % of verifying a 4 KiB message)."""
    return _BLANKS.sub(b" ", content)


def unfold_header_value(content: bytes) -> bytes:
    """dkimpy's header unfolding, compiled once; a value without a line end is returned as
    it is (what the substitution gives it)."""
    return _LINE_END.sub(b"", content) if b"\n" in content else content


_PARSE_TAG_VALUE = dkim.util.parse_tag_value
#: Tag lists longer than this are parsed every time instead of kept.
MAX_KEPT_TAG_LIST = 4096


def parse_tag_value(tag_list: bytes) -> dict[bytes, bytes]:
    """dkimpy's ``parse_tag_value``, the last lists kept: each signature is parsed by us
    (:func:`parse_signatures`), again by dkimpy's ``verify`` and again by DMARC's and ARC's
    readers (~15 µs each). Same result (a dict of the caller's own) and same exceptions;
    failures are not kept."""
    if not isinstance(tag_list, bytes) or len(tag_list) > MAX_KEPT_TAG_LIST:
        return _PARSE_TAG_VALUE(tag_list)
    return dict(_parse_tag_value_kept(tag_list))


@functools.lru_cache(maxsize=256)
def _parse_tag_value_kept(tag_list: bytes) -> dict[bytes, bytes]:
    return _PARSE_TAG_VALUE(tag_list)


#: What :func:`harden_dkimpy` replaced (the tests compare both on the same input).
DKIMPY_ORIGINALS: dict[str, object] = {}


def harden_dkimpy() -> None:
    """Make dkimpy's parsing and hashing helpers linear, results unchanged (idempotent).

    dkimpy's own versions are quadratic in what a sender controls: the header section
    (``rfc822_parse``: 400 KB of continuation lines, 0.5 s; a megabyte, seconds), the
    signature's ``h=`` list against the fields present (``select_headers``: 6,000 names
    over 200,000 fields, 24 s), a ``b=`` followed by blank lines (``RE_BTAG``) and blanks
    in the body (``strip_trailing_whitespace``). They run in a worker thread but hold the
    GIL, so the event loop (every other client) waits. Replacing the module-level names
    dkimpy calls (as :mod:`.dkimrsa` does for RSA signing) fixes signing, sealing and
    verifying alike; each replacement computes what dkimpy's does (the unit tests compare
    them on generated input). Three more only save time, not order of growth: dkimpy's
    relaxed header rules with their patterns compiled once, and its tag-list parser with
    the last lists kept."""
    if not DKIMPY_ORIGINALS:
        DKIMPY_ORIGINALS.update(
            rfc822_parse=dkim.rfc822_parse, select_headers=dkim.select_headers,
            RE_BTAG=dkim.RE_BTAG,
            strip_trailing_whitespace=dkim.canonicalization.strip_trailing_whitespace,
            compress_whitespace=dkim.canonicalization.compress_whitespace,
            unfold_header_value=dkim.canonicalization.unfold_header_value,
            parse_tag_value=dkim.parse_tag_value)
    dkim.rfc822_parse = rfc822_parse
    dkim.select_headers = select_headers
    dkim.RE_BTAG = RE_BTAG
    dkim.canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
    dkim.canonicalization.compress_whitespace = compress_whitespace
    dkim.canonicalization.unfold_header_value = unfold_header_value
    dkim.parse_tag_value = parse_tag_value


harden_dkimpy()


# ------------------------------------------------------------------------------ what dkimpy sees


def _raw_name(field: bytes) -> bytes:
    return field[:field.find(b":")].rstrip(b" \t").lower()


def signed_counts(h_values: Sequence[bytes]) -> dict[bytes, int]:
    """For ``h=`` lists (valid syntax, :func:`tag_error`): per lower-case field name, the
    most times one list names it, plus one for ``from`` (dkimpy's verifier adds a ``from``
    to every list that has one, against a second From field)."""
    counts: dict[bytes, int] = {}
    for value in h_values:
        mine: dict[bytes, int] = {}
        for name in value.split(b":"):
            name = name.strip().lower()
            mine[name] = mine.get(name, 0) + 1
        if b"from" in mine:
            mine[b"from"] += 1
        for name, n in mine.items():
            counts[name] = max(counts.get(name, 0), n)
    return counts


def covered_message(data: bytes, bottom: dict[bytes, int], top: dict[bytes, int]) -> bytes:
    """``data`` (a message dkimpy can parse: :func:`.headers.strict_view`) with only the
    header fields a verifier can look at: per name, the ``bottom[name]`` lowest and the
    ``top[name]`` highest fields of that name; the rest of the header section is left out,
    the body kept. The same bytes object when nothing is left out.

    Why this gives the verdicts of the whole message: a verifier hashes, for each name of a
    signature's ``h=``, the next field of that name upwards from the bottom (RFC 6376
    §5.4.2), so a list naming ``to`` twice reads the two lowest ``To`` fields and nothing
    else; fields of other names, and higher ones, take no part, and leaving them out moves
    no chosen field relative to another. The signature fields themselves are kept by
    ``top`` (DKIM: the first ten, which ``idx`` numbers) or entirely (ARC). What dkimpy then
    reads is bounded by the signatures instead of by the header section: it canonicalizes
    every field once per signature, so 200,000 small fields cost it 0.2 s a signature."""
    fields = split_fields(data)
    names = [_raw_name(f) for f in fields]
    where: dict[bytes, list[int]] = {}
    for i, name in enumerate(names):
        where.setdefault(name, []).append(i)
    keep: set[int] = set()
    for name, n in bottom.items():
        if n > 0:
            keep.update(where.get(name, ())[-n:])
    for name, n in top.items():
        keep.update(where.get(name, ())[:n])
    if len(keep) == len(fields):
        return data
    size = sum(map(len, fields))
    return b"".join([fields[i] for i in sorted(keep)]) + data[size:]


# ------------------------------------------------------------------------------ tag syntax

_LABEL = rb"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
#: RFC 6376 §3.1 ``selector = sub-domain *( "." sub-domain )`` (all-digit labels allowed:
#: ``s=20230601``; ``_`` tolerated as in host names)
_SELECTOR = re.compile(rb"%s(?:\.%s)*" % (_LABEL, _LABEL))
#: RFC 6376 ``base64string``: base64 characters and folding whitespace, up to two ``=``
_BASE64 = re.compile(rb"[A-Za-z0-9+/][A-Za-z0-9+/\s]*(?:=\s*){0,2}")
#: RFC 6376 ``sig-h-tag``: field names separated by ``:`` with optional whitespace around it
_NAME_LIST = re.compile(rb"[\x21-\x39\x3b-\x7e]+(?:\s*:\s*[\x21-\x39\x3b-\x7e]+)*")


def tag_error(tags: dict[bytes, bytes], *, names: bool = True) -> str:
    """Why the tags of a signature (DKIM-Signature, ARC-Seal, ARC-Message-Signature) are not
    valid RFC 6376 syntax, or ``""``. Checked before any key lookup and before dkimpy sees
    them (RFC 6376 §6.1.1: a signature whose tags are malformed is ignored; RFC 8601 calls
    that ``neutral``):

    - ``d=`` must be a domain name and ``s=`` a selector: dkimpy keeps the folding CRLF of a
      tag value, so ``d=evil.test<CRLF> <text>`` would otherwise become a DNS query name
      and, through the log line naming the key, a line of the log (issue 10 review).
    - ``b=``, ``bh=``: base64; ``h=``: a list of field names. dkimpy's own checks of these
      backtrack quadratically on malformed values (a run of whitespace not followed by
      what they expect), so a malformed value never reaches them.
    - ``t=``, ``x=``: digits, at most 40 of them (RFC 6376 has 12; dkimpy's ``int()`` of a
      5,000-digit value raised ``ValueError``, which is not a DKIM error)."""
    domain = tags.get(b"d")
    if domain is not None:
        text = domain[:-1] if domain.endswith(b".") else domain
        if not (text.isascii() and is_fqdn(text.decode("ascii"))):
            return "d= value is not a domain name"
    selector = tags.get(b"s")
    if selector is not None and (len(selector) > 253 or _SELECTOR.fullmatch(selector) is None):
        return "s= value is not a selector"
    for tag in (b"b", b"bh"):
        value = tags.get(tag)
        if value is not None and _BASE64.fullmatch(value) is None:
            return f"{tag.decode()}= value is not base64"
    if names and b"h" in tags and _NAME_LIST.fullmatch(tags[b"h"]) is None:
        return "h= value is not a list of field names"
    for tag in (b"t", b"x"):
        value = tags.get(tag)
        if value is not None and not (value.isdigit() and len(value) <= 40):
            return f"{tag.decode()}= value is not a decimal integer"
    return ""


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


def parse_signatures(header: bytes, limit: int | None = None) -> list[_Sig]:
    """The DKIM-Signature fields of a header section (the first ``limit``), top first, with
    their tags parsed and checked (:func:`tag_error`). Fields are split as Postfix splits
    them (:func:`.headers.split_fields`), so this never fails on a header section dkimpy
    cannot parse."""
    out: list[_Sig] = []
    if b"dkim-signature" not in header.lower():     # most messages: one search
        return out
    for field in split_fields(header):
        if field_name(field) != "dkim-signature":
            continue
        if limit is not None and len(out) >= limit:
            break
        value = field[field.find(b":") + 1:]
        index = len(out)
        try:
            tags = parse_tag_value(value)
        except dkim.util.InvalidTagValueList as exc:   # InvalidTagSpec, DuplicateTag
            # the exception's name, not its text: that quotes the tag, of any length
            out.append(_Sig(index, None, f"signature syntax error: {type(exc).__name__}"))
            continue
        out.append(_Sig(index, tags, tag_error(tags)))
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
    """Verify every signature of ``message`` against prefetched key records (CPU only).

    dkimpy reads the message as Postfix splits it (:func:`.headers.strict_view`) and only
    the header fields the signatures can cover (:func:`covered_message`)."""
    view = strict_view(message)
    usable = [s.tags for s in sigs if s.tags is not None and not s.error and b"h" in s.tags]
    data = covered_message(view.data, signed_counts([t[b"h"] for t in usable]),
                           {b"dkim-signature": len(sigs)})
    try:
        checker = dkim.DKIM(data, logger=LIB_LOG, minkey=MIN_KEY_BITS)
    except dkim.MessageFormatError as exc:
        log.info("DKIM: message cannot be parsed: %s", exc)
        return [_result(sig, "permerror", "message cannot be parsed") for sig in sigs]
    dnsfunc = prefetched_dnsfunc(records)
    results: list[DkimSignature] = []
    for sig in sigs:
        results.append(_verify_one(checker, sig, records, dnsfunc, view.renamed))
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
                dnsfunc: DnsFunc, renamed: frozenset[str] = frozenset()) -> DkimSignature:
    """The signature's result: refused on its tags, then on its key, else what dkimpy's
    cryptographic check says (in that order, so a bad signature costs no key work)."""
    if sig.tags is None or sig.error:
        return _result(sig, "neutral", sig.error)
    refused = _tags_refused(sig, sig.tags, renamed)
    if refused is None:
        refused = _key_refused(sig, sig.tags, records)
    if refused is not None:
        return refused
    return _checked(checker, sig, dnsfunc)


def _tags_refused(sig: _Sig, tags: dict[bytes, bytes],
                  renamed: frozenset[str]) -> DkimSignature | None:
    """The result of a signature whose tags alone rule it out; None when they do not."""
    try:
        dkim.validate_signature_fields(tags)
    except (dkim.ValidationError, ValueError) as exc:
        return _result(sig, "neutral", str(exc))
    if _simple_over_renamed(tags, renamed):
        return _result(sig, "permerror", "simple canonicalization of a field in obsolete syntax")
    if tags[b"a"].lower() == b"rsa-sha1":
        return _result(sig, "permerror", "rsa-sha1 is not accepted (RFC 8301)")
    return None


def _key_refused(sig: _Sig, tags: dict[bytes, bytes],
                 records: dict[str, bytes | None | object]) -> DkimSignature | None:
    """The result of a signature whose key (prefetched in ``records``) is missing, unusable
    or unfit for it; None when the key may verify it."""
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
    return None


def _checked(checker: dkim.DKIM, sig: _Sig, dnsfunc: DnsFunc) -> DkimSignature:
    """dkimpy's verdict on a signature that passed the checks before it."""
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
                 max_signatures: int = MAX_SIGNATURES, *,
                 resolver: DNSResolver | None = None) -> None:
        """``resolver``: the server's (the wiring passes it); None: a system resolver of
        this stage's own."""
        dkimrsa.install()   # RSA by OpenSSL, parsed key records kept: same verdicts
        self.thread_threshold = thread_threshold
        self.max_signatures = max_signatures
        self.resolver = resolver if resolver is not None else DNSResolver()

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        results = await self.verify(body)
        txn.results["dkim_signatures"] = results
        if not results:
            if not txn.trusted:  # our own users' unsigned mail needs no "dkim=none"
                txn.auth_results.append("dkim=none")
            return PASS
        for res in results:
            txn.auth_results.append(res.auth_result())
        # d= and s= as in the A-R field (a domain or token, else percent-encoded and cut):
        # they come from the message; the log formatter escapes controls besides
        summary = ", ".join(f"{r.result} (d={pvalue(r.domain)} s={pvalue(r.selector)}"
                            + (f": {r.reason[:200]})" if r.reason else ")") for r in results)
        log.info("%s: dkim: %s", txn.qid, summary)
        return PASS

    async def verify(self, body: SpooledBody) -> list[DkimSignature]:
        sigs = parse_signatures(body.header_bytes(), self.max_signatures)
        if not sigs:
            return []
        names = [_key_name(s.tags[b"s"], s.tags[b"d"]) for s in sigs
                 if s.tags and not s.error and b"s" in s.tags and b"d" in s.tags]
        records = await prefetch(names, self.resolver)
        message = await body.read_async()
        if len(message) > self.thread_threshold:
            return await asyncio.to_thread(verify_all, message, sigs, records)
        return verify_all(message, sigs, records)
