"""The server's certificates as the image takes them: read, checked and loaded into one
SSLContext.

Sources, as in ``mlan/postfix-amavis`` (Postfix's parameters of the same names):
``SMTPD_TLS_CERT_FILE``/``KEY_FILE`` (RSA), ``SMTPD_TLS_ECCERT_FILE``/``ECKEY_FILE`` (ECDSA),
``SMTPD_TLS_DCERT_FILE``/``DKEY_FILE`` (DSA) and ``SMTPD_TLS_CHAIN_FILES`` (files read in
order, each private key followed by its certificate chain, leaf first; a key and its chain may
also be split over two files listed one after the other). A certificate file may hold the
intermediate certificates after the leaf: they are sent to clients.

OpenSSL keeps one certificate per key type in a context and picks, per handshake, the one
the client's signature algorithms and ciphers allow, so RSA and ECDSA certificates are all
loaded into the same context. DSA is the exception: OpenSSL 3 negotiates DSA only at security
level 0 (measured with OpenSSL 3.0: ``no shared cipher`` at level 1 and up, for Python and
for ``openssl s_server`` alike), and level 0 would weaken every other handshake too; so a DSA
pair is checked like the others and then left out, with one warning.

Every file is read and checked here with ``cryptography`` first (PEM, not encrypted, the key
matches its certificate, not expired), so each problem is a ConfigError naming the variable;
OpenSSL then loads the same bytes (through a private temporary directory: its API wants file
names), so what was checked is what is served.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import ssl
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

from cryptography.utils import CryptographyDeprecationWarning

from pymta.config.errors import ConfigError

log = logging.getLogger("pymta")

__all__ = ["CertPair", "build_context", "check_dh_params", "pairs_from_chain_files",
           "pair_from_pem", "read_file"]

# cryptography warns on every use of a DSA key or of finite-field DH parameters that they are
# deprecated. The image's variables name such files, the warnings would break the CLI's
# one-line messages, and what pymta does with them is said in its own words (a DSA pair is
# not served). One filter for this module, set once: thread-safe, unlike catch_warnings.
warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning,
                        module=r"pymta\.tlscerts$")

_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----\r?\n?",
                        re.DOTALL)


@dataclasses.dataclass(frozen=True)
class CertPair:
    """One private key and its certificate chain (leaf first), checked.

    ``source`` says where it came from for messages and logs (``SMTPD_TLS_CERT_FILE
    /etc/ssl/mx.pem``, ``ACME_FILE /acme/acme.json``); ``variable`` is the variable a
    problem with it is reported under."""

    kind: str                  # "RSA", "ECDSA", "DSA", "Ed25519", "Ed448"
    cert_pem: bytes            # leaf then intermediates
    key_pem: bytes
    source: str
    variable: str
    names: tuple[str, ...]     # subject alternative names (DNS), else the common name
    not_after: datetime.datetime
    fingerprint: str           # SHA-256 of the leaf, hex

    def describe(self) -> str:
        """``RSA certificate for mx.example.com (expires 2027-03-01, sha256 1a2b3c4d)``."""
        names = ", ".join(self.names) or "no name"
        return (f"{self.kind} certificate for {names} (expires "
                f"{self.not_after:%Y-%m-%d}, sha256 {self.fingerprint[:8]})")

    @property
    def chain_length(self) -> int:
        return len(_PEM_BLOCK.findall(self.cert_pem))


def read_file(path: str, variable: str) -> bytes:
    """The file's bytes; ConfigError naming ``variable`` when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{variable}: cannot read: {exc.strerror or exc}: {path!r}") from None


def pair_from_pem(cert_pem: bytes, key_pem: bytes, *, cert_variable: str, key_variable: str,
                  cert_where: str, key_where: str, source: str,
                  now: datetime.datetime | None = None) -> CertPair:
    """Check one key and certificate chain given as PEM bytes.

    ``*_where`` name the file (or entry) in messages. Raises ConfigError starting with the
    variable when the certificate is not PEM, the key is not PEM or encrypted, the key does
    not match the first certificate, or that certificate has expired."""
    return _pair_from_pem(cert_pem, key_pem, cert_variable=cert_variable,
                          key_variable=key_variable, cert_where=cert_where,
                          key_where=key_where, source=source, now=now)


