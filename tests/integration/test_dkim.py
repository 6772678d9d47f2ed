"""DKIM verify and sign, ARC seal, and ``pymta dkim`` (issue 6), against the real test DNS
server (``dns_zone``): every key pymta looks up comes from there through
``PYMTA_DNS_RESOLVER``; nothing is monkeypatched.

The independent verifier of what pymta signs is OpenDKIM (Debian's ``opendkim``, run in its
test mode ``opendkim -t FILE``): its library resolves through libunbound, and
``ResolverConfiguration`` names an unbound config that forwards every query to the test DNS
server's port (``forward-addr: 127.0.0.1@PORT``). ``opendkim-testmsg`` (opendkim-tools) has
no way to pick a resolver or port, so it cannot be used here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import dkim
import dns.resolver
import pytest

from pymta.app import MTA
from pymta.delivery.body import load_body
from pymta.pipeline.dkimkeys import DkimKey, generate_key
from pymta.pipeline.dkimsign import sign_message
from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply
from tests.conftest import make_config, wait_for
from tests.integration._support import smtp_address, smtplib_send, wait_maildir
from tests.services.dns import DNSTestServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def config_for(tmp_path: Path, dns_server: DNSTestServer, **kw: object):
    """Keys generated at first start, as in production (no DKIM_PRIVATEKEY)."""
    kw.setdefault("dkim_private_key", "")
    return make_config(tmp_path, dns_resolver=(dns_server.resolver_spec,), dns_timeout=2.0,
                       **kw)


def publish(dns_server: DNSTestServer, key: DkimKey) -> None:
    dns_server.add(key.zone_line().replace("( ", "").replace(" )", ""))


def foreign_message(subject: str, body: str = "Hello from abroad.\r\n") -> bytes:
    return (f"From: Sender <sender@example.net>\r\nTo: <alice@example.com>\r\n"
            f"Subject: {subject}\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.net>\r\n\r\n{body}").encode()


async def send(mta: MTA, sender: str, rcpts: Sequence[str], data: bytes) -> dict[str, object]:
    host, port = smtp_address(mta)
    return await asyncio.to_thread(smtplib_send, host, port, sender, list(rcpts), data)


def auth_results(message: bytes, authserv_id: str = "mx.example.com") -> str:
    """The unfolded value of our Authentication-Results field in a delivered message."""
    text = message.replace(b"\r\n", b"\n").decode("utf-8", "replace")
    header = text.split("\n\n", 1)[0]
    for m in re.finditer(r"^Authentication-Results:(.*(?:\n[ \t].*)*)", header, re.M | re.I):
        value = " ".join(m.group(1).split())
        if value.startswith(authserv_id):
            return value
    raise AssertionError(f"no Authentication-Results of {authserv_id} in:\n{header}")


def dnsfunc_for(dns_server: DNSTestServer):
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [dns_server.host]
    resolver.port = dns_server.port

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        try:
            answer = resolver.resolve(name.decode(), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)

    return dnsfunc


# ------------------------------------------------------------------------------ verify


async def test_verify_rsa_and_ed25519_signatures_pass_and_tampered_fails(
        tmp_path: Path, dns_zone: DNSTestServer) -> None:
    rsa_key = DkimKey("example.net", "rsa1", generate_key("rsa", 2048))
    ed_key = DkimKey("example.net", "ed1", generate_key("ed25519"))
    publish(dns_zone, rsa_key)
    publish(dns_zone, ed_key)
    plain = foreign_message("signed twice")
    signed = sign_message(plain, ed_key) + plain
    signed = sign_message(signed, rsa_key) + signed
    tampered = signed.replace(b"Hello from abroad.", b"Hello from abroad!")
    async with MTA(config_for(tmp_path, dns_zone)) as mta:
        mail_dir = mta.config.mail_dir
        await send(mta, "sender@example.net", ["alice@example.com"], signed)
        await send(mta, "sender@example.net", ["alice@example.com"], tampered)
        first, second = await wait_maildir(mail_dir, "alice/", 2)
    ar = auth_results(first)
    assert (f"dkim=pass header.d=example.net header.s=rsa1 "
            f"header.b={_b8(signed, 0)}") in ar.replace('"', "")
    assert (f"dkim=pass header.d=example.net header.s=ed1 "
            f"header.b={_b8(signed, 1)}") in ar.replace('"', "")
    ar2 = auth_results(second)
    assert 'dkim=fail reason="body hash did not verify" header.d=example.net' in ar2
    assert "dkim=pass" not in ar2


def _b8(message: bytes, index: int) -> str:
    sigs = re.findall(rb"^DKIM-Signature:.*?\bb=([^;]*?)(?:;|\r\n(?![ \t]))", message,
                      re.M | re.S)
    return re.sub(rb"\s+", b"", sigs[index])[:8].decode()


async def test_key_lookup_failures_temperror_and_permerror_never_refuse(
        tmp_path: Path, dns_zone: DNSTestServer) -> None:
    key = DkimKey("example.net", "down", generate_key("ed25519"))
    missing = DkimKey("example.net", "nokey", generate_key("ed25519"))
    publish(dns_zone, key)
    dns_zone.fail("down._domainkey.example.net", "SERVFAIL")
    plain = foreign_message("dns trouble")
    signed = sign_message(plain, missing) + plain
    signed = sign_message(signed, key) + signed
    async with MTA(config_for(tmp_path, dns_zone)) as mta:
        out = await send(mta, "sender@example.net", ["alice@example.com"], signed)
        assert out["data_reply"][0] == 250
        (delivered,) = await wait_maildir(mta.config.mail_dir, "alice/", 1)
    ar = auth_results(delivered)
    assert "dkim=temperror" in ar and "header.s=down" in ar
    assert 'dkim=permerror reason="no key for signature" header.d=example.net header.s=nokey' \
        in ar


async def test_unsigned_foreign_mail_is_dkim_none(tmp_path: Path,
                                                  dns_zone: DNSTestServer) -> None:
    async with MTA(config_for(tmp_path, dns_zone)) as mta:
        await send(mta, "sender@example.net", ["alice@example.com"],
                   foreign_message("not signed"))
        (delivered,) = await wait_maildir(mta.config.mail_dir, "alice/", 1)
    assert "dkim=none" in auth_results(delivered)
    assert b"\nDKIM-Signature:" not in delivered.replace(b"\r\n", b"\n")


# ------------------------------------------------------------------------------ sign


def opendkim_verify(tmp_path: Path, dns_server: DNSTestServer, message: bytes) -> str:
    """OpenDKIM's verdict on ``message`` (its test mode), keys from the test DNS server."""
    binary = shutil.which("opendkim") or "/usr/sbin/opendkim"
    if not os.path.exists(binary):
        pytest.fail("opendkim not installed (apt-get install opendkim; scripts/test.sh does)")
    work = tmp_path / "opendkim"
    work.mkdir(exist_ok=True)
    (work / "unbound.conf").write_text(
        "server:\n  do-not-query-localhost: no\n  module-config: \"iterator\"\n"
        f"forward-zone:\n  name: \".\"\n  forward-addr: 127.0.0.1@{dns_server.port}\n")
    (work / "opendkim.conf").write_text(
        f"Mode v\nResolverConfiguration {work / 'unbound.conf'}\nSyslog no\n"
        "AlwaysAddARHeader yes\nMinimumKeyBits 1024\n")
    msg = work / "message.eml"
    msg.write_bytes(message.replace(b"\r\n", b"\n"))
    proc = subprocess.run([binary, "-x", str(work / "opendkim.conf"), "-t", str(msg), "-vv"],
                          capture_output=True, text=True, timeout=30)
    return proc.stdout + proc.stderr


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_mail_from_mynetworks_is_signed_and_opendkim_verifies_it(
        tmp_path: Path, dns_zone: DNSTestServer, algorithm: str) -> None:
    config = config_for(tmp_path, dns_zone, mynetworks=("127.0.0.1/32",),
                        dkim_algorithm=algorithm, dkim_selector="pymta1")
    async with MTA(config) as mta:
        record = Path(config.state_dir, "dkim", "example.com.pymta1._domainkey.txt")
        assert record.exists()  # written at first start
        dns_zone.add(record.read_text().replace("( ", "").replace(" )", ""))
        data = (b"From: Alice <alice@example.com>\r\nTo: <bob@example.com>\r\n"
                b"Subject: signed by pymta\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
                b"Message-ID: <signed.by.pymta@example.com>\r\n\r\nHi Bob,\r\n  spaced  "
                b"line\r\n\r\n")
        await send(mta, "alice@example.com", ["alice@example.com"], data)
        (delivered,) = await wait_maildir(config.mail_dir, "alice/", 1)
    header = delivered.split(b"\n\n", 1)[0]
    assert re.search(rb"^DKIM-Signature: v=1; a=" + algorithm.encode() + rb"-sha256; "
                     rb"c=relaxed/relaxed; d=example.com;", header, re.M)
    # the signature is the top-most field pymta added (delivery adds Return-Path etc. above)
    added = [line.split(b":")[0] for line in header.split(b"\n") if line[:1] not in b" \t"]
    assert added.index(b"DKIM-Signature") < added.index(b"Received")
    verdict = opendkim_verify(tmp_path, dns_zone, delivered)
    assert "verification (s=pymta1, d=example.com" in verdict and "succeeded" in verdict, \
        verdict
    # a changed body fails the same verifier (it really checks)
    broken = opendkim_verify(tmp_path, dns_zone, delivered.replace(b"Hi Bob", b"Hi Rob"))
    assert "failed" in broken and "succeeded" not in broken, broken


