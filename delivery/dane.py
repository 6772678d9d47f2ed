"""DANE for SMTP (RFC 7672): the TLSA records of an MX host, and whether a peer's certificate
(or the chain it sent) matches them.

How a destination at level ``dane`` is treated (Postfix's ``dane`` level, which trusts the
AD bit of its local validating resolver as pymta trusts ``PYMTA_DNS_RESOLVER``'s):

- the MX answer (or, for a host without MX, the host itself), the host's address records
  and the TLSA answer at ``_25._tcp.<host>`` must all come back authenticated (AD); anything
  insecure is opportunistic TLS (``may``), as with no TLSA records at all (RFC 7672 §2.2).
  TLSA is not asked for a host whose address records are insecure (as Postfix: broken
  servers of unsigned zones fail underscore names, which would defer the mail) nor for an
  address literal;
- a CNAME'd MX host (RFC 7672 §2.2.2, RFC 7671 §7): when its address answer, CNAME chain
  included, is authenticated (a validating resolver sets AD only when every link is), its
  TLSA records are looked up at the chain's final target first and, when there are none
  there (NXDOMAIN, NODATA or an insecure answer), at the MX host name itself; the first
  secure set decides. A chain with an insecure link is an unsigned host (``may``);
- a TLSA lookup that fails (SERVFAIL, timeout) defers the host: an attacker who can block
  the answer must not be able to downgrade the connection (§2.2);
- secure TLSA records of which none is usable (only PKIX usages 0/1, unknown selectors or
  matching types) give mandatory TLS without authentication (``encrypt``, §2.2, as
  Postfix);
- usable records: TLS is required and the server must be authenticated by one of them
  (:func:`authenticate`; records of both usages in one set: any match will do). No match:
  the host failed, deferred with the reason, never cleartext. Selector 0 is the whole
  certificate, 1 its public key; matching type 0 exact, 1 SHA-256, 2 SHA-512.

  - DANE-EE(3): the server's own certificate must match; names and dates are not checked
    (§3.1.1: the DNS record is the whole of the trust).
  - DANE-TA(2): a certificate the server sent *above* its own (depth 1 or more, as OpenSSL
    matches them: a self-issued server certificate is published as ``3 x x``) must match;
    the server certificate must chain to it (each certificate signed by the next, the
    issuers CAs) within the certificates sent, every certificate of that path must be
    within its dates, and the server certificate must name one of the reference
    identifiers (§3.2.2: the TLSA base domain, and for a CNAME'd MX host both the target
    and the MX host name; RFC 6125 matching, as ``verify`` does). The anchor must be in the
    chain: a ``2 1 x`` record of a key the server does not send (RFC 7671 §5.2.2 allows a
    bare key) is not evaluated, and the reason says so. Path length constraints, name
    constraints and policies are not checked.

Python (3.10 to 3.12) exposes the chain the server sent only privately
(``SSLObject._sslobj.get_unverified_chain()``; public from 3.13): where neither exists,
DANE-TA records match nothing and the reason says why (:func:`presented_chain`).
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from .tlspolicy import name_matches

#: TLSA usage, selector and matching type values (RFC 6698 §2.1, RFC 7218 names).
DANE_TA, DANE_EE = 2, 3
SELECTORS = (0, 1)              # Cert, SPKI
MATCHING = {0: None, 1: "sha256", 2: "sha512"}    # Full, SHA2-256, SHA2-512
#: Certificates of a presented chain looked at (a server sends two or three): bounds the
#: path search, run in the event loop, however many a hostile server sends.
MAX_CHAIN = 10


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """What this version can authenticate with: DANE-TA or DANE-EE with a known
        selector and matching type (PKIX usages 0/1 are not for SMTP, RFC 7672 §3.1.3)."""
        return (self.usage in (DANE_TA, DANE_EE) and self.selector in SELECTORS
                and self.mtype in MATCHING)


@dataclass(frozen=True, slots=True)
class TlsaSet(Sequence[Tlsa]):
    """The secure TLSA records of one MX host and the names a DANE-TA match must find in
    its certificate. A sequence of the records, so that it travels where a plain tuple of
    them did (the relay's connection code hands it to the certificate check unchanged)."""

    records: tuple[Tlsa, ...]
    base: str                       # the TLSA base domain: where the records were found
    names: tuple[str, ...]          # reference identifiers (RFC 7672 §3.2.2), base first

    @overload
    def __getitem__(self, index: int) -> Tlsa: ...

    @overload
    def __getitem__(self, index: slice) -> tuple[Tlsa, ...]: ...

    def __getitem__(self, index: int | slice) -> Tlsa | tuple[Tlsa, ...]:
        return self.records[index]

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Tlsa]:
        return iter(self.records)


