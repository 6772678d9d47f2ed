"""server_ssl_context: off by default, self-signed generated once and reused, given files
loaded with errors that name the variable, and a real handshake over a socket pair; the one
client context (relay, IMAP) encrypts to peers it cannot verify."""

from __future__ import annotations

import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest

from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.tls import client_ssl_context, describe_tls, selfsigned_paths, server_ssl_context

HOST = "mx.example.com"


def config(tmp_path: Path, **kw: object) -> Config:
    return Config(hostname=HOST, mail_domain=("example.com",), state_dir=str(tmp_path), **kw)


def handshake(server_ctx: ssl.SSLContext, cafile: str | None = None, *,
              client_ctx: ssl.SSLContext | None = None, server_hostname: str = HOST) -> str:
    """TLS over a socketpair, by default with a client verifying against ``cafile``;
    returns describe_tls of the server."""
    if client_ctx is None:
        client_ctx = ssl.create_default_context(cafile=cafile)
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    result: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True) as tls:
                result["server"] = describe_tls(tls)
                tls.sendall(tls.recv(5))
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - shown by the assertion below
            result["error"] = exc

    thread = threading.Thread(target=serve)
    thread.start()
    with client_ctx.wrap_socket(a, server_hostname=server_hostname) as tls:
        tls.sendall(b"hello")
        assert tls.recv(5) == b"hello"
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
    thread.join(10)
    assert "error" not in result, result.get("error")
    return str(result["server"])


def test_off_by_default(tmp_path: Path) -> None:
    assert server_ssl_context(config(tmp_path)) is None
    assert not (tmp_path / "tls").exists()


def test_selfsigned_generated_once_and_reused(tmp_path: Path) -> None:
    cfg = config(tmp_path, smtpd_use_tls=True)
    ctx = server_ssl_context(cfg)
    assert ctx is not None
    cert, key = selfsigned_paths(cfg)
    assert cert == tmp_path / "tls" / "selfsigned.crt"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    first = (cert.read_bytes(), key.read_bytes())

    assert server_ssl_context(cfg) is not None
    assert (cert.read_bytes(), key.read_bytes()) == first  # reused, not regenerated

    described = handshake(ctx, str(cert))
    assert described.startswith("version=TLSv1.")
    assert " cipher=" in described and " bits=" in described


def test_selfsigned_names_the_host(tmp_path: Path) -> None:
    from cryptography import x509

    cfg = config(tmp_path, smtpd_use_tls=True)
    server_ssl_context(cfg)
    cert = x509.load_pem_x509_certificate(selfsigned_paths(cfg)[0].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [HOST]
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == HOST
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert life.days >= 3650


def test_client_context_encrypts_to_a_peer_it_cannot_verify(tmp_path: Path) -> None:
    """Outbound TLS is opportunistic (Postfix's may/encrypt, Dovecot's remote-IMAP passdb):
    a self-signed certificate for another name still gets an encrypted connection, where a
    verifying client refuses it."""
    cfg = config(tmp_path, smtpd_use_tls=True)
    server = server_ssl_context(cfg)
    assert server is not None
    described = handshake(server, client_ctx=client_ssl_context(),
                          server_hostname="other.example.net")
    assert described.startswith("version=TLSv1.")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(server, client_ctx=ssl.create_default_context(),
                  server_hostname="other.example.net")


def test_minimum_tls_version(tmp_path: Path) -> None:
    ctx = server_ssl_context(config(tmp_path, smtpd_use_tls=True))
    assert ctx is not None
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert ctx.options & ssl.OP_NO_COMPRESSION


def test_given_files_are_used(tmp_path: Path) -> None:
    gen = config(tmp_path / "gen", smtpd_use_tls=True)
    server_ssl_context(gen)
    cert, key = selfsigned_paths(gen)
    cfg = config(tmp_path / "state", smtpd_tls_cert_file=str(cert), smtpd_tls_key_file=str(key))
    ctx = server_ssl_context(cfg)
    assert ctx is not None
    assert not (tmp_path / "state" / "tls").exists()  # nothing generated
    handshake(ctx, str(cert))


def test_file_errors_name_the_variable(tmp_path: Path) -> None:
    gen = config(tmp_path / "gen", smtpd_use_tls=True)
    server_ssl_context(gen)
    cert, key = selfsigned_paths(gen)
    other = config(tmp_path / "other", smtpd_use_tls=True)
    server_ssl_context(other)
    other_key = selfsigned_paths(other)[1]
    junk = tmp_path / "junk.pem"
    junk.write_text("not pem")

    cases = [
        (str(tmp_path / "missing.pem"), str(key), "SMTPD_TLS_CERT_FILE: cannot read"),
        (str(cert), str(tmp_path / "missing.pem"), "SMTPD_TLS_KEY_FILE: cannot read"),
        (str(junk), str(key), "SMTPD_TLS_CERT_FILE: not a PEM certificate"),
        (str(cert), str(junk), "SMTPD_TLS_KEY_FILE: not a PEM private key"),
        (str(cert), str(other_key), "SMTPD_TLS_KEY_FILE: key does not match"),
    ]
    for cert_file, key_file, message in cases:
        cfg = config(tmp_path, smtpd_tls_cert_file=cert_file, smtpd_tls_key_file=key_file)
        with pytest.raises(ConfigError) as info:
            server_ssl_context(cfg)
        assert str(info.value).startswith(message), str(info.value)


def test_cert_without_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^SMTPD_TLS_KEY_FILE: not set"):
        server_ssl_context(config(tmp_path, smtpd_tls_cert_file="/c.pem"))


def test_unwritable_state_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cfg = Config(hostname=HOST, state_dir=str(blocker), smtpd_use_tls=True)
    with pytest.raises(ConfigError, match="^PYMTA_STATE_DIR: cannot create"):
        server_ssl_context(cfg)


def test_describe_tls_without_cipher() -> None:
    class Fake:
        def version(self) -> str:
            return "TLSv1.2"

        def cipher(self) -> None:
            return None

    assert describe_tls(Fake()) == "version=TLSv1.2"
    assert describe_tls(None) == ""
