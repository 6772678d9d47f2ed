"""The self-signed server certificate of ``SMTPD_USE_TLS=yes`` without certificate files:
generated once into ``<state_dir>/tls/`` and reused at every later start. SMTP clients
encrypt opportunistically without verifying, so a stable self-signed certificate beats none,
and regenerating it at each start would break clients that pin it."""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
from pathlib import Path

from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.files import replace_file

__all__ = ["ensure_selfsigned", "selfsigned_paths"]

_VALIDITY = datetime.timedelta(days=3650)


def selfsigned_paths(config: Config) -> tuple[Path, Path]:
    """Where the generated certificate and key live: ``<state_dir>/tls/selfsigned.{crt,key}``."""
    tls_dir = Path(config.state_dir) / "tls"
    return tls_dir / "selfsigned.crt", tls_dir / "selfsigned.key"


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
            replace_file(key_path, key_pem, 0o600)
            replace_file(cert_path, cert_pem, 0o644)
    except OSError as exc:
        raise ConfigError(f"{where}: {exc.strerror or exc}: {config.state_dir!r}") from None
    finally:
        os.close(lock_fd)
    return cert_path, key_path




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
