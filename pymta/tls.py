"""The TLS contexts: the server's for STARTTLS (25, 587) and implicit TLS (465), and the one
client context of every outbound connection (SMTP relay, IMAP for SASL).

As in ``mlan/postfix-amavis``, TLS is on when ``SMTPD_TLS_CERT_FILE``/``SMTPD_TLS_KEY_FILE`` are
given or ``SMTPD_USE_TLS=yes``. With ``SMTPD_USE_TLS=yes`` and no files a self-signed certificate is
generated once into ``<state_dir>/tls/`` and reused at every later start: SMTP clients
encrypt opportunistically without verifying, so a stable self-signed certificate beats none,
and regenerating it at each start would break clients that pin it.

Problems with the files become ConfigError naming the variable, so ``pymta check-config``
and ``serve`` report them as one line.

The client side encrypts opportunistically and verifies nothing (:func:`client_ssl_context`),
the same for the relay and the IMAP check, in one place so they cannot drift apart.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any

from pymta.config.errors import ConfigError
from pymta.config.model import Config

__all__ = ["client_ssl_context", "describe_tls", "selfsigned_paths", "server_ssl_context"]

_VALIDITY = datetime.timedelta(days=3650)


def selfsigned_paths(config: Config) -> tuple[Path, Path]:
    """Where the generated certificate and key live: ``<state_dir>/tls/selfsigned.{crt,key}``."""
    tls_dir = Path(config.state_dir) / "tls"
    return tls_dir / "selfsigned.crt", tls_dir / "selfsigned.key"


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """The server SSLContext, or None when TLS is not configured.

    Raises ConfigError when a file is missing, unreadable, not PEM, the key is encrypted or
    does not match the certificate.
    """
    cert, key = config.smtpd_tls_cert_file, config.smtpd_tls_key_file
    if not (config.smtpd_use_tls or cert or key):
        return None
    if bool(cert) != bool(key):
        missing = "SMTPD_TLS_KEY_FILE" if cert else "SMTPD_TLS_CERT_FILE"
        other = "SMTPD_TLS_CERT_FILE" if cert else "SMTPD_TLS_KEY_FILE"
        raise ConfigError(f"{missing}: not set, but {other} is: {cert or key!r}")
    if cert:
        return _context(cert, key, "SMTPD_TLS_CERT_FILE", "SMTPD_TLS_KEY_FILE")
    cert_path, key_path = ensure_selfsigned(config)
    name = f"self-signed certificate {cert_path} (delete it and its key to regenerate)"
    return _context(str(cert_path), str(key_path), name, name)


def client_ssl_context() -> ssl.SSLContext:
    """The context of pymta's outbound TLS: it encrypts, but checks neither the certificate
    nor the host name. SMTP between MTAs is opportunistic (Postfix's ``may`` and ``encrypt``
    levels verify nothing either: a check an MX cannot pass would only send the mail in the
    clear), and Dovecot's remote-IMAP passdb, which ``SMTPD_SASL_IMAPHOST`` replaces, does
    not verify by default. A new context per call: callers keep theirs for their lifetime.
    Protocol floor and ciphers are Python's defaults (TLS 1.2 and up)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _context(cert: str, key: str, cert_name: str, key_name: str) -> ssl.SSLContext:
    _check_pem(cert, key, cert_name, key_name)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"{key_name}: key does not match the certificate in {cert!r} ({exc}): {key!r}"
        ) from None
    return ctx


def _read(path: str, name: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}: {path!r}") from None


def _check_pem(cert: str, key: str, cert_name: str, key_name: str) -> None:
    """Load both files with cryptography first, so the error says which file is wrong
    (OpenSSL's load_cert_chain reports one error for both)."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert_pem, key_pem = _read(cert, cert_name), _read(key, key_name)
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"{cert_name}: not a PEM certificate: {cert!r}") from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(
            f"{key_name}: the key is encrypted; pymta needs it without a password: {key!r}"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as exc:  # not PEM, or an odd key type
        raise ConfigError(f"{key_name}: not a PEM private key ({exc}): {key!r}") from None


# ------------------------------------------------------------------------------ self-signed


def ensure_selfsigned(config: Config) -> tuple[Path, Path]:
    """Generate the self-signed pair unless it exists; return (cert, key) paths.

    A lock file makes concurrent starts (several workers, or ``serve`` racing ``check-config``)
    agree on one pair: without it two generators could leave one's key with the other's
    certificate. Files are written to temporary names and renamed, the key with mode 0600.
    """
    cert_path, key_path = selfsigned_paths(config)
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    tls_dir = cert_path.parent
    where = f"PYMTA_STATE_DIR: cannot create {tls_dir}"
    try:
        tls_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock_fd = os.open(tls_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}: {config.state_dir!r}") from None
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if not (cert_path.exists() and key_path.exists()):
            cert_pem, key_pem = _generate(config.hostname)
            _write(key_path, key_pem, 0o600)
            _write(cert_path, cert_pem, 0o644)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}: {config.state_dir!r}") from None
    finally:
        os.close(lock_fd)
    return cert_path, key_path


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # O_CREAT's mode is filtered by the umask
    os.replace(tmp, path)


def _generate(hostname: str) -> tuple[bytes, bytes]:
    """An RSA 2048 key and a 10-year certificate for ``hostname`` (CN and SAN).

    RSA rather than EC because some old SMTP clients still offer only RSA suites, and a
    self-signed certificate exists precisely so that every client can encrypt.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname[:64])])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(hostname))
    except ValueError:
        san = x509.DNSName(_ascii_name(hostname))
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # tolerate clients' clock skew
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _ascii_name(hostname: str) -> str:
    """The A-label form a SAN needs (RFC 5280 §4.2.1.6); unchanged when already ASCII."""
    if hostname.isascii():
        return hostname
    try:
        return hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise ConfigError(f"MYHOSTNAME: not usable in a certificate: {hostname!r}") from None


# ------------------------------------------------------------------------------ reporting


def describe_tls(ssl_object: Any) -> str:
    """``version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384 bits=256`` for Received headers and
    logs; accepts an ``ssl.SSLObject`` or ``ssl.SSLSocket`` (anything with version/cipher)."""
    if ssl_object is None:
        return ""
    version = ssl_object.version() or "unknown"
    cipher = ssl_object.cipher()
    if not cipher:
        return f"version={version}"
    return f"version={version} cipher={cipher[0]} bits={cipher[2]}"
