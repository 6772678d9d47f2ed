"""RSA for dkimpy by OpenSSL (``cryptography``) instead of pure Python, and parsed keys kept.

dkimpy signs rsa-sha256 with its own RSA (``dkim.crypto.RSASSA_PKCS1_v1_5_sign``: two Python
``pow`` calls on the key's primes), ~6.7 ms per signature on the machine the benchmarks run
on; every DKIM signature and ARC seal pays it on the event loop's thread pool, and it capped a
forwarded message's relay at ~90 msg/s. OpenSSL does the same RSASSA-PKCS1-v1_5 signature
(deterministic: the bytes are identical) in well under a millisecond.

``install()`` replaces the name dkimpy's signing code calls (``dkim.RSASSA_PKCS1_v1_5_sign``)
with ``sign``, which takes the same arguments (a hashlib object and dkimpy's private-key
dict) and falls back to dkimpy's own function for anything OpenSSL refuses, so a key dkimpy
can use still signs.

Verification (issue 14: DKIM verify, ARC and DMARC together took the accept rate to 0.54× of
the rate without them) spent 458 µs per signed 4 KiB message in dkimpy, of which ~140 µs in
Python's ``pow`` (the public-key operation), ~160 µs in dkimpy's byte-at-a-time integer
conversions around it, and ~80 µs in its pure-Python ASN.1 parse of the same DNS key record
for every message. ``verify`` replaces ``dkim.RSASSA_PKCS1_v1_5_verify``: OpenSSL's public
operation (``recover_data_from_signature``: the DigestInfo inside the PKCS#1 v1.5 padding,
compared with the one dkimpy builds, so exactly dkimpy's acceptance rule: a signature
verifies iff s^e mod n equals dkimpy's encoding); a signature whose integer is not below
the modulus (which OpenSSL refuses and dkimpy reduces), or a key or digest OpenSSL will not
take, goes to :func:`pure_verify`, dkimpy's arithmetic with ``int.from_bytes`` instead of its
byte loops. ``evaluate_pk`` (the record's tags and ASN.1) is kept per record text in a small
LRU (records up to :data:`MAX_CACHED_RECORD` bytes), and each caller gets its own copy of the
key dict: a record that changes in DNS is a new entry, and failures are not kept. Verifying
a signed 4 KiB message (``dkimverify.verify_all``, distinct messages, one core): 458 µs
before, 185 µs with this and :mod:`.dkimverify`'s kept tag lists and compiled patterns.

The replacement is process-wide (dkimpy has no per-call hook), so it must not change anything
for another user of dkimpy in the same process: RSASSA-PKCS1-v1_5 is deterministic, so
OpenSSL's signature is byte for byte dkimpy's (``tests/unit/test_dkimrsa.py`` compares them),
every case OpenSSL refuses goes to dkimpy's own function (same result, same exception), and
the only state is caches of loaded keys keyed by their numbers and of parsed records keyed by
their text.
"""

from __future__ import annotations

import functools
from typing import Any

import dkim
import dkim.crypto
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

_PURE_PYTHON = dkim.crypto.RSASSA_PKCS1_v1_5_sign
_EVALUATE_PK = dkim.evaluate_pk
#: Key records longer than this are parsed every time instead of kept (bounds the cache's
#: memory whatever a DNS answer holds: 256 entries of at most 8 KiB).
MAX_CACHED_RECORD = 8192
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


@functools.lru_cache(maxsize=256)
def _openssl_public_key(modulus: int, public_exponent: int) -> rsa.RSAPublicKey:
    """A DNS key's numbers as an OpenSSL key; cached: mail comes from a few thousand keys."""
    return rsa.RSAPublicNumbers(public_exponent, modulus).public_key()


