"""ServerTLS: new certificates reach new handshakes through the base context's SNI
callback, a connection already established keeps going, a bad reload keeps the old
certificate, and the change lines say what changed."""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import threading
from pathlib import Path

import pytest

from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.servertls import ServerTLS, collect, tls_configured
from tests.tlsca import TestCA, acme_json

HOST = "mx.example.com"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


def config(tmp_path: Path, **kw: object) -> Config:
    return Config(hostname=HOST, mail_domain=("example.com",), state_dir=str(tmp_path / "st"),
                  acme_file=str(tmp_path / "acme.json"), **kw)  # type: ignore[arg-type]


class Conn:
    """One TLS connection over a socket pair: the server side in a thread echoes lines."""

    def __init__(self, server_ctx: ssl.SSLContext) -> None:
        a, b = socket.socketpair()
        a.settimeout(10)
        b.settimeout(10)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, args=(server_ctx, b), daemon=True)
        self.thread.start()
        client = ssl.create_default_context()
        client.check_hostname = False
        client.verify_mode = ssl.CERT_NONE
        self.tls = client.wrap_socket(a)       # no server_hostname: no SNI, as with an IP
        der = self.tls.getpeercert(binary_form=True)
        assert der is not None
        from cryptography import x509

        cert = x509.load_der_x509_certificate(der)
        self.subject = cert.subject.rfc4514_string()

    def _serve(self, ctx: ssl.SSLContext, sock: socket.socket) -> None:
        try:
            with ctx.wrap_socket(sock, server_side=True) as tls:
                while data := tls.recv(100):
                    tls.sendall(data)
        except (OSError, ssl.SSLError) as exc:  # pragma: no cover - shown by echo()
            self.error = exc

    def echo(self, data: bytes) -> bytes:
        self.tls.sendall(data)
        return self.tls.recv(100)

    def close(self) -> None:
        self.tls.close()
        self.thread.join(10)


def test_reload_swaps_for_new_connections_only(tmp_path: Path, ca: TestCA,
                                               caplog: pytest.LogCaptureFixture) -> None:
    cert, key = ca.write("a", ("first.example.com", HOST))
    cfg = config(tmp_path, smtpd_tls_cert_file=str(cert), smtpd_tls_key_file=str(key))
    server = ServerTLS.from_config(cfg)
    assert server is not None
    old = Conn(server.context)
    assert old.subject == "CN=first.example.com"
    assert server.reload() == []                          # nothing changed, nothing swapped
    assert server.current is server.context

    new_cert, new_key = ca.issue(("second.example.com", HOST))
    cert.write_bytes(new_cert)
    key.write_bytes(new_key)
    changes = server.reload()
    assert len(changes) == 1
    assert changes[0].startswith("tls: RSA certificate for first.example.com")
    assert "replaced by RSA certificate for second.example.com" in changes[0]
    assert f"from SMTPD_TLS_CERT_FILE {cert}" in changes[0]
    fresh = Conn(server.context)           # the listeners' context never changes ...
    assert fresh.subject == "CN=second.example.com"     # ... what it serves does
    assert old.echo(b"still there") == b"still there"   # the open connection goes on
    assert old.error is None

    # a broken file: ConfigError, the second certificate keeps serving
    key.write_bytes(ca.issue((HOST,))[1])
    with pytest.raises(ConfigError, match="^SMTPD_TLS_KEY_FILE: key does not match"):
        server.reload()
    assert Conn(server.context).subject == "CN=second.example.com"
    for conn in (old, fresh):
        conn.close()


