"""dkimpy's RSA signing done by OpenSSL: the same bytes, and signatures that verify."""

from __future__ import annotations

import base64
import hashlib

import dkim
import dkim.crypto
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

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


def test_installed_signer_makes_signatures_that_verify(key_pem: bytes,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dkim, "RSASSA_PKCS1_v1_5_sign", dkim.RSASSA_PKCS1_v1_5_sign)
    dkimrsa.install()
    assert dkim.RSASSA_PKCS1_v1_5_sign is dkimrsa.sign
    public = serialization.load_pem_private_key(key_pem, None).public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    message = (b"From: alice@example.com\r\nTo: bob@example.net\r\nSubject: hi\r\n\r\n"
               b"body\r\n")
    signature = dkim.sign(message, b"sel", b"example.com", key_pem,
                          canonicalize=(b"relaxed", b"relaxed"), linesep=b"\r\n")

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"sel._domainkey.example.com." else None

    assert dkim.verify(signature + message, dnsfunc=dns)
    assert not dkim.verify(signature + message.replace(b"body", b"b0dy"), dnsfunc=dns)