def tlsa_name(host: str, port: int) -> str:
    return f"_{port}._tcp.{host.rstrip('.')}"


def usable(records: Sequence[Tlsa]) -> list[Tlsa]:
    return [r for r in records if r.usable]


def _selected(cert_der: bytes, selector: int) -> bytes:
    if selector == 0:
        return cert_der
    cert = x509.load_der_x509_certificate(cert_der)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def _match(record: Tlsa, cert_der: bytes) -> bool:
    """Does ``cert_der`` match ``record``'s selector, matching type and data?"""
    try:
        selected = _selected(cert_der, record.selector)
    except Exception:  # noqa: BLE001 - a certificate or key type we cannot read
        return False    # (the peer's to choose): no match by this record
    algorithm = MATCHING[record.mtype]
    value = selected if algorithm is None else hashlib.new(algorithm, selected).digest()
    return value == record.data


def matches(records: Sequence[Tlsa], cert_der: bytes | None) -> bool:
    """Does the server's own certificate (DER) match one of the usable DANE-EE records?
    (DANE-TA records need the chain and the names: :func:`authenticate`.)"""
    if not cert_der:
        return False
    return any(_match(r, cert_der) for r in usable(records) if r.usage == DANE_EE)


def presented_chain(ssl_object: Any) -> list[bytes] | None:
    """The certificates the server sent, its own first, as DER; None where this Python
    does not expose them (DANE-TA then matches nothing). The public method of Python 3.13,
    else the private one of the ``_ssl`` object under an ``ssl.SSLObject`` (3.10 to 3.12),
    whose items are ``_ssl.Certificate`` objects rather than bytes."""
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if getter is None:
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    if getter is None:
        return None
    try:
        chain = getter() or []
        out: list[bytes] = []
        for cert in chain[:MAX_CHAIN]:
            if isinstance(cert, bytes):
                out.append(cert)
            else:       # PEM is the one encoding public_bytes() takes without _ssl's constant
                pem = cert.public_bytes()
                out.append(ssl.PEM_cert_to_DER_cert(pem if isinstance(pem, str)
                                                    else pem.decode("ascii")))
    except Exception:  # noqa: BLE001 - a private interface that changed shape: no chain
        return None
    return out


def authenticate(records: Sequence[Tlsa], cert_der: bytes | None,
                 chain: Sequence[bytes] | None, names: Sequence[str], *,
                 now: datetime.datetime | None = None) -> str:
    """Why the server is not authenticated by ``records``, or ``""`` when it is.

    ``cert_der`` is the server's certificate, ``chain`` what it sent (its own first, as
    :func:`presented_chain` gives it; None: not known), ``names`` the reference identifiers
    of DANE-TA (module docstring). A DANE-EE match of the server's certificate is enough;
    else each certificate above it that a DANE-TA record matches is tried as the anchor in
    turn; when none passes, the reason is the first one's."""
    if not cert_der:
        return "no certificate presented"
    if matches(records, cert_der):
        return ""
    anchors = [r for r in usable(records) if r.usage == DANE_TA]
    if not anchors:
        return "no TLSA record matches its certificate"
    if chain is None:
        return ("no DANE-EE record matches its certificate, and its DANE-TA records cannot "
                "be checked: this Python does not expose the certificate chain the server "
                "sent")
    try:
        leaf = x509.load_der_x509_certificate(cert_der)
    except ValueError as exc:
        return f"cannot read its certificate: {exc}"
    issuers: list[x509.Certificate] = []
    for der in chain[:MAX_CHAIN]:
        if der == cert_der:
            continue
        try:
            issuers.append(x509.load_der_x509_certificate(der))
        except ValueError:
            continue    # a certificate we cannot read is no use for a path: skip it
    matched = [cert for cert in issuers
               if any(_match(r, cert.public_bytes(serialization.Encoding.DER))
                      for r in anchors)]
    if not matched:
        why = "no TLSA record matches its certificate or the certificates it sent with it"
        if any(r.selector == 1 for r in anchors):
            why += (" (a DANE-TA key that is not among them is not supported: the server "
                    "must send its trust anchor's certificate)")
        return why
    moment = now if now is not None else datetime.datetime.now(datetime.UTC)
    problems = [_anchored_problem(leaf, anchor, issuers, names, moment) for anchor in matched]
    if "" in problems:
        return ""
    return problems[0]


