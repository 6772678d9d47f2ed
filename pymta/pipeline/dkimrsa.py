"""RSA signatures for dkimpy by OpenSSL (``cryptography``) instead of pure Python.

dkimpy signs rsa-sha256 with its own RSA (``dkim.crypto.RSASSA_PKCS1_v1_5_sign``: two Python
``pow`` calls on the key's primes), ~6.7 ms per signature on the machine the benchmarks run
on; every DKIM signature and ARC seal pays it on the event loop's thread pool, and it capped a
forwarded message's relay at ~90 msg/s. OpenSSL does the same RSASSA-PKCS1-v1_5 signature
(deterministic: the bytes are identical) in well under a millisecond.

``install()`` replaces the name dkimpy's signing code calls (``dkim.RSASSA_PKCS1_v1_5_sign``)
with ``sign``, which takes the same arguments (a hashlib object and dkimpy's private-key
dict) and falls back to dkimpy's own function for anything OpenSSL refuses, so a key dkimpy
can use still signs. Verification is left alone: it is one ``pow`` with a small exponent.

The replacement is process-wide (dkimpy has no per-call hook), so it must not change anything
for another user of dkimpy in the same process: RSASSA-PKCS1-v1_5 is deterministic, so
OpenSSL's signature is byte for byte dkimpy's (``tests/unit/test_dkimrsa.py`` compares them),
every case OpenSSL refuses goes to dkimpy's own function (same result, same exception), and
the only state is a cache of loaded keys keyed by their numbers.
"""

from __future__ import annotations

import functools
from typing import Any

import dkim
import dkim.crypto
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_PURE_PYTHON = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {"sha256": hashes.SHA256, "sha1": hashes.SHA1}


@functools.lru_cache(maxsize=64)
def _openssl_key(modulus: int, public_exponent: int, private_exponent: int, prime1: int,
                 prime2: int, exponent1: int, exponent2: int, coefficient: int
                 ) -> rsa.RSAPrivateKey:
    """dkimpy's key numbers as an OpenSSL key; cached: a server signs with a handful of keys."""
    numbers = rsa.RSAPrivateNumbers(
        p=prime1, q=prime2, d=private_exponent, dmp1=exponent1, dmq1=exponent2,
        iqmp=coefficient, public_numbers=rsa.RSAPublicNumbers(public_exponent, modulus))
    return numbers.private_key()


def sign(hash_obj: Any, private_key: dict[str, int]) -> bytes:
    """``RSASSA_PKCS1_v1_5_sign(hash, private_key)`` with dkimpy's arguments and result."""
    algorithm = _HASHES.get(hash_obj.name.lower())
    if algorithm is None:
        return _PURE_PYTHON(hash_obj, private_key)
    try:
        key = _openssl_key(private_key["modulus"], private_key["publicExponent"],
                           private_key["privateExponent"], private_key["prime1"],
                           private_key["prime2"], private_key["exponent1"],
                           private_key["exponent2"], private_key["coefficient"])
        return key.sign(hash_obj.digest(), padding.PKCS1v15(), utils.Prehashed(algorithm()))
    except (KeyError, ValueError, TypeError):
        # A key OpenSSL will not load or too small for the digest: dkimpy decides (and
        # raises its own DigestTooLargeError where that is the reason).
        return _PURE_PYTHON(hash_obj, private_key)


def install() -> None:
    """Make dkimpy's signing (DKIM-Signature, ARC-Seal, ARC-Message-Signature) use ``sign``.
    Idempotent."""
    dkim.RSASSA_PKCS1_v1_5_sign = sign
