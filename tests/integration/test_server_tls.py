"""Server certificates as the image takes them, checked with the real ``openssl s_client``:
RSA and ECDSA side by side (each client gets the one it can use), intermediates sent,
``SMTPD_TLS_CHAIN_FILES``, DH parameters, bad files as exit 2 naming the variable, and an
``ACME_FILE`` swapped under a running two-worker server: the session already open goes on
with its certificate, new sessions get the new one, ``ACME_POSTHOOK`` runs once."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import smtplib
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from pymta.app import MTA
from pymta.config.model import Config
from tests.conftest import make_config
from tests.integration import serverproc
from tests.integration.serverproc import REPO, ServerProc, clean_environ, wait_until
from tests.tlsca import TestCA, acme_json, leaf_subject

# DSA keys and finite-field DH parameters are what these tests are about: cryptography's
# deprecation notices for them are expected (pymta's own filter does not apply under pytest)
pytestmark = pytest.mark.filterwarnings(
    "ignore::cryptography.utils.CryptographyDeprecationWarning")

HOST = "mx.example.com"
OPENSSL = shutil.which("openssl") or "openssl"   # its absence fails the tests, never skips
server_factory = serverproc.server_factory  # the fixture
RSA_ONLY = ("-sigalgs", "RSA-PSS+SHA256:RSA+SHA256")
ECDSA_ONLY = ("-sigalgs", "ECDSA+SHA256")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@dataclasses.dataclass
class Seen:
    """What ``openssl s_client`` reported of one handshake."""

    subject: str
    certs_sent: int
    verified: bool
    protocol: str
    cipher: str
    output: str


def parse_s_client(out: str) -> Seen:
    subject = next((line.split("CN = ", 1)[-1].strip() for line in out.splitlines()
                    if line.startswith("subject=")), "")
    new = next((line for line in out.splitlines() if line.startswith("New, ")), "")
    protocol, _, cipher = new.removeprefix("New, ").partition(", Cipher is ")
    sent = out.count("-----BEGIN CERTIFICATE-----")
    return Seen(subject=subject, certs_sent=sent,
                verified=sent > 0 and "Verify return code: 0 (ok)" in out,
                protocol=protocol.strip(),
                cipher=cipher.strip(), output=out)


def s_client_args(port: int, ca: TestCA, *extra: str, starttls: bool = True) -> list[str]:
    return [OPENSSL, "s_client", "-connect", f"127.0.0.1:{port}", "-showcerts",
            "-CAfile", str(ca.root_file), "-verify_hostname", HOST,
            *(("-starttls", "smtp") if starttls else ()), *extra]


async def s_client(port: int, ca: TestCA, *extra: str, starttls: bool = True) -> Seen:
    """One handshake by the real client (in a subprocess, so this loop goes on serving)."""
    proc = await asyncio.create_subprocess_exec(
        *s_client_args(port, ca, *extra, starttls=starttls), stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return parse_s_client(out.decode("utf-8", "replace"))


def tls_config(tmp_path: Path, **kw: Any) -> Config:
    return make_config(tmp_path, acme_file=str(tmp_path / "no-acme.json"),
                       smtpd_sasl_clientauth="user@example.com:{PLAIN}secret", **kw)


@pytest.fixture
async def dual(tmp_path: Path, ca: TestCA) -> AsyncIterator[MTA]:
    """A server with an RSA pair (SMTPD_TLS_CERT_FILE) and an ECDSA pair (ECCERT)."""
    rsa_cert, rsa_key = ca.write("rsa", (HOST,), "rsa")
    ec_cert, ec_key = ca.write("ec", ("ec.example.com", HOST), "ec")
    config = tls_config(tmp_path, smtpd_tls_cert_file=str(rsa_cert),
                        smtpd_tls_key_file=str(rsa_key), smtpd_tls_eccert_file=str(ec_cert),
                        smtpd_tls_eckey_file=str(ec_key))
    async with MTA(config) as server:
        yield server


async def test_rsa_and_ecdsa_each_to_the_client_that_asks(dual: MTA, ca: TestCA) -> None:
    for kind, port in (("smtp", dual.addresses["smtp"][0][1]),
                       ("submission", dual.addresses["submission"][0][1]),
                       ("submissions", dual.addresses["submissions"][0][1])):
        implicit = kind == "submissions"
        rsa = await s_client(port, ca, *RSA_ONLY, starttls=not implicit)
        ec = await s_client(port, ca, *ECDSA_ONLY, starttls=not implicit)
        # the leaf's subject tells which certificate came
        for seen, signature in ((rsa, "RSA"), (ec, "ECDSA")):
            assert seen.verified, (kind, seen.output[-1500:])
            assert seen.certs_sent == 2, (kind, seen.output)    # leaf + intermediate
            assert f"Peer signature type: {signature}" in seen.output.replace("RSA-PSS", "RSA")
        assert rsa.subject == HOST and ec.subject == "ec.example.com"
    tls12_rsa = await s_client(dual.addresses["smtp"][0][1], ca, "-tls1_2", *RSA_ONLY)
    assert tls12_rsa.protocol == "TLSv1.2" and "ECDHE-RSA" in tls12_rsa.cipher
    tls12_ec = await s_client(dual.addresses["smtp"][0][1], ca, "-tls1_2",
                              "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256")
    assert tls12_ec.cipher == "ECDHE-ECDSA-AES128-GCM-SHA256", tls12_ec.output[-800:]
    # below TLS 1.2: refused
    old = await s_client(dual.addresses["smtp"][0][1], ca, "-tls1_1", "-cipher",
                         "DEFAULT:@SECLEVEL=0")
    assert old.certs_sent == 0 and old.cipher == "(NONE)", old.output[-800:]


async def test_chain_files(tmp_path: Path, ca: TestCA) -> None:
    """Postfix's semantics: files in order, each key followed by its chain; a key and its
    chain may also be two files listed one after the other."""
    ec_chain, ec_key = ca.issue((HOST,), "ec")
    rsa_chain, rsa_key = ca.issue(("rsa.example.com", HOST), "rsa")
    combined = tmp_path / "ec-chain.pem"
    combined.write_bytes(ec_key + ec_chain)
    (tmp_path / "rsa.key").write_bytes(rsa_key)
    (tmp_path / "rsa-chain.pem").write_bytes(rsa_chain)
    config = tls_config(tmp_path, smtpd_tls_chain_files=(
        str(combined), str(tmp_path / "rsa.key"), str(tmp_path / "rsa-chain.pem")))
    async with MTA(config) as server:
        port = server.addresses["smtp"][0][1]
        ec = await s_client(port, ca, *ECDSA_ONLY)
        rsa = await s_client(port, ca, *RSA_ONLY)
    assert ec.verified and ec.certs_sent == 2 and ec.subject == HOST, ec.output[-800:]
    assert rsa.verified and rsa.certs_sent == 2 and rsa.subject == "rsa.example.com"


async def test_dh_parameters_enable_dhe(tmp_path: Path, ca: TestCA) -> None:
    cert, key = ca.write("dhe", (HOST,), "rsa")
    dh = tmp_path / "dh.pem"
    subprocess.run([OPENSSL, "genpkey", "-genparam", "-algorithm", "DH", "-pkeyopt",
                    "dh_param:ffdhe2048", "-out", str(dh)], check=True, capture_output=True)
    dhe = ("-tls1_2", "-cipher", "DHE-RSA-AES256-GCM-SHA384")
    base = tls_config(tmp_path, smtpd_tls_cert_file=str(cert), smtpd_tls_key_file=str(key))
    async with MTA(base) as server:
        without = await s_client(server.addresses["smtp"][0][1], ca, *dhe)
    assert without.cipher in ("", "(NONE)"), without.output[-800:]
    async with MTA(dataclasses.replace(base, smtpd_tls_dh1024_param_file=str(dh))) as server:
        with_dh = await s_client(server.addresses["smtp"][0][1], ca, *dhe)
    assert with_dh.cipher == "DHE-RSA-AES256-GCM-SHA384" and with_dh.verified, \
        with_dh.output[-800:]


def test_dhparam_command(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric import dh
    from cryptography.hazmat.primitives.serialization import load_pem_parameters

    out = tmp_path / "dh.pem"
    env = clean_environ(PYMTA_STATE_DIR=str(tmp_path / "state"))
    proc = subprocess.run([sys.executable, "-m", "pymta", "tls", "dhparam", "--bits", "512",
                           "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    params = load_pem_parameters(out.read_bytes())
    assert isinstance(params, dh.DHParameters)
    assert params.parameter_numbers().p.bit_length() == 512
    assert "Traceback" not in proc.stderr
    # the default place (with a configuration): <state dir>/tls/dhparam.pem
    proc = subprocess.run([sys.executable, "-m", "pymta", "tls", "dhparam", "--bits", "512"],
                          cwd=REPO, env={**env, "MAIL_DOMAIN": "example.com"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "state" / "tls" / "dhparam.pem")
    # too small for OpenSSL's default level: check-config says so, naming the variable
    check = subprocess.run([sys.executable, "-m", "pymta", "check-config"], cwd=REPO,
                           env={**env, "MAIL_DOMAIN": "example.com", "SMTPD_USE_TLS": "yes",
                                "SMTPD_TLS_DH1024_PARAM_FILE": str(out)},
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 2, check.stdout + check.stderr
    assert check.stderr.startswith("pymta: SMTPD_TLS_DH1024_PARAM_FILE: "), check.stderr


# ------------------------------------------------------------------ bad files: exit 2


def run_cli(command: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = clean_environ(**{"MAIL_DOMAIN": "example.com", "MYHOSTNAME": HOST,
                               "PYMTA_STATE_DIR": str(tmp_path / "state"),
                               "PYMTA_SMTP_LISTEN": "127.0.0.1:0",
                               "PYMTA_SUBMISSION_LISTEN": "none",
                               "PYMTA_SUBMISSIONS_LISTEN": "none",
                               "ACME_FILE": str(tmp_path / "none.json"), **env})
    return subprocess.run([sys.executable, "-m", "pymta", command], cwd=REPO, env=environ,
                          capture_output=True, text=True, timeout=60)


def test_bad_files_exit_2_naming_the_variable(tmp_path: Path, ca: TestCA) -> None:
    rsa_cert, rsa_key = ca.write("good", (HOST,), "rsa")
    ec_cert, ec_key = ca.write("goodec", (HOST,), "ec")
    old_cert, old_key = ca.write("old", (HOST,), "ec", expired=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    locked = tmp_path / "locked.pem"
    locked.write_bytes(ec_key.read_bytes())
    locked.chmod(0)
    backwards = tmp_path / "backwards.pem"
    backwards.write_bytes(rsa_cert.read_bytes() + rsa_key.read_bytes())
    acme = tmp_path / "acme.json"
    acme.write_text('{"le": {"Certificates": [{"domain": "mx"}]}}')
    cases: list[tuple[dict[str, str], str]] = [
        ({"SMTPD_TLS_CERT_FILE": str(rsa_cert), "SMTPD_TLS_KEY_FILE": str(ec_key)},
         "SMTPD_TLS_KEY_FILE: key does not match the certificate"),
        ({"SMTPD_TLS_ECCERT_FILE": str(old_cert), "SMTPD_TLS_ECKEY_FILE": str(old_key)},
         "SMTPD_TLS_ECCERT_FILE: the certificate expired on"),
        ({"SMTPD_TLS_ECCERT_FILE": str(junk), "SMTPD_TLS_ECKEY_FILE": str(ec_key)},
         "SMTPD_TLS_ECCERT_FILE: not a PEM certificate"),
        ({"SMTPD_TLS_ECCERT_FILE": str(ec_cert), "SMTPD_TLS_ECKEY_FILE": str(junk)},
         "SMTPD_TLS_ECKEY_FILE: not a PEM private key"),
        ({"SMTPD_TLS_CHAIN_FILES": f"{backwards}"},
         "SMTPD_TLS_CHAIN_FILES: a certificate comes before any private key"),
        ({"SMTPD_TLS_CHAIN_FILES": str(tmp_path / "missing.pem")},
         "SMTPD_TLS_CHAIN_FILES: cannot read"),
        ({"SMTPD_TLS_ECCERT_FILE": str(ec_cert)}, "SMTPD_TLS_ECKEY_FILE: not set"),
        ({"SMTPD_TLS_CERT_FILE": str(ec_cert), "SMTPD_TLS_KEY_FILE": str(ec_key),
          "SMTPD_TLS_ECCERT_FILE": str(ec_cert), "SMTPD_TLS_ECKEY_FILE": str(ec_key)},
         "SMTPD_TLS_ECCERT_FILE: a second ECDSA certificate"),
        ({"ACME_FILE": str(acme)}, 'ACME_FILE: resolver \'le\' certificate 0: "domain" is'),
    ]
    import os
    if os.geteuid() != 0:    # root reads a mode-0 file anyway
        cases.append(({"SMTPD_TLS_ECCERT_FILE": str(ec_cert),
                       "SMTPD_TLS_ECKEY_FILE": str(locked)},
                      "SMTPD_TLS_ECKEY_FILE: cannot read: Permission denied"))
    for env, message in cases:
        proc = run_cli("check-config", tmp_path, **env)
        assert proc.returncode == 2, (env, proc.stdout, proc.stderr)
        assert proc.stderr.startswith(f"pymta: {message}"), (env, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    # serve refuses the same way, before listening
    proc = run_cli("serve", tmp_path, SMTPD_TLS_CERT_FILE=str(rsa_cert),
                   SMTPD_TLS_KEY_FILE=str(ec_key))
    assert proc.returncode == 2 and "SMTPD_TLS_KEY_FILE: key does not match" in proc.stderr
    # and a good set is summarised: both certificates, where they come from
    proc = run_cli("check-config", tmp_path, SMTPD_TLS_CERT_FILE=str(rsa_cert),
                   SMTPD_TLS_KEY_FILE=str(rsa_key), SMTPD_TLS_ECCERT_FILE=str(ec_cert),
                   SMTPD_TLS_ECKEY_FILE=str(ec_key))
    assert proc.returncode == 0, proc.stderr
    assert f"RSA certificate for {HOST}" in proc.stdout
    assert f"ECDSA certificate for {HOST}" in proc.stdout


def test_dsa_is_accepted_with_one_warning(tmp_path: Path, ca: TestCA) -> None:
    """OpenSSL 3 negotiates DSA only at security level 0: the pair is checked, not served;
    the RSA one is, and the warning says why."""
    rsa_cert, rsa_key = ca.write("rsa", (HOST,), "rsa")
    dsa_cert, dsa_key = ca.write("dsa", (HOST,), "dsa")
    proc = run_cli("check-config", tmp_path, SMTPD_TLS_CERT_FILE=str(rsa_cert),
                   SMTPD_TLS_KEY_FILE=str(rsa_key), SMTPD_TLS_DCERT_FILE=str(dsa_cert),
                   SMTPD_TLS_DKEY_FILE=str(dsa_key))
    assert proc.returncode == 0, proc.stderr
    assert f"RSA certificate for {HOST}" in proc.stdout and "DSA certificate" not in proc.stdout
    # a DSA pair that does not match is still an error naming its variable
    proc = run_cli("check-config", tmp_path, SMTPD_TLS_DCERT_FILE=str(dsa_cert),
                   SMTPD_TLS_DKEY_FILE=str(rsa_key))
    assert proc.returncode == 2 and proc.stderr.startswith("pymta: SMTPD_TLS_DKEY_FILE: ")


async def test_dsa_warning_and_fallback(tmp_path: Path, ca: TestCA,
                                        caplog: pytest.LogCaptureFixture) -> None:
    dsa_cert, dsa_key = ca.write("dsa", (HOST,), "dsa")
    config = tls_config(tmp_path, smtpd_tls_dcert_file=str(dsa_cert),
                        smtpd_tls_dkey_file=str(dsa_key))
    async with MTA(config) as server:
        seen = await s_client(server.addresses["smtp"][0][1], ca, "-tls1_2", "-cipher",
                              "DHE-DSS-AES256-GCM-SHA384:@SECLEVEL=0")
        fallback = await s_client(server.addresses["smtp"][0][1], ca)
    warnings = [r.getMessage() for r in caplog.records if "DSA certificates are not served"
                in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("tls: SMTPD_TLS_DCERT_FILE: ")
    assert seen.cipher in ("", "(NONE)")
    assert fallback.protocol.startswith("TLSv1.") and fallback.subject == HOST
    assert not fallback.verified              # the self-signed stand-in


# ------------------------------------------------------------------ ACME, hot swap


def open_session(port: int) -> tuple[smtplib.SMTP, bytes]:
    client = smtplib.SMTP("127.0.0.1", port, timeout=30)
    client.ehlo("client.example.net")
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    client.starttls(context=ctx)
    client.ehlo("client.example.net")
    sock = client.sock
    assert isinstance(sock, ssl.SSLSocket)
    cert = sock.getpeercert(binary_form=True)
    assert cert is not None
    return client, cert


def der_to_subject_and_serial(der: bytes) -> tuple[str, int]:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return cert.subject.rfc4514_string(), cert.serial_number


def test_acme_swapped_while_a_session_is_open(server_factory: Any, tmp_path: Path,
                                               ca: TestCA) -> None:
    first = ca.issue((HOST,), "rsa")
    second = ca.issue(("*.example.com", "example.com"), "rsa")
    acme = tmp_path / "acme" / "acme.json"
    acme.parent.mkdir()
    acme.write_bytes(acme_json([("staging", ("web.other.org",), *ca.issue(("web.other.org",),
                                                                           "ec")),
                                ("le", (HOST,), *first)]))       # Traefik v2, two resolvers
    hooklog = tmp_path / "hook.log"
    srv: ServerProc = server_factory(
        ACME_FILE=str(acme), ACME_POSTHOOK=f"echo $PPID >> {hooklog}", PYMTA_WORKERS="2",
        SMTPD_SASL_CLIENTAUTH="user@example.com:{PLAIN}secret",
        PYMTA_SUBMISSIONS_LISTEN=f"127.0.0.1:{_free_port()}")
    srv.start()
    # one greeting is one worker: both must have read the first file before it changes, or a
    # slow one reads the second at its start and has nothing to replace
    wait_until(lambda: srv.stderr.count("pymta started on") >= 2, 30, 0.1,
               "both workers to start")
    smtps = int(srv.env["PYMTA_SUBMISSIONS_LISTEN"].rsplit(":", 1)[1])

    def seen(port: int, starttls: bool = True) -> Seen:
        proc = subprocess.run(s_client_args(port, ca, starttls=starttls),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=30)
        return parse_s_client(proc.stdout)

    before = seen(srv.port)
    assert before.verified and before.subject == HOST and before.certs_sent == 2
    assert seen(smtps, starttls=False).subject == HOST
    old, old_cert = open_session(srv.port)
    assert len(hooklog.read_text().split()) == 1     # written at start: one run
    assert (srv.state_dir / "tls" / "acme.crt").read_bytes() == first[0]

    acme.write_bytes(acme_json([("", ("*.example.com", "example.com"), *second)], v1=True))
    # each worker polls the file (every 5 s) and logs the swap
    wait_until(lambda: srv.stderr.count("replaced by RSA certificate for *.example.com") >= 2,
               30, 0.2, "both workers to take the new certificate")
    for _ in range(6):       # whichever worker the kernel hands them to
        assert seen(srv.port).subject == "*.example.com"
        assert seen(smtps, starttls=False).subject == "*.example.com"

    # the session opened before the swap: still its certificate, and it still carries mail
    sock = old.sock
    assert isinstance(sock, ssl.SSLSocket)
    assert sock.getpeercert(binary_form=True) == old_cert
    assert der_to_subject_and_serial(old_cert)[0] == f"CN={HOST}"
    refused = old.sendmail("sender@example.net", ["alice@example.com"],
                           b"Subject: after the swap\r\n\r\nstill here\r\n")
    assert refused == {}
    old.quit()
    wait_until(lambda: list((srv.mail_dir).rglob("new/*")), 20, 0.1, "delivery")
    # the hook: once at start, once for the change, although two workers saw it
    assert len(hooklog.read_text().split()) == 2, hooklog.read_text()
    assert (srv.state_dir / "tls" / "acme.crt").read_bytes() == second[0]
    assert leaf_subject(second[0]) == "*.example.com"
    assert srv.stop() == 0


def _free_port() -> int:
    from tests.integration.serverproc import free_port

    return free_port()
