"""DANE matching (RFC 7672 §3, RFC 6698 §2.1): a certificate matches a TLSA record by its
whole DER or its public key, exactly or by SHA-256/SHA-512. DANE-EE(3) by the server's own
certificate alone; DANE-TA(2) by a certificate the server sent above its own, to which its
certificate must chain, within their dates, and which must name a reference identifier.
PKIX usages are not usable. And the relay's TLSA lookup of a CNAME'd MX host (§2.2.2),
against a fake resolver."""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.flags
import dns.resolver
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pymta.delivery.dane import (
    Tlsa,
    TlsaSet,
    authenticate,
    matches,
    presented_chain,
    tlsa_name,
    usable,
)
from pymta.delivery.relay import HostFailure, SMTPRelayAgent
from pymta.dns import DNSResolver
from tests.services.tls import make_self_signed
from tests.tlsca import TestCA


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


def test_issue15_dane_ta_records_are_usable_pkix_ones_are_not(cert_der: bytes) -> None:
    digest = hashlib.sha256(_spki(cert_der)).digest()
    for usage in (0, 1):                # PKIX-TA, PKIX-EE: not for SMTP (RFC 7672 §3.1.3)
        assert usable([Tlsa(usage, 1, 1, digest)]) == []
        assert not matches([Tlsa(usage, 1, 1, digest)], cert_der)
    assert usable([Tlsa(2, 1, 1, digest)]) == [Tlsa(2, 1, 1, digest)]
    assert usable([Tlsa(3, 2, 1, digest), Tlsa(2, 1, 3, digest)]) == []
    # matches() is DANE-EE's, by the server's certificate alone: a TA record never matches it
    assert not matches([Tlsa(2, 1, 1, digest)], cert_der)
    assert matches([Tlsa(2, 1, 1, digest), Tlsa(3, 1, 1, digest)], cert_der)
    assert not matches([Tlsa(3, 1, 1, digest)], None)


def test_tlsa_name() -> None:
    assert tlsa_name("mx.example.com.", 25) == "_25._tcp.mx.example.com"


def test_issue15_dane_cname_tlsa_set_is_a_sequence_of_its_records() -> None:
    records = (Tlsa(3, 1, 1, b"a"), Tlsa(2, 1, 1, b"b"))
    tlsa = TlsaSet(records, "mx.provider.test", ("mx.provider.test", "mx.signed.test"))
    assert list(tlsa) == list(records) and len(tlsa) == 2 and tlsa[1] == records[1]
    assert usable(tlsa) == list(records)


# ------------------------------------------------------------------------------ DANE-TA

NOW = datetime.datetime.now(datetime.UTC)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def _record(cert: x509.Certificate, selector: int = 1, mtype: int = 1) -> Tlsa:
    selected = _der(cert) if selector == 0 else _spki(_der(cert))
    data = selected if mtype == 0 else hashlib.new({1: "sha256", 2: "sha512"}[mtype],
                                                   selected).digest()
    return Tlsa(2, selector, mtype, data)


@dataclass
class Chain:
    ca: TestCA
    leaf: bytes             # DER
    sent: list[bytes]       # what the server sends: leaf, intermediate


def _chain(ca: TestCA, names: tuple[str, ...] = ("mx.signed.test",), **kw: Any) -> Chain:
    pem, _key = ca.issue(names, "ec", **kw)
    certs = [_der(c) for c in x509.load_pem_x509_certificates(pem)]
    return Chain(ca, certs[0], certs)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def chain(ca: TestCA) -> Chain:
    return _chain(ca)


def _check(records: list[Tlsa], chain: Chain, sent: list[bytes] | None = None,
           names: tuple[str, ...] = ("mx.signed.test",)) -> str:
    return authenticate(records, chain.leaf, chain.sent if sent is None else sent, names,
                        now=NOW)