def _anchored_problem(leaf: x509.Certificate, anchor: x509.Certificate,
                      issuers: Sequence[x509.Certificate], names: Sequence[str],
                      now: datetime.datetime) -> str:
    """Why ``leaf`` is not authenticated by the trust anchor ``anchor``, or ``""``."""
    path = _path(leaf, anchor, issuers)
    if path is None:
        return (f"its certificate does not chain to the DANE-TA trust anchor "
                f"{_subject(anchor)} within the certificates it sent")
    for cert in path:
        if now < cert.not_valid_before_utc:
            return (f"certificate {_subject(cert)} is not valid before "
                    f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")
        if now > cert.not_valid_after_utc:
            return (f"certificate {_subject(cert)} expired on "
                    f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    for cert in path[1:]:
        problem = _issuer_problem(cert, is_anchor=cert is anchor)
        if problem:
            return problem
    presented = certificate_names(leaf)
    if any(name_matches(p, n) for p in presented for n in names):
        return ""
    shown = ", ".join(presented[:5]) or "none"
    wanted = " or ".join(dict.fromkeys(n.lower().rstrip(".") for n in names))
    return f"certificate names ({shown}) do not match {wanted}"


def _path(leaf: x509.Certificate, anchor: x509.Certificate,
          issuers: Sequence[x509.Certificate]) -> list[x509.Certificate] | None:
    """leaf, ..., anchor: each certificate directly issued (name and signature) by the next,
    built from the certificates sent in any order (TLS 1.3 allows them unordered); None
    when there is no such path. Breadth first: the shortest path, and at most n² signature
    checks however the server arranges its certificates to make the search expensive."""
    parent: dict[int, int] = {}         # index in issuers -> the index it issued (-1: leaf)
    frontier = [-1]
    while frontier:
        following: list[int] = []
        for below in frontier:
            cert = leaf if below < 0 else issuers[below]
            for i, candidate in enumerate(issuers):
                if i in parent or not _issued_by(cert, candidate):
                    continue
                parent[i] = below
                if candidate is anchor:
                    path = [candidate]
                    while (i := parent[i]) >= 0:
                        path.append(issuers[i])
                    return [leaf, *reversed(path)]
                following.append(i)
        frontier = following
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except Exception:  # noqa: BLE001 - InvalidSignature, a name mismatch, a key type
        return False    # cryptography cannot check: not issued by it, for our purpose
    return True


def _issuer_problem(cert: x509.Certificate, *, is_anchor: bool) -> str:
    """Why ``cert`` may not issue certificates, or ``""``: an intermediate must say it is a
    CA; the anchor, which the DNS vouches for, only must not say it is not (an old
    certificate without extensions is accepted, as OpenSSL does for its roots). A key usage
    extension, when present, must allow certificate signing."""
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if (constraints is None and not is_anchor) or (constraints is not None
                                                   and not constraints.ca):
        return f"certificate {_subject(cert)} is not a CA certificate but issued another"
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return ""
    if not usage.key_cert_sign:
        return f"certificate {_subject(cert)} may not sign certificates (key usage)"
    return ""


def certificate_names(cert: x509.Certificate) -> list[str]:
    """The DNS names ``cert`` is for: its subjectAltName DNS entries, else its Common
    Name(s) (RFC 7672 §3.2.3 allows the CN only without DNS names)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = [str(n) for n in san.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        dns_names = []
    if dns_names:
        return dns_names
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(
        NameOID.COMMON_NAME)]


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or "(empty subject)"
