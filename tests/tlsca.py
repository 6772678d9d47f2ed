"""A throwaway certificate authority for the TLS tests: a root, an intermediate, and leaf
certificates of any key type issued by the intermediate (so a client trusting only the root
can verify a server only if the server sends the intermediate too)."""

from __future__ import annotations

import base64
import datetime
import json
import warnings
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

PEM = serialization.Encoding.PEM


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_key(kind: str) -> Any:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "dsa":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from cryptography.hazmat.primitives.asymmetric import dsa

            return dsa.generate_private_key(2048)
    raise ValueError(kind)


def key_pem(key: Any) -> bytes:
    return key.private_bytes(PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """Root and intermediate (EC P-256: fast); ``issue`` makes leaves."""

    __test__ = False    # not a pytest class

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = self._cert(_name("pymta test root"), _name("pymta test root"),
                               self.root_key.public_key(), self.root_key, now, 30, ca=True)
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = self._cert(_name("pymta test intermediate"), self.root.subject,
                                self.inter_key.public_key(), self.root_key, now, 30, ca=True)
        self.root_file = self.dir / "root.pem"
        self.root_file.write_bytes(self.root.public_bytes(PEM))

    @staticmethod
    def _cert(subject: x509.Name, issuer: x509.Name, public: Any, signer: Any,
              start: datetime.datetime, days: int, *, ca: bool,
              names: tuple[str, ...] = ()) -> x509.Certificate:
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                   .public_key(public).serial_number(x509.random_serial_number())
                   .not_valid_before(start - datetime.timedelta(days=1))
                   .not_valid_after(start + datetime.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None),
                                  critical=True))
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def issue(self, names: tuple[str, ...], kind: str = "rsa", *, days: int = 30,
              expired: bool = False, key: Any = None) -> tuple[bytes, bytes]:
        """(leaf + intermediate PEM, key PEM) for ``names`` (the first is the CN)."""
        key = key if key is not None else new_key(kind)
        start = datetime.datetime.now(datetime.UTC)
        if expired:
            start -= datetime.timedelta(days=days + 10)
        leaf = self._cert(_name(names[0]), self.inter.subject, key.public_key(),
                          self.inter_key, start, days, ca=False, names=names)
        return leaf.public_bytes(PEM) + self.inter.public_bytes(PEM), key_pem(key)

    def write(self, stem: str, names: tuple[str, ...], kind: str = "rsa",
              **kw: Any) -> tuple[Path, Path]:
        cert, key = self.issue(names, kind, **kw)
        cert_path, key_path = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cert_path.write_bytes(cert)
        key_path.write_bytes(key)
        return cert_path, key_path


def acme_json(entries: list[tuple[str, tuple[str, ...], bytes, bytes]], *,
              v1: bool = False) -> bytes:
    """Traefik's acme.json: entries are (resolver, (main, *sans), cert PEM, key PEM); the v1
    layout ignores the resolver names (one store)."""
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    if v1:
        return json.dumps({
            "Account": {"Email": "admin@example.com"},
            "Certificates": [{"Domain": {"Main": names[0], "SANs": list(names[1:])},
                              "Certificate": b64(cert), "Key": b64(key)}
                             for _, names, cert, key in entries],
            "HTTPChallenge": {}}).encode()
    doc: dict[str, Any] = {}
    for resolver, names, cert, key in entries:
        store = doc.setdefault(resolver, {"Account": {"Email": "admin@example.com"},
                                          "Certificates": []})
        store["Certificates"].append({"domain": {"main": names[0], "sans": list(names[1:])},
                                      "certificate": b64(cert), "key": b64(key),
                                      "Store": "default"})
    return json.dumps(doc, indent=2).encode()


def leaf_subject(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificates(cert_pem)[0]
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