@pytest.mark.parametrize("selector, mtype", [(s, m) for s in (0, 1) for m in (0, 1, 2)])
def test_issue15_dane_ta_at_the_intermediate_by_each_selector_and_matching_type(
        chain: Chain, selector: int, mtype: int) -> None:
    assert _check([_record(chain.ca.inter, selector, mtype)], chain) == ""


@pytest.mark.parametrize("selector", [0, 1])
def test_issue15_dane_ta_at_the_root_when_the_server_sends_it(chain: Chain,
                                                              selector: int) -> None:
    root = _record(chain.ca.root, selector)
    assert _check([root], chain, [*chain.sent, _der(chain.ca.root)]) == ""
    # in any order (TLS 1.3 allows it): the path is built from what was sent
    assert _check([root], chain, [chain.leaf, _der(chain.ca.root), chain.sent[1]]) == ""


def test_issue15_dane_ta_key_the_server_does_not_send_is_not_supported(chain: Chain) -> None:
    """``2 1 1`` of the root, which the server leaves out (as most do): a bare key would
    need the intermediate's signature checked against it; we say we do not."""
    why = _check([_record(chain.ca.root)], chain)
    assert "no TLSA record matches" in why and "not supported" in why, why
    assert "not supported" not in _check([_record(chain.ca.root, selector=0)], chain)


def test_issue15_dane_ta_wrong_name(chain: Chain) -> None:
    why = _check([_record(chain.ca.inter)], chain, names=("mx.other.test",))
    assert why == "certificate names (mx.signed.test) do not match mx.other.test", why
    # any reference identifier will do: a CNAME'd MX host's target or its own name
    assert _check([_record(chain.ca.inter)], chain,
                  names=("mx.provider.test", "mx.signed.test")) == ""


def test_issue15_dane_ta_wildcard_name(ca: TestCA) -> None:
    wild = _chain(ca, ("*.signed.test",))
    assert _check([_record(ca.inter)], wild) == ""
    assert "do not match" in _check([_record(ca.inter)], wild, names=("a.mx.signed.test",))


def test_issue15_dane_ta_expired_or_not_yet_valid(ca: TestCA) -> None:
    expired = _chain(ca, expired=True)
    why = _check([_record(ca.inter)], expired)
    assert why.startswith("certificate CN=mx.signed.test expired on "), why
    early = NOW - datetime.timedelta(days=5)
    why = authenticate([_record(ca.inter)], expired.leaf, expired.sent, ("mx.signed.test",),
                       now=early - datetime.timedelta(days=60))
    assert "is not valid before" in why, why


def test_issue15_dane_ee_ignores_dates_and_names(ca: TestCA) -> None:
    expired = _chain(ca, ("elsewhere.test",), expired=True)
    ee = Tlsa(3, 1, 1, hashlib.sha256(_spki(expired.leaf)).digest())
    assert authenticate([ee], expired.leaf, None, ("mx.signed.test",), now=NOW) == ""


def test_issue15_dane_ta_leaf_not_issued_by_the_anchor(
        ca: TestCA, chain: Chain, tmp_path: Path) -> None:
    """The anchor is in what the server sent, but its certificate was issued by another CA
    (a stolen intermediate appended to a stranger's chain)."""
    other = _chain(TestCA(tmp_path / "other"))
    sent = [*other.sent, _der(ca.inter)]
    why = _check([_record(ca.inter)], other, sent)
    assert why.startswith("its certificate does not chain to the DANE-TA trust anchor "
                          "CN=pymta test intermediate"), why


def test_issue15_dane_ta_does_not_match_the_leaf_itself(chain: Chain) -> None:
    """DANE-TA matches certificates above the server's own (as OpenSSL): a self-issued
    server certificate is published as ``3 x x``."""
    leaf = x509.load_der_x509_certificate(chain.leaf)
    assert "no TLSA record matches" in _check([_record(leaf)], chain)