async def test_authenticated_client_mail_is_signed_for_its_from_domain(
        tmp_path: Path, dns_zone: DNSTestServer) -> None:
    """The signer as the submission port uses it (auth_user set), checked by dkimpy's
    verifier against the records pymta wrote, served by the test DNS."""
    from pymta.pipeline import SpooledBody, Transaction
    from pymta.pipeline.dkimkeys import KeyStore
    from pymta.pipeline.dkimsign import DkimSign

    keys = KeyStore(str(tmp_path), "s1")
    signer = DkimSign(keys, "example.com")
    spool = tmp_path / "spool"
    spool.write_bytes(b"Received: from client (localhost [127.0.0.1])\r\n\tby mx.example.com "
                      b"with ESMTPSA id X; Mon, 1 Jan 2024 10:00:00 +0000\r\n"
                      b"From: <carol@example.org>\r\nTo: <x@example.net>\r\n"
                      b"Subject: s\r\n\r\nb\r\n")
    txn = Transaction(qid="Q1", sender="carol@example.org", recipients=[], peer_ip="192.0.2.9",
                      helo="client", hostname="mx.example.com",
                      local_domains=frozenset({"example.com", "example.org"}),
                      auth_user="carol", trusted=True)
    txn.add_header("Authentication-Results: mx.example.com; none")
    await signer.modify(txn, SpooledBody(str(spool), spool.stat().st_size))
    assert txn.prepend[0].startswith("DKIM-Signature:") and "d=example.org;" in txn.prepend[0]
    publish(dns_zone, keys.get("example.org"))
    message = "".join(txn.prepend).encode() + spool.read_bytes()
    assert dkim.verify(message, dnsfunc=dnsfunc_for(dns_zone))
    # an unauthenticated client outside MYNETWORKS is never signed for
    txn2 = dataclasses.replace(txn, auth_user=None, trusted=False, prepend=[])
    await signer.modify(txn2, SpooledBody(str(spool), spool.stat().st_size))
    assert txn2.prepend == []


