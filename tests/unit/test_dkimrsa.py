"""dkimpy's RSA done by OpenSSL: the same signatures, the same verdicts, key records kept."""

from __future__ import annotations

import base64
import hashlib
import math

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.pipeline import dkimrsa


@pytest.fixture(scope="module")
def key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_same_signature_as_dkimpy(key_pem: bytes, algorithm: str) -> None:
    pk = dkim.crypto.parse_pem_private_key(key_pem)
    for data in (b"", b"hello", b"x" * 10000):
        digest = hashlib.new(algorithm, data)
        assert dkimrsa.sign(digest, pk) == dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, pk)


def test_a_key_openssl_refuses_is_left_to_dkimpy(key_pem: bytes) -> None:
    pk = dict(dkim.crypto.parse_pem_private_key(key_pem))
    pk["coefficient"] += 1          # inconsistent numbers: OpenSSL will not load them
    digest = hashlib.sha256(b"hello")
    assert dkimrsa.sign(digest, pk) == dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, pk)


# ------------------------------------------------------------------------------ verification

_PURE_VERIFY = dkim.crypto.RSASSA_PKCS1_v1_5_verify
_PURE_EVALUATE = dkimrsa._EVALUATE_PK


def _public(key_pem: bytes) -> dict[str, int]:
    pk = dkim.crypto.parse_pem_private_key(key_pem)
    return {"modulus": pk["modulus"], "publicExponent": pk["publicExponent"]}


def _signature(key_pem: bytes, digest: object) -> bytes:
    return dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, dkim.crypto.parse_pem_private_key(key_pem))


@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_verify_gives_dkimpys_verdicts(key_pem: bytes, algorithm: str) -> None:
    public = _public(key_pem)
    digest = hashlib.new(algorithm, b"the signed headers")
    good = _signature(key_pem, digest)
    modulus = public["modulus"]
    as_int = int.from_bytes(good, "big")
    candidates = [
        good,
        bytes([good[0] ^ 1]) + good[1:],                   # tampered
        good[:-1],                                          # one byte short
        b"\x00" + good,                                     # one byte long, same integer
        good.lstrip(b"\x00") or b"\x00",
        (as_int + modulus).to_bytes(len(good) + 1, "big"),   # s + n: dkimpy reduces it
        (modulus - 1).to_bytes(len(good), "big"),
        modulus.to_bytes(len(good), "big"),
        b"\xff" * len(good),
        b"",
    ]
    if as_int + modulus < 256 ** len(good):
        candidates.append((as_int + modulus).to_bytes(len(good), "big"))
    for signature in candidates:
        for d in (digest, hashlib.new(algorithm, b"other headers")):
            assert dkimrsa.verify(d, signature, public) == _PURE_VERIFY(d, signature, public)
            assert dkimrsa.pure_verify(d, signature, public) == _PURE_VERIFY(d, signature,
                                                                            public)
    assert dkimrsa.verify(digest, good, public)


@given(signature=st.one_of(st.binary(min_size=256, max_size=256), st.binary(max_size=300)))
@settings(max_examples=200, deadline=None)
def test_verify_of_random_signatures_is_dkimpys(signature: bytes) -> None:
    public = {"modulus": _RANDOM_MODULUS, "publicExponent": 65537}
    digest = hashlib.sha256(b"x")
    assert dkimrsa.verify(digest, signature, public) == _PURE_VERIFY(digest, signature, public)


# an odd 2048-bit number OpenSSL loads as a modulus (not a product of two primes: the
# comparison is of arithmetic, not of RSA's security)
_RANDOM_MODULUS = int.from_bytes(hashlib.sha512(b"modulus").digest() * 4, "big") | 1 | (1 << 2047)


def test_verify_raises_what_dkimpy_raises_for_a_key_too_small() -> None:
    public = {"modulus": (1 << 383) | 1, "publicExponent": 65537}      # 48 bytes < 62
    digest = hashlib.sha256(b"x")
    with pytest.raises(dkim.crypto.DigestTooLargeError):
        _PURE_VERIFY(digest, b"\x01" * 48, public)
    with pytest.raises(dkim.crypto.DigestTooLargeError):
        dkimrsa.verify(digest, b"\x01" * 48, public)