def test_ecdsa_added_and_removed(tmp_path: Path, ca: TestCA) -> None:
    cert, key = ca.write("r", (HOST,))
    ec_cert, ec_key = ca.write("e", (HOST,), "ec")
    cfg = config(tmp_path, smtpd_tls_cert_file=str(cert), smtpd_tls_key_file=str(key))
    server = ServerTLS.from_config(cfg)
    assert server is not None
    both = dataclasses.replace(cfg, smtpd_tls_eccert_file=str(ec_cert),
                               smtpd_tls_eckey_file=str(ec_key))
    added = server.reload(both)
    assert len(added) == 1 and added[0].startswith(f"tls: ECDSA certificate for {HOST} (")
    assert added[0].endswith(f"from SMTPD_TLS_ECCERT_FILE {ec_cert} added")
    removed = server.reload(cfg)
    assert len(removed) == 1 and removed[0].startswith(f"tls: ECDSA certificate for {HOST}")
    assert removed[0].endswith("no longer served")
    assert server.reload(cfg) == []


def test_explicit_files_win_over_acme(tmp_path: Path, ca: TestCA,
                                      caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "acme.json").write_bytes(acme_json([("le", (HOST,), *ca.issue((HOST,), "ec"))]))
    cfg = config(tmp_path)
    assert tls_configured(cfg)                     # the file exists: TLS on
    assert [p.kind for p in collect(cfg, store=False).pairs] == ["ECDSA"]
    cert, key = ca.write("x", (HOST,))
    explicit = dataclasses.replace(cfg, smtpd_tls_cert_file=str(cert),
                                   smtpd_tls_key_file=str(key))
    with caplog.at_level(logging.WARNING, logger="pymta"):
        material = collect(explicit, store=False)
    assert [p.source for p in material.pairs] == [f"SMTPD_TLS_CERT_FILE {cert}"]
    assert "is not used: SMTPD_TLS_* certificate files are set" in caplog.text
    server = ServerTLS.from_config(explicit)
    assert server is not None and not server.watches_acme


def test_acme_without_a_match_stands_in_self_signed(tmp_path: Path, ca: TestCA,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "acme.json").write_bytes(
        acme_json([("le", ("web.other.org",), *ca.issue(("web.other.org",), "ec"))]))
    with caplog.at_level(logging.WARNING, logger="pymta"):
        server = ServerTLS.from_config(config(tmp_path))
    assert server is not None and server.watches_acme
    assert [p.source.split()[0] for p in server.material.pairs] == ["self-signed"]
    assert "holds no certificate for mx.example.com" in caplog.text
    assert not tls_configured(config(tmp_path / "nothing"))


async def test_watch_acme(tmp_path: Path, ca: TestCA, caplog: pytest.LogCaptureFixture) -> None:
    """The poll takes a rewritten file; a broken one is looked at twice (Traefik may have
    been writing it), then logged, and the certificate in use stays."""
    import asyncio

    acme = tmp_path / "acme.json"
    acme.write_bytes(acme_json([("le", (HOST,), *ca.issue((HOST,), "ec"))]))
    server = ServerTLS.from_config(config(tmp_path))
    assert server is not None and server.watches_acme
    before = server.material.pairs[0].fingerprint
    seen: list[list[str]] = []
    task = asyncio.create_task(server.watch_acme(0.02, seen.append))
    try:
        with caplog.at_level(logging.DEBUG, logger="pymta"):
            acme.write_text('{"le": {"Certificates": [')
            for _ in range(200):
                await asyncio.sleep(0.02)
                if "stay as they were" in caplog.text:
                    break
        assert "looking again" in caplog.text and "ACME_FILE: not JSON" in caplog.text
        assert server.material.pairs[0].fingerprint == before and seen == []
        acme.write_bytes(acme_json([("", ("*.example.com",), *ca.issue(("*.example.com",),
                                                                       "ec"))], v1=True))
        for _ in range(200):
            await asyncio.sleep(0.02)
            if seen:
                break
        assert len(seen) == 1 and "replaced by ECDSA certificate for *.example.com" in \
            seen[0][0]
        assert (tmp_path / "st" / "tls" / "acme.crt").read_bytes().startswith(b"-----BEGIN")
    finally:
        task.cancel()