def test_issue15_dane_ta_issuer_must_be_a_ca(ca: TestCA, tmp_path: Path) -> None:
    """An intermediate without the CA flag (an end-entity certificate of the anchor's)
    cannot issue the server's certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    not_ca = ca._cert(x509.Name.from_rfc4514_string("CN=not a ca"), ca.inter.subject,
                      key.public_key(), ca.inter_key, NOW, 30, ca=False)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf = ca._cert(x509.Name.from_rfc4514_string("CN=mx.signed.test"), not_ca.subject,
                    leaf_key.public_key(), key, NOW, 30, ca=False, names=("mx.signed.test",))
    chain = Chain(ca, _der(leaf), [_der(leaf), _der(not_ca), _der(ca.inter)])
    why = _check([_record(ca.inter)], chain)
    assert why == "certificate CN=not a ca is not a CA certificate but issued another", why


def test_issue15_dane_ta_any_record_of_either_usage_authenticates(chain: Chain) -> None:
    wrong_ee = Tlsa(3, 1, 1, bytes(32))
    wrong_ta = Tlsa(2, 1, 1, bytes(32))
    good_ee = Tlsa(3, 1, 1, hashlib.sha256(_spki(chain.leaf)).digest())
    assert _check([wrong_ee, wrong_ta, _record(chain.ca.inter)], chain) == ""
    assert _check([wrong_ta, good_ee], chain, names=("elsewhere.test",)) == ""
    # the best reason is kept: the anchor matched, the name did not
    why = _check([wrong_ee, _record(chain.ca.inter)], chain, names=("elsewhere.test",))
    assert "do not match elsewhere.test" in why, why


def test_issue15_dane_ta_without_the_chain_says_why(chain: Chain) -> None:
    """A Python that does not expose what the server sent: DANE-TA cannot match, and the
    reason says so; DANE-EE still works."""
    assert presented_chain(object()) is None
    why = authenticate([_record(chain.ca.inter)], chain.leaf, None, ("mx.signed.test",))
    assert "does not expose the certificate chain" in why, why
    assert authenticate([], None, None, ()) == "no certificate presented"
    assert authenticate([Tlsa(3, 1, 1, bytes(32))], chain.leaf, chain.sent, ()) == (
        "no TLSA record matches its certificate")


def test_issue15_dane_ta_presented_chain_reads_both_shapes(chain: Chain) -> None:
    class Certificate:          # 3.10-3.12's _ssl.Certificate: PEM by default
        def __init__(self, der: bytes) -> None:
            self.der = der

        def public_bytes(self) -> str:
            import ssl
            return ssl.DER_cert_to_PEM_cert(self.der)

    class Private:
        def get_unverified_chain(self) -> list[Certificate]:
            return [Certificate(d) for d in chain.sent]

    class Old:                  # ssl.SSLObject of 3.11
        _sslobj = Private()

    class New:                  # 3.13: public, DER bytes
        def get_unverified_chain(self) -> list[bytes]:
            return list(chain.sent)

    assert presented_chain(Old()) == chain.sent
    assert presented_chain(New()) == chain.sent


# ------------------------------------------------------------------- CNAME'd MX hosts


class _Rdata:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


class _Answer(list[Any]):
    def __init__(self, rdata: list[Any], secure: bool, canonical: str) -> None:
        super().__init__(rdata)
        self.response = _Rdata(flags=dns.flags.AD if secure else 0)
        self.canonical_name = canonical


class _FakeDNS:
    """Answers from a dict: (name, type) -> (rdata, AD, canonical name) or an exception."""

    def __init__(self, answers: dict[tuple[str, str], Any]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str]] = []

    async def resolve(self, qname: str, rdtype: str, *, search: bool = False) -> Any:
        self.asked.append((qname, rdtype))
        found = self.answers.get((qname, rdtype))
        if found is None:
            raise dns.resolver.NXDOMAIN()
        if isinstance(found, Exception):
            raise found
        rdata, secure, canonical = found
        if not rdata:
            raise dns.resolver.NoAnswer()
        return _Answer(rdata, secure, canonical)


A = [_Rdata(address="127.0.0.1")]
TA = [_Rdata(usage=2, selector=1, mtype=1, cert=bytes(32))]


def _agent(answers: dict[tuple[str, str], Any]) -> tuple[SMTPRelayAgent, _FakeDNS]:
    fake = _FakeDNS(answers)
    return (SMTPRelayAgent(hostname="client.test", tls_level="dane",
                           resolver=DNSResolver(resolver=fake)), fake)


async def test_issue15_dane_cname_tlsa_at_the_target_first() -> None:
    agent, fake = _agent({
        ("mx.signed.test", "A"): (A, True, "mx.provider.test."),
        ("_25._tcp.mx.provider.test", "TLSA"): (TA, True, "_25._tcp.mx.provider.test."),
        ("_25._tcp.mx.signed.test", "TLSA"): ([_Rdata(usage=3, selector=1, mtype=1,
                                                      cert=bytes(32))], True, ""),
    })
    level, tlsa = await agent._dane("mx.signed.test", 25, True)
    assert level == "dane" and isinstance(tlsa, TlsaSet)
    assert tlsa.base == "mx.provider.test" and tlsa[0].usage == 2
    assert tlsa.names == ("mx.provider.test", "mx.signed.test")
    assert ("_25._tcp.mx.signed.test", "TLSA") not in fake.asked


async def test_issue15_dane_cname_then_at_the_original_name() -> None:
    """Nothing at the target (NXDOMAIN, NODATA or an insecure answer alike): the MX host's
    own name is asked next."""
    for at_target in (None, ([], True, ""), (TA, False, "")):
        answers: dict[tuple[str, str], Any] = {
            ("mx.signed.test", "A"): (A, True, "mx.provider.test."),
            ("_25._tcp.mx.signed.test", "TLSA"): (TA, True, "_25._tcp.mx.signed.test."),
        }
        if at_target is not None:
            answers[("_25._tcp.mx.provider.test", "TLSA")] = at_target
        agent, _fake = _agent(answers)
        level, tlsa = await agent._dane("mx.signed.test", 25, True)
        assert level == "dane" and isinstance(tlsa, TlsaSet), at_target
        assert tlsa.base == "mx.signed.test"
        assert tlsa.names == ("mx.signed.test", "mx.provider.test")


async def test_issue15_dane_cname_insecure_chain_or_no_records_is_may() -> None:
    agent, fake = _agent({("mx.signed.test", "A"): (A, False, "mx.provider.test.")})
    assert await agent._dane("mx.signed.test", 25, True) == ("may", ())
    assert not any(name.startswith("_") for name, _ in fake.asked)
    agent, _fake = _agent({("mx.signed.test", "A"): (A, True, "mx.provider.test.")})
    assert await agent._dane("mx.signed.test", 25, True) == ("may", ())


async def test_issue15_dane_cname_failure_at_the_target_defers() -> None:
    """A SERVFAIL at the target is not "no records": the original name is not asked, the
    host is deferred (an attacker blocking one answer must not choose the other)."""
    agent, fake = _agent({
        ("mx.signed.test", "A"): (A, True, "mx.provider.test."),
        ("_25._tcp.mx.provider.test", "TLSA"): dns.resolver.NoNameservers(),
        ("_25._tcp.mx.signed.test", "TLSA"): (TA, True, ""),
    })
    with pytest.raises(HostFailure) as failed:
        await agent._dane("mx.signed.test", 25, True)
    assert "TLSA lookup error for mx.provider.test:25" in failed.value.reply.text
    assert ("_25._tcp.mx.signed.test", "TLSA") not in fake.asked


async def test_issue15_dane_cname_unusable_set_at_the_target_decides() -> None:
    agent, _fake = _agent({
        ("mx.signed.test", "A"): (A, True, "mx.provider.test."),
        ("_25._tcp.mx.provider.test", "TLSA"): (
            [_Rdata(usage=1, selector=1, mtype=1, cert=bytes(32))], True, ""),
        ("_25._tcp.mx.signed.test", "TLSA"): (TA, True, ""),
    })
    assert await agent._dane("mx.signed.test", 25, True) == ("encrypt", ())