def test_a_public_key_openssl_refuses_is_left_to_dkimpys_arithmetic() -> None:
    public = {"modulus": 1 << 2047, "publicExponent": 65537}           # even: OpenSSL refuses
    digest = hashlib.sha256(b"x")
    for signature in (b"\x01" * 256, b"\x00" * 256):
        assert dkimrsa.verify(digest, signature, public) == _PURE_VERIFY(digest, signature,
                                                                        public)


def _record(key_pem: bytes) -> bytes:
    public = serialization.load_pem_private_key(key_pem, None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)


def test_evaluate_pk_kept_gives_dkimpys_result_and_a_copy_per_caller(key_pem: bytes) -> None:
    record = _record(key_pem)
    expected = _PURE_EVALUATE(b"s._domainkey.example.com.", record)
    first = dkimrsa.evaluate_pk(b"s._domainkey.example.com.", record)
    assert first == expected
    first[0]["modulus"] = 3                 # a caller that changes its key dict
    assert dkimrsa.evaluate_pk(b"s._domainkey.example.com.", record) == expected


@pytest.mark.parametrize("record", [b"", b"v=DKIM1; k=rsa; p=AAAA", b"v=DKIM2; p=x",
                                    b"k=rsa; p=" + b"A" * 9000, b"p=; x", b"k=foo; p=AAAA"])
def test_evaluate_pk_raises_what_dkimpy_raises_every_time(record: bytes) -> None:
    name = b"s._domainkey.example.com."
    try:
        expected: object = _PURE_EVALUATE(name, record)
    except Exception as exc:  # noqa: BLE001 - whatever dkimpy raises, we must too
        expected = type(exc)
    for _ in range(2):          # a failure is not kept: the second call raises again
        try:
            got: object = dkimrsa.evaluate_pk(name, record)
        except Exception as exc:  # noqa: BLE001
            got = type(exc)
        assert got == expected


def test_installed_functions_sign_and_verify_dkim_signatures(
        key_pem: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RSASSA_PKCS1_v1_5_sign", "RSASSA_PKCS1_v1_5_verify", "evaluate_pk"):
        monkeypatch.setattr(dkim, name, getattr(dkim, name))
    dkimrsa.install()
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkimrsa.sign
    assert dkim.RSASSA_PKCS1_v1_5_verify is dkimrsa.verify
    assert dkim.evaluate_pk is dkimrsa.evaluate_pk
    record = _record(key_pem)
    message = (b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\n"
               b"body\r\n")
    signature = dkim.sign(message, b"sel", b"example.com", key_pem,
                          canonicalize=(b"relaxed", b"relaxed"), linesep=b"\r\n")

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"sel._domainkey.example.com." else None

    for _ in range(2):      # the second time from the kept key
        assert dkim.verify(signature + message, dnsfunc=dns)
        assert not dkim.verify(signature + message.replace(b"hi", b"h1"), dnsfunc=dns)
        assert not dkim.verify(signature + message.replace(b"body", b"b0dy"), dnsfunc=dns)


def test_review_keys_openssl_cannot_take_are_verified_by_dkimpys_arithmetic() -> None:
    """A 4,096-bit key with a 71-bit public exponent: OpenSSL refuses the operation (it
    answered "invalid signature"); dkimpy verifies it, and so must we."""
    base = rsa.generate_private_key(public_exponent=65537, key_size=4096).private_numbers()
    p, q = base.p, base.q
    lam = (p - 1) * (q - 1) // math.gcd(p - 1, q - 1)
    e = (1 << 70) + 1
    while math.gcd(e, lam) != 1:
        e += 2
    d = pow(e, -1, lam)
    private = {"modulus": p * q, "publicExponent": e, "privateExponent": d, "prime1": p,
               "prime2": q, "exponent1": d % (p - 1), "exponent2": d % (q - 1),
               "coefficient": pow(q, -1, p)}
    public = {"modulus": p * q, "publicExponent": e}
    digest = hashlib.sha256(b"signed headers")
    signature = bytes(dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, private))
    assert _PURE_VERIFY(digest, signature, public)
    assert dkimrsa.verify(digest, signature, public)
    assert not dkimrsa.verify(hashlib.sha256(b"other"), signature, public)


def test_review_evaluate_pk_with_a_name_it_cannot_keep_is_dkimpys(key_pem: bytes) -> None:
    record = _record(key_pem)
    name = bytearray(b"s._domainkey.example.com.")
    assert dkimrsa.evaluate_pk(name, record) == _PURE_EVALUATE(name, record)
