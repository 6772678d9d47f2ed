"""DKIM signing keys: parsing ``DKIM_PRIVATEKEY``, generating keys, the key files in the state
directory and the DNS TXT records to publish. Used by the signer, the ARC sealer and the
``pymta dkim`` command.

Files (``<state dir>/dkim/``, the directory mode 0700, keys 0600):

- ``<domain>.<selector>.key``: the private key, PEM (RSA as PKCS#1 ``RSA PRIVATE KEY``, as
  ``openssl genrsa`` and ``mlan/postfix-amavis``'s amavis write it; ed25519 as PKCS#8
  ``PRIVATE KEY``);
- ``<domain>.<selector>._domainkey.txt``: the record to publish, in zone-file syntax, the
  ``p=`` value split into quoted strings of at most 255 characters.

Which key signs for a domain: ``DKIM_PRIVATEKEY`` when set (one key for every ``MAIL_DOMAIN``,
published under each domain's selector); otherwise the domain's own key file, generated at
first start (``DKIM_ALGORITHM``, ``DKIM_KEYBITS``) when missing. A key file is created with
``link()`` of a finished temporary file, so concurrent workers never see half a key and agree
on one winner.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from pymta.config.errors import ConfigError

if TYPE_CHECKING:
    from pymta.config.model import Config

log = logging.getLogger("pymta.dkim")

ALGORITHMS = ("rsa", "ed25519")
MIN_RSA_BITS = 1024
MAX_RSA_BITS = 8192

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


# ------------------------------------------------------------------------------ parsing


@functools.lru_cache(maxsize=64)
def parse_private_key(text: str | bytes, name: str = "DKIM_PRIVATEKEY") -> PrivateKey:
    """A private key from PEM, or from the bare base64 body without the armour lines (as in
    ``mlan/postfix-amavis``: ``DKIM_PRIVATEKEY="MIIEpAIBAAKCAQEA...``), PKCS#1 or PKCS#8, RSA or
    ed25519.
    Literal ``\\n`` sequences (a PEM squeezed into one environment line) count as newlines.
    Raises ConfigError naming ``name``; the key itself never appears in the message.
    Cached: loading checks an RSA key's consistency (~50 ms for 2048 bits), and the config
    check, the key store and every server of a process read the same text."""
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    text = text.strip().replace("\\n", "\n")
    if not text:
        raise ConfigError(f"{name}: empty")
    key: object
    try:
        if "-----BEGIN" in text:
            key = serialization.load_pem_private_key(text.encode("ascii", "replace"), None)
        else:
            der = base64.b64decode(re.sub(r"\s+", "", text), validate=True)
            key = serialization.load_der_private_key(der, None)
    except TypeError:
        raise ConfigError(f"{name}: the private key is encrypted (give it without a "
                          "passphrase)") from None
    except (ValueError, binascii.Error):
        raise ConfigError(f"{name}: not a PEM (or base64 DER) private key") from None
    except UnsupportedAlgorithm as exc:    # a key type or curve cryptography cannot use
        raise ConfigError(f"{name}: cannot read the private key: "
                          f"{type(exc).__name__}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise ConfigError(f"{name}: RSA key of {key.key_size} bits; DKIM needs "
                              f"{MIN_RSA_BITS} to {MAX_RSA_BITS} (RFC 8301)")
        return key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key
    raise ConfigError(f"{name}: a {type(key).__name__.removeprefix('_')} key; DKIM keys are "
                      "RSA or ed25519")


def key_algorithm(key: PrivateKey) -> str:
    return "ed25519" if isinstance(key, ed25519.Ed25519PrivateKey) else "rsa"


def generate_key(algorithm: str = "rsa", bits: int = 2048) -> PrivateKey:
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm != "rsa":
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}")
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def private_pem(key: PrivateKey) -> bytes:
    fmt = (serialization.PrivateFormat.TraditionalOpenSSL if isinstance(key, rsa.RSAPrivateKey)
           else serialization.PrivateFormat.PKCS8)
    return key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


def public_p(key: PrivateKey) -> str:
    """The ``p=`` value: base64 of the SubjectPublicKeyInfo DER for RSA (RFC 6376 §3.6.1),
    of the raw 32-byte public key for ed25519 (RFC 8463 §4.2)."""
    pub = key.public_key()
    if isinstance(pub, ed25519.Ed25519PublicKey):
        raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = pub.public_bytes(serialization.Encoding.DER,
                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


# ------------------------------------------------------------------------------ one key


@dataclass(frozen=True)
class DkimKey:
    """A signing key for one domain and selector."""

    domain: str
    selector: str
    key: PrivateKey = field(repr=False)

    @property
    def algorithm(self) -> str:
        return key_algorithm(self.key)

    @property
    def signature_algorithm(self) -> bytes:
        return b"ed25519-sha256" if self.algorithm == "ed25519" else b"rsa-sha256"

    @property
    def dkimpy_private(self) -> bytes:
        """The key as dkimpy wants it: PKCS#1 PEM for RSA, base64 of the 32-byte seed for
        ed25519."""
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            raw = self.key.private_bytes(serialization.Encoding.Raw,
                                         serialization.PrivateFormat.Raw,
                                         serialization.NoEncryption())
            return base64.b64encode(raw)
        return private_pem(self.key)

    @property
    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def txt_value(self) -> str:
        """The TXT record's text: ``v=DKIM1; k=rsa; p=...``."""
        return f"v=DKIM1; k={self.algorithm}; p={public_p(self.key)}"

    def zone_line(self) -> str:
        """The record in zone-file syntax, long text split in ≤255-character strings."""
        text = self.txt_value()
        chunks = [text[i:i + 255] for i in range(0, len(text), 255)]
        strings = " ".join(f'"{c}"' for c in chunks)
        if len(chunks) > 1:
            strings = f"( {strings} )"
        return f"{self.record_name}. IN TXT {strings}"


# ------------------------------------------------------------------------------ key store


def key_dir(state_dir: str) -> Path:
    return Path(state_dir) / "dkim"


def key_path(state_dir: str, domain: str, selector: str) -> Path:
    return key_dir(state_dir) / f"{domain}.{selector}.key"


def record_path(state_dir: str, domain: str, selector: str) -> Path:
    return key_dir(state_dir) / f"{domain}.{selector}._domainkey.txt"


def _write_atomic(path: Path, data: bytes, mode: int, *, replace: bool) -> bool:
    """Write ``data`` to ``path`` via a temporary file. Without ``replace`` an existing file
    wins (False is returned and nothing changes)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class KeyStore:
    """Signing keys per domain from the configuration and the state directory."""

    def __init__(self, state_dir: str, selector: str = "default", *, algorithm: str = "rsa",
                 bits: int = 2048, private_key: str = "") -> None:
        self.state_dir = state_dir
        self.selector = selector
        self.algorithm = algorithm
        self.bits = bits
        self.configured: PrivateKey | None = (parse_private_key(private_key)
                                              if private_key else None)
        self._keys: dict[str, DkimKey] = {}

    @staticmethod
    def check_config(config: Config) -> None:
        """Check ``DKIM_PRIVATEKEY`` when it is set (a PEM key, or its base64 body), even with
        signing off; the message never quotes the key. Reads and writes nothing."""
        text = config.dkim_private_key.strip()
        if text:
            parse_private_key(text, "DKIM_PRIVATEKEY")

    @classmethod
    def from_config(cls, config: Config) -> KeyStore:
        return cls(config.state_dir, config.dkim_selector, algorithm=config.dkim_algorithm,
                   bits=config.dkim_keybits, private_key=config.dkim_private_key)

    def get(self, domain: str) -> DkimKey:
        """The key for ``domain``, loading (or generating) it on first use."""
        domain = domain.lower()
        key = self._keys.get(domain)
        if key is None:
            key = self._load(domain)
            self._keys[domain] = key
        return key

    def _load(self, domain: str) -> DkimKey:
        if self.configured is not None:
            key = DkimKey(domain, self.selector, self.configured)
            self._write_record(key)
            return key
        path = key_path(self.state_dir, domain, self.selector)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return self.generate(domain, replace=False)
        return DkimKey(domain, self.selector, parse_private_key(data, str(path)))

    def generate(self, domain: str, *, selector: str | None = None, algorithm: str | None = None,
                 bits: int | None = None, replace: bool = True) -> DkimKey:
        """Make a new key file and its record file; without ``replace`` an existing key file
        (another worker's, just made) is kept and returned."""
        domain = domain.lower()
        selector = selector or self.selector
        algorithm = algorithm or self.algorithm
        bits = bits or self.bits
        new = DkimKey(domain, selector, generate_key(algorithm, bits))
        path = key_path(self.state_dir, domain, selector)
        if _write_atomic(path, private_pem(new.key), 0o600, replace=replace):
            log.log(25, "generated DKIM key %s (%s%s); publish the TXT record in %s", path,
                    algorithm, f" {bits} bits" if algorithm == "rsa" else "",
                    record_path(self.state_dir, domain, selector))
            key = new
        else:
            key = DkimKey(domain, selector, parse_private_key(path.read_bytes(), str(path)))
        self._write_record(key)
        if selector == self.selector:
            self._keys[domain] = key
        return key

    def _write_record(self, key: DkimKey) -> None:
        path = record_path(self.state_dir, key.domain, key.selector)
        line = (key.zone_line() + "\n").encode("ascii")
        try:
            if path.read_bytes() == line:
                return
        except FileNotFoundError:
            pass
        _write_atomic(path, line, 0o644, replace=True)

    def ensure(self, domains: list[str] | tuple[str, ...]) -> list[DkimKey]:
        """Load or generate the key of every domain (at start, so the records exist)."""
        return [self.get(d) for d in domains]