def pure_verify(hash_obj: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """dkimpy's ``RSASSA_PKCS1_v1_5_verify`` with the same arithmetic, results and
    exceptions, its integer conversions done by ``int.from_bytes``/``to_bytes``."""
    modulus = public_key["modulus"]
    modlen = max(1, (modulus.bit_length() + 7) // 8)       # len(dkimpy's int2str(modulus))
    encoded = dkim.crypto.EMSA_PKCS1_v1_5_encode(hash_obj, modlen)
    value = pow(int.from_bytes(signature, "big"), public_key["publicExponent"], modulus)
    return encoded == value.to_bytes(modlen, "big")


_DIGEST_INFO_PREFIXES: dict[str, bytes] = {}
# Keys whose public operation OpenSSL performs (it refuses an exponent over 64 bits with a
# modulus over 3,072 bits, and moduli over 16,384 bits, answering "invalid signature"); the
# rest are left to dkimpy's arithmetic, which has no such limits.
_OPENSSL_MODULUS_BITS = (512, 16384)
_OPENSSL_EXPONENT_BITS = 32


def _digest_info(hash_obj: Any, modlen: int) -> bytes:
    """The DigestInfo dkimpy's ``EMSA_PKCS1_v1_5_encode`` puts in the padding (its DER
    prefix built once per algorithm, not per signature), with its ``DigestTooLargeError``."""
    name = hash_obj.name.lower()
    prefix = _DIGEST_INFO_PREFIXES.get(name)
    digest = hash_obj.digest()
    if prefix is None:
        encoded = dkim.crypto.EMSA_PKCS1_v1_5_encode(hash_obj, modlen)  # raises as dkimpy's
        digest_info = encoded[encoded.index(b"\x00", 2) + 1:]
        _DIGEST_INFO_PREFIXES[name] = digest_info[:-len(digest)]
        return digest_info
    digest_info = prefix + digest
    if len(digest_info) + 11 > modlen:
        raise dkim.crypto.DigestTooLargeError()
    return digest_info


def verify(hash_obj: Any, signature: bytes, public_key: dict[str, int]) -> bool:
    """``RSASSA_PKCS1_v1_5_verify(hash, signature, public_key)`` with dkimpy's arguments,
    result and exceptions (``DigestTooLargeError`` from its encoding)."""
    modulus = public_key["modulus"]
    modlen = max(1, (modulus.bit_length() + 7) // 8)
    digest_info = _digest_info(hash_obj, modlen)
    if (len(signature) != modlen or int.from_bytes(signature, "big") >= modulus
            or not _OPENSSL_MODULUS_BITS[0] <= modulus.bit_length() <= _OPENSSL_MODULUS_BITS[1]
            or public_key["publicExponent"].bit_length() > _OPENSSL_EXPONENT_BITS):
        return pure_verify(hash_obj, signature, public_key)
    try:
        key = _openssl_public_key(modulus, public_key["publicExponent"])
    except (ValueError, TypeError):
        return pure_verify(hash_obj, signature, public_key)
    try:
        recovered = key.recover_data_from_signature(bytes(signature), padding.PKCS1v15(), None)
    except InvalidSignature:    # not a PKCS#1 v1.5 type 1 block: dkimpy's encoding is one
        return False
    # a type 1 block of modlen bytes whose data is dkimpy's DigestInfo has exactly dkimpy's
    # padding length, so this is dkimpy's comparison of the whole encoded message
    return recovered == digest_info


def evaluate_pk(name: Any, s: Any) -> tuple[Any, Any, Any, bool]:
    """dkimpy's ``evaluate_pk(name, record)``, the parse of a record kept (see the module
    docstring). Same results and exceptions; the key dict is the caller's own copy."""
    if (type(s) not in (bytes, str) or type(name) not in (bytes, str) or not s
            or len(s) > MAX_CACHED_RECORD):
        return _EVALUATE_PK(name, s)
    pk, keysize, ktag, seqtlsrpt = _evaluate_cached(name, s)
    return (dict(pk) if isinstance(pk, dict) else pk), keysize, ktag, seqtlsrpt


@functools.lru_cache(maxsize=256)
def _evaluate_cached(name: Any, s: bytes | str) -> tuple[Any, Any, Any, bool]:
    return _EVALUATE_PK(name, s)


def install() -> None:
    """Make dkimpy's signing (DKIM-Signature, ARC-Seal, ARC-Message-Signature) use ``sign``,
    its verification ``verify`` and its key records :func:`evaluate_pk`. Idempotent."""
    dkim.RSASSA_PKCS1_v1_5_sign = sign
    dkim.RSASSA_PKCS1_v1_5_verify = verify
    dkim.evaluate_pk = evaluate_pk
