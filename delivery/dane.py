"""DANE for SMTP (RFC 7672): the TLSA records of an MX host, and whether a peer's certificate
matches them.

How a destination at level ``dane`` is treated (Postfix's ``dane`` level, which trusts the
AD bit of its local validating resolver as pymta trusts ``PYMTA_DNS_RESOLVER``'s):

- the MX answer (or, for a host without MX, the host itself), the host's address records
  and the TLSA answer at ``_25._tcp.<host>`` must all come back authenticated (AD); anything
  insecure is opportunistic TLS (``may``), as with no TLSA records at all (RFC 7672 §2.2).
  TLSA is not asked for a host whose address records are insecure (as Postfix: broken
  servers of unsigned zones fail underscore names, which would defer the mail) nor for an
  address literal. A CNAME'd MX host is looked up at its own name only (not yet at the
  CNAME target, §2.2.2);
- a TLSA lookup that fails (SERVFAIL, timeout) defers the host: an attacker who can block
  the answer must not be able to downgrade the connection (§2.2);
- secure TLSA records of which none is usable (only PKIX usages 0/1, unknown selectors or
  matching types, and DANE-TA(2), which this version does not evaluate) give mandatory TLS
  without authentication (``encrypt``, §2.2, as Postfix);
- usable DANE-EE(3) records: TLS is required and the server's own certificate must match one
  of them (selector 0 the whole certificate, 1 its public key; matching 0 exact, 1 SHA-256,
  2 SHA-512); names and dates are not checked for DANE-EE (§3.1.1). No match: the host
  failed, deferred with the reason, never cleartext.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

#: TLSA usage, selector and matching type values (RFC 6698 §2.1, RFC 7218 names).
DANE_TA, DANE_EE = 2, 3
SELECTORS = (0, 1)              # Cert, SPKI
MATCHING = {0: None, 1: "sha256", 2: "sha512"}    # Full, SHA2-256, SHA2-512


@dataclass(frozen=True, slots=True)
class Tlsa:
    """One TLSA record."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        """What this version can authenticate with: DANE-EE with a known selector and
        matching type (DANE-TA needs the chain: not evaluated yet)."""
        return (self.usage == DANE_EE and self.selector in SELECTORS
                and self.mtype in MATCHING)


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


def matches(records: Sequence[Tlsa], cert_der: bytes | None) -> bool:
    """Does the server's certificate (DER) match one of the usable records?"""
    if not cert_der:
        return False
    for record in usable(records):
        try:
            selected = _selected(cert_der, record.selector)
        except Exception:  # noqa: BLE001 - a certificate or key type we cannot read
            continue        # (the peer's to choose): no match by this record, try the next
        algorithm = MATCHING[record.mtype]
        value = selected if algorithm is None else hashlib.new(algorithm, selected).digest()
        if value == record.data:
            return True
    return False