def _pair_from_pem(cert_pem: bytes, key_pem: bytes, *, cert_variable: str, key_variable: str,
                   cert_where: str, key_where: str, source: str,
                   now: datetime.datetime | None) -> CertPair:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization

    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"{cert_variable}: not a PEM certificate: {cert_where}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"{key_variable}: the key is encrypted; pymta needs it without a "
                          f"password: {key_where}") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{key_variable}: not a PEM private key ({_first_line(exc)}): "
                          f"{key_where}") from None
    leaf = certs[0]
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    try:
        matches = (leaf.public_key().public_bytes(der, spki)
                   == key.public_key().public_bytes(der, spki))
    except (ValueError, UnsupportedAlgorithm):
        matches = False
    if not matches:
        raise ConfigError(f"{key_variable}: key does not match the certificate in "
                          f"{cert_where}: {key_where}")
    now = now or datetime.datetime.now(datetime.UTC)
    not_after = leaf.not_valid_after_utc
    if not_after < now:
        raise ConfigError(f"{cert_variable}: the certificate expired on "
                          f"{not_after:%Y-%m-%d %H:%M} UTC: {cert_where}")
    # What OpenSSL will load: the PEM certificates alone, leaf first (no keys, no text)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)
    key_only = key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return CertPair(kind=_kind(key), cert_pem=chain, key_pem=key_only, source=source,
                    variable=cert_variable, names=_names(leaf), not_after=not_after,
                    fingerprint=leaf.fingerprint(hashes.SHA256()).hex())


def pairs_from_chain_files(paths: Sequence[str], variable: str = "SMTPD_TLS_CHAIN_FILES",
                           ) -> list[CertPair]:
    """Postfix's ``smtpd_tls_chain_files``: the PEM objects of all files in order; each
    private key starts a pair and the certificates after it are its chain (leaf first)."""
    groups: list[tuple[bytes, list[bytes], str]] = []
    for path in paths:
        data = read_file(path, variable)
        blocks = list(_PEM_BLOCK.finditer(data))
        if not blocks:
            raise ConfigError(f"{variable}: no PEM key or certificate in {path!r}")
        for block in blocks:
            label = block.group(1).decode("ascii")
            if label.endswith("PRIVATE KEY"):
                groups.append((block.group(0), [], path))
            elif label == "CERTIFICATE":
                if not groups:
                    raise ConfigError(f"{variable}: a certificate comes before any private "
                                      f"key in {path!r} (each key must precede its chain)")
                groups[-1][1].append(block.group(0))
            else:
                raise ConfigError(f"{variable}: unexpected PEM object {label!r} in {path!r}")
    pairs = []
    for key_pem, certs, path in groups:
        if not certs:
            raise ConfigError(f"{variable}: a private key without its certificate in {path!r}")
        pairs.append(pair_from_pem(b"".join(certs), key_pem, cert_variable=variable,
                                   key_variable=variable, cert_where=repr(path),
                                   key_where=repr(path), source=f"{variable} {path}"))
    return pairs


def check_dh_params(path: str, variable: str) -> bytes:
    """The DH parameter file's bytes, checked to be PEM DH parameters."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_pem_parameters

    data = read_file(path, variable)
    try:
        load_pem_parameters(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{variable}: not PEM DH parameters ({_first_line(exc)}): "
                          f"{path!r}") from None
    return data


def build_context(pairs: Sequence[CertPair], dh_params: tuple[bytes, str] | None = None,
                  ) -> ssl.SSLContext:
    """A server context serving every pair (one per key type) and the DH parameters
    (``(pem, variable)``). TLS 1.2 minimum, no compression, no renegotiation."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    with tempfile.TemporaryDirectory(prefix="pymta-tls-") as tmp:  # mode 0700
        for i, pair in enumerate(pairs):
            cert_path = _write_private(tmp, f"{i}.crt", pair.cert_pem)
            key_path = _write_private(tmp, f"{i}.key", pair.key_pem)
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                raise ConfigError(f"{pair.variable}: OpenSSL cannot use the {pair.kind} "
                                  f"certificate ({exc.reason or exc}): {pair.source}") from None
        if dh_params is not None:
            data, variable = dh_params
            path = _write_private(tmp, "dh.pem", data)
            try:
                ctx.load_dh_params(path)
            except ssl.SSLError as exc:
                raise ConfigError(f"{variable}: OpenSSL refuses these DH parameters "
                                  f"({exc.reason or exc}; 2048 bits or more are needed)"
                                  ) from None
    return ctx


def _write_private(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def _kind(key: Any) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    for cls, name in ((rsa.RSAPrivateKey, "RSA"), (ec.EllipticCurvePrivateKey, "ECDSA"),
                      (ed25519.Ed25519PrivateKey, "Ed25519"), (ed448.Ed448PrivateKey, "Ed448")):
        if isinstance(key, cls):
            return name
    from cryptography.hazmat.primitives.asymmetric import dsa

    if isinstance(key, dsa.DSAPrivateKey):
        return "DSA"
    return type(key).__name__


def _names(cert: Any) -> tuple[str, ...]:
    """The certificate's DNS names (SAN), else its common name."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(str(n).lower() for n in san.value.get_values_for_type(x509.DNSName))
    except (x509.ExtensionNotFound, ValueError):
        names = ()
    if names:
        return names
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        return ()
    return tuple(str(a.value).lower() for a in cns)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
