"""DANE-EE matching (RFC 7672 §3.1.1, RFC 6698 §2.1): a certificate matches a TLSA record
by its whole DER or its public key, exactly or by SHA-256/SHA-512; other usages are not
usable here."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pymta.delivery.dane import Tlsa, matches, tlsa_name, usable
from tests.services.tls import make_self_signed


@pytest.fixture(scope="module")
def cert_der(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    cert, _key = make_self_signed(tmp_path_factory.mktemp("tls"), "mx.example.com")
    return x509.load_pem_x509_certificate(Path(cert).read_bytes()).public_bytes(
        serialization.Encoding.DER)


def _spki(der: bytes) -> bytes:
    return x509.load_der_x509_certificate(der).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("selector, mtype", [(s, m) for s in (0, 1) for m in (0, 1, 2)])
def test_dane_ee_matches_by_each_selector_and_matching_type(cert_der: bytes, selector: int,
                                                            mtype: int) -> None:
    selected = cert_der if selector == 0 else _spki(cert_der)
    data = selected if mtype == 0 else hashlib.new({1: "sha256", 2: "sha512"}[mtype],
                                                   selected).digest()
    assert matches([Tlsa(3, selector, mtype, data)], cert_der)
    assert not matches([Tlsa(3, selector, mtype, data[:-1] + bytes([data[-1] ^ 1]))],
                       cert_der)


def test_only_dane_ee_records_are_usable(cert_der: bytes) -> None:
    digest = hashlib.sha256(_spki(cert_der)).digest()
    for usage in (0, 1, 2):             # PKIX-TA, PKIX-EE, DANE-TA: not evaluated here
        assert usable([Tlsa(usage, 1, 1, digest)]) == []
        assert not matches([Tlsa(usage, 1, 1, digest)], cert_der)
    assert usable([Tlsa(3, 2, 1, digest), Tlsa(3, 1, 3, digest)]) == []
    assert matches([Tlsa(2, 1, 1, digest), Tlsa(3, 1, 1, digest)], cert_der)
    assert not matches([Tlsa(3, 1, 1, digest)], None)


def test_tlsa_name() -> None:
    assert tlsa_name("mx.example.com.", 25) == "_25._tcp.mx.example.com"