# ------------------------------------------------------------------------------ ARC


class CaptureAgent:
    """Delivers every recipient into a list (the message bytes as they would leave)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        body = load_body(msg).whole()
        out = []
        for r in rcpts:
            self.messages.append((r.address, body))
            out.append(Outcome(r.address, OutcomeKind.DELIVERED, Reply(250, "2.0.0", "Ok"),
                               "capture"))
        return out


class CaptureRouter:
    def __init__(self, agent: CaptureAgent) -> None:
        self.agent = agent

    def route(self, rcpt: Recipient) -> tuple[str, object]:
        return "capture", self.agent


async def test_forwarded_mail_is_arc_sealed_and_dkimpy_arc_verify_passes(
        tmp_path: Path, dns_zone: DNSTestServer) -> None:
    sender_key = DkimKey("example.net", "rsa1", generate_key("rsa", 2048))
    publish(dns_zone, sender_key)
    plain = foreign_message("to be forwarded")
    signed = sign_message(plain, sender_key) + plain
    config = config_for(tmp_path, dns_zone, mail_aliases="fwd:rcpt@example.net",
                        srs_enable=False)
    agent = CaptureAgent()
    async with MTA(config, router=CaptureRouter(agent)) as mta:
        record = Path(config.state_dir, "dkim", "example.com.default._domainkey.txt")
        dns_zone.add(record.read_text().replace("( ", "").replace(" )", ""))
        await send(mta, "sender@example.net", ["fwd@example.com", "alice@example.com"], signed)
        await wait_for(lambda: len(agent.messages) == 2, timeout=10)
    by_rcpt = dict(agent.messages)
    forwarded = by_rcpt["rcpt@example.net"]
    header = forwarded.split(b"\r\n\r\n", 1)[0].decode()
    assert header.startswith("ARC-Seal: i=1; cv=none; a=rsa-sha256; d=example.com; "
                             "s=default;"), header[:300]
    aar = re.search(r"^ARC-Authentication-Results: (.*(?:\n[ \t].*)*)",
                    header.replace("\r\n", "\n"), re.M)
    assert aar is not None
    aar_text = " ".join(aar.group(1).split())
    assert aar_text.startswith("i=1; mx.example.com;")
    assert "dkim=pass header.d=example.net header.s=rsa1" in aar_text.replace('"', "")
    cv, results, reason = dkim.arc_verify(forwarded, dnsfunc=dnsfunc_for(dns_zone))
    assert cv == dkim.CV_Pass, (reason, results)
    # the original DKIM signature still verifies after our changes
    assert dkim.verify(forwarded, dnsfunc=dnsfunc_for(dns_zone))
    # ARC seal is above our Authentication-Results (RFC 8617 §5.1)
    names = [line.split(":")[0] for line in header.split("\r\n") if line[:1] not in " \t"]
    assert names.index("ARC-Seal") < names.index("Authentication-Results")
    # only forwarded mail is sealed, but the one spooled copy serves every recipient
    assert by_rcpt["alice@example.com"] == forwarded


# ------------------------------------------------------------------------------ CLI


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pymta", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, **env},
                          cwd=Path(__file__).resolve().parents[2])


def test_cli_keygen_show_and_bad_private_key(tmp_path: Path, dns_server: DNSTestServer) -> None:
    env = {"MAIL_DOMAIN": "example.com example.org", "MYHOSTNAME": "mx.example.com",
           "PYMTA_STATE_DIR": str(tmp_path / "state")}
    gen = run_cli("dkim", "keygen", "--domain", "example.org", "--algorithm", "ed25519",
                  env=env)
    assert gen.returncode == 0, gen.stderr
    key_file = tmp_path / "state" / "dkim" / "example.org.default.key"
    assert key_file.exists() and oct(key_file.stat().st_mode & 0o777) == "0o600"
    assert "default._domainkey.example.org. IN TXT \"v=DKIM1; k=ed25519; p=" in gen.stdout
    show = run_cli("dkim", "show", env=env)
    assert show.returncode == 0, show.stderr
    lines = show.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith('default._domainkey.example.com. IN TXT ( "v=DKIM1; k=rsa; p=')
    assert lines[1] == gen.stdout.splitlines()[-1]
    assert "PRIVATE KEY" not in show.stdout + gen.stdout
    only = run_cli("dkim", "show", "example.org", env=env)
    assert only.stdout.splitlines() == [lines[1]]
    # the published record is what a verifier fetches: the key pymta uses verifies against it
    dns_server.add(lines[1])
    try:
        from pymta.pipeline.dkimkeys import KeyStore

        key = KeyStore(str(tmp_path / "state")).get("example.org")
        plain = b"From: <a@example.org>\r\nSubject: x\r\n\r\nbody\r\n"
        assert dkim.verify(sign_message(plain, key) + plain, dnsfunc=dnsfunc_for(dns_server))
    finally:
        dns_server.remove("default._domainkey.example.org")
    # DKIM_PRIVATEKEY without armour (as in mlan/postfix-amavis) signs for every domain
    pem = (tmp_path / "state" / "dkim" / "example.com.default.key").read_text()
    bare = "".join(pem.strip().splitlines()[1:-1])
    given = run_cli("dkim", "show", env={**env, "DKIM_PRIVATEKEY": bare,
                                         "PYMTA_STATE_DIR": str(tmp_path / "other")})
    assert given.returncode == 0, given.stderr
    assert given.stdout.splitlines()[0] == lines[0]
    assert given.stdout.splitlines()[1].replace("example.org", "example.com") == lines[0]
    bad = run_cli("dkim", "show", env={**env, "DKIM_PRIVATEKEY": "MIIEpAIBAAKCAQEAnot-a-key"})
    assert bad.returncode == 2
    assert bad.stderr.strip() == "pymta: DKIM_PRIVATEKEY: not a PEM (or base64 DER) private key"
    check = run_cli("check-config", env={**env, "DKIM_PRIVATEKEY": "-----BEGIN RSA PRIVATE "
                                         "KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----"})
    assert check.returncode == 2 and check.stderr.startswith("pymta: DKIM_PRIVATEKEY:")
    assert len(check.stderr.strip().splitlines()) == 1
