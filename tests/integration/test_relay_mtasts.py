"""MTA-STS (issue 15, item 3) with real parts: the test DNS server publishes the MX, the
``_mta-sts`` TXT records and the policy hosts (127.0.0.1); a local HTTPS server with a
certificate of the test CA serves the policies; aiosmtpd peers offer STARTTLS with
certificates of that CA (trusted) or self-signed ones (untrusted).

``enforce`` delivers over verified TLS only, to MX hosts the policy names; ``testing``
delivers as before and logs what ``enforce`` would have refused; a cached policy stays in
force when its server is gone (also after a restart), and a new record ``id`` fetches the
policy again."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from pymta.app import MTA
from pymta.types import RcptState
from tests.conftest import make_config
from tests.integration._outbound import RecordingHandler, inject, message, wait_attempted, wait_gone
from tests.services.base import free_port
from tests.services.dns import DNSTestServer
from tests.services.tls import make_self_signed
from tests.tlsca import TestCA

# TTL 0: the tests change records and the server's resolver must see it at once
ZONE = """\
$TTL 0
$ORIGIN test.
enforced        IN MX  10 mx.enforced.test.
mx.enforced     IN A   127.0.0.1
mta-sts.enforced IN A  127.0.0.1
_mta-sts.enforced IN TXT "v=STSv1; id=20240101;"
moved           IN MX  10 mx.elsewhere.test.
mx.elsewhere    IN A   127.0.0.1
mta-sts.moved   IN A   127.0.0.1
_mta-sts.moved  IN TXT "v=STSv1; id=1;"
trial           IN MX  10 mx.trial.test.
mx.trial        IN A   127.0.0.1
mta-sts.trial   IN A   127.0.0.1
_mta-sts.trial  IN TXT "v=STSv1; id=1;"
plain           IN MX  10 mx.plain.test.
mx.plain        IN A   127.0.0.1
mta-sts.plain   IN A   127.0.0.1
cached          IN MX  10 mx.cached.test.
mx.cached       IN A   127.0.0.1
mx.attacker     IN A   127.0.0.1
mta-sts.cached  IN A   127.0.0.1
_mta-sts.cached IN TXT "v=STSv1; id=1;"
change          IN MX  10 mx.change.test.
mx.change       IN A   127.0.0.1
mta-sts.change  IN A   127.0.0.1
_mta-sts.change IN TXT "v=STSv1; id=1;"
pinned          IN MX  10 mx.elsewhere.test.
mta-sts.pinned  IN A   127.0.0.1
_mta-sts.pinned IN TXT "v=STSv1; id=1;"
"""
DOMAINS = ("enforced", "moved", "trial", "plain", "cached", "change", "pinned")


def policy(mode: str, *mx: str, max_age: int = 604800) -> str:
    return ("version: STSv1\r\n" f"mode: {mode}\r\n"
            + "".join(f"mx: {m}\r\n" for m in mx) + f"max_age: {max_age}\r\n")


class PolicyServer:
    """HTTPS on 127.0.0.1 serving ``policies[host]`` (by the request's Host field) at the
    well-known path as text/plain, 404 otherwise; ``requests`` lists the hosts asked."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.policies: dict[str, str] = {}
        self.requests: list[str] = []
        self.port = free_port()
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(str(cert), str(key))
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> PolicyServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port,
                                                  ssl=self.context)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            fields = dict(line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line)
            host = fields.get("Host", "").strip()
            self.requests.append(host)
            body = self.policies.get(host)
            if head.startswith("GET /.well-known/mta-sts.txt ") and body is not None:
                data = body.encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (len(data), data))
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def dns() -> Iterator[DNSTestServer]:
    server = DNSTestServer(ZONE).start()
    yield server
    server.stop()


@pytest.fixture
async def https(dns: DNSTestServer, ca: TestCA) -> AsyncIterator[PolicyServer]:
    dns.set_zone(ZONE)      # what a test before changed
    server = PolicyServer(*ca.write("mta-sts", tuple(f"mta-sts.{d}.test" for d in DOMAINS)))
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def peer_for(tmp_path: Path) -> Iterator[Callable[..., tuple[int, RecordingHandler]]]:
    """aiosmtpd offering STARTTLS with ``cert``/``key``: (port, recorder)."""
    started: list[Controller] = []

    def start(cert: Path, key: Path) -> tuple[int, RecordingHandler]:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(cert), str(key))
        recorder, port = RecordingHandler(), free_port()
        controller = Controller(recorder, hostname="127.0.0.1", port=port,
                                tls_context=context, ready_timeout=5)
        controller.start()
        started.append(controller)
        return port, recorder

    yield start
    for controller in started:
        controller.stop()


def _mta(directory: Path, dns: DNSTestServer, ca: TestCA, smtp_port: int,
         https: PolicyServer, **kw: object) -> MTA:
    config = make_config(directory, dns_resolver=(dns.resolver_spec,), mx_port=smtp_port,
                         smtp_connect_timeout=5.0, smtp_timeout=20.0,
                         smtp_tls_ca_file=str(ca.root_file), queue_retry_first=30.0,
                         queue_retry_max=60.0, connection_cache_time=0.0, **kw)
    mta = MTA(config)   # (no connection cache: each message is a new policy decision)
    relay = mta.router.remote           # type: ignore[attr-defined]
    relay.mta_sts.https_port = https.port
    return mta


def _relay(mta: MTA):
    return mta.router.remote            # type: ignore[attr-defined]


async def _deferred(mta: MTA, rcpt: str) -> str:
    qid = await inject(mta, "alice@example.com", [rcpt],
                       message("alice@example.com", rcpt, "mta-sts"))
    env = await wait_attempted(mta, qid)
    assert env.recipients[0].state is RcptState.PENDING
    return env.recipients[0].last_reply


async def _delivered(mta: MTA, rcpt: str) -> None:
    qid = await inject(mta, "alice@example.com", [rcpt],
                       message("alice@example.com", rcpt, "mta-sts"))
    await wait_gone(mta, qid)


def _tlsrpt(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("tlsrpt ")]


async def test_issue15_mta_sts_enforce_delivers_over_verified_tls(
        tmp_path: Path, dns, ca, https, peer_for, caplog) -> None:
    caplog.set_level("INFO", logger="pymta.delivery.relay")
    https.policies["mta-sts.enforced.test"] = policy("enforce", "mx.enforced.test")
    port, recorder = peer_for(*ca.write("mx", ("mx.enforced.test",)))
    async with _mta(tmp_path, dns, ca, port, https) as mta:
        await _delivered(mta, "bob@enforced.test")
    assert recorder.received == [["bob@enforced.test"]]
    assert https.requests == ["mta-sts.enforced.test"]
    assert any(r.getMessage().startswith("Verified TLS connection established to "
                                         f"mx.enforced.test[127.0.0.1]:{port}")
               for r in caplog.records)
    assert _tlsrpt(caplog) == []


async def test_issue15_mta_sts_enforce_defers_an_untrusted_certificate(
        tmp_path: Path, dns, ca, https, peer_for, caplog) -> None:
    """SMTP_TLS_SECURITY_LEVEL stays ``may``: the policy alone requires verified TLS."""
    https.policies["mta-sts.enforced.test"] = policy("enforce", "mx.enforced.test")
    port, recorder = peer_for(*make_self_signed(tmp_path / "self", "mx.enforced.test"))
    async with _mta(tmp_path, dns, ca, port, https) as mta:
        reply = await _deferred(mta, "bob@enforced.test")
    assert "4.7.5 Server certificate not trusted" in reply, reply
    assert recorder.received == []
    assert _tlsrpt(caplog) == [
        f"tlsrpt policy-type=sts policy-domain=enforced.test policy-mode=enforce "
        f"result-type=certificate-not-trusted receiving-mx-hostname=mx.enforced.test "
        f"receiving-ip=127.0.0.1: {reply.split(' ', 2)[2]} (deferred)"]


async def test_issue15_mta_sts_enforce_never_connects_to_an_mx_outside_the_policy(
        tmp_path: Path, dns, ca, https, peer_for, caplog) -> None:
    https.policies["mta-sts.moved.test"] = policy("enforce", "mx.moved.test", "*.backup.test")
    port, recorder = peer_for(*ca.write("elsewhere", ("mx.elsewhere.test",)))
    async with _mta(tmp_path, dns, ca, port, https) as mta:
        reply = await _deferred(mta, "bob@moved.test")
        assert _relay(mta).connections_opened == 0
    assert reply.startswith("451 4.7.5 MTA-STS policy of moved.test (mode enforce, mx "
                            "mx.moved.test *.backup.test) allows none of its MX hosts "
                            "(mx.elsewhere.test)"), reply
    assert recorder.received == []
    assert "result-type=validation-failure receiving-mx-hostname=mx.elsewhere.test" in (
        _tlsrpt(caplog)[0])


async def test_issue15_mta_sts_testing_delivers_and_logs_what_enforce_would_refuse(
        tmp_path: Path, dns, ca, https, peer_for, caplog) -> None:
    https.policies["mta-sts.trial.test"] = policy("testing", "mx.trial.test")
    port, recorder = peer_for(*make_self_signed(tmp_path / "self", "mx.trial.test"))
    async with _mta(tmp_path, dns, ca, port, https) as mta:
        await _delivered(mta, "bob@trial.test")
    assert recorder.received == [["bob@trial.test"]]
    lines = _tlsrpt(caplog)
    assert len(lines) == 1, lines
    assert lines[0].startswith(
        "tlsrpt policy-type=sts policy-domain=trial.test policy-mode=testing "
        "result-type=certificate-not-trusted receiving-mx-hostname=mx.trial.test "
        "receiving-ip=127.0.0.1: Server certificate not trusted: ")
    assert lines[0].endswith("(enforce would defer; tried as before)")


async def test_issue15_mta_sts_without_a_record_delivery_is_as_before(
        tmp_path: Path, dns, ca, https, peer_for, caplog) -> None:
    https.policies["mta-sts.plain.test"] = policy("enforce", "nowhere.plain.test")
    port, recorder = peer_for(*make_self_signed(tmp_path / "self", "mx.plain.test"))
    async with _mta(tmp_path, dns, ca, port, https) as mta:
        await _delivered(mta, "bob@plain.test")
    assert recorder.received == [["bob@plain.test"]]
    assert https.requests == []          # no record, no fetch
    assert _tlsrpt(caplog) == []


async def test_issue15_mta_sts_policy_host_with_an_untrusted_certificate_is_no_policy(
        tmp_path: Path, dns, ca, peer_for, caplog) -> None:
    dns.set_zone(ZONE)
    rogue = PolicyServer(*make_self_signed(tmp_path / "rogue", "mta-sts.moved.test"))
    rogue.policies["mta-sts.moved.test"] = policy("none")
    await rogue.start()
    try:
        port, recorder = peer_for(*ca.write("elsewhere", ("mx.elsewhere.test",)))
        async with _mta(tmp_path, dns, ca, port, rogue) as mta:
            await _delivered(mta, "bob@moved.test")
    finally:
        await rogue.stop()
    assert recorder.received == [["bob@moved.test"]]
    assert rogue.requests == []          # the handshake failed: nothing was asked
    lines = _tlsrpt(caplog)
    assert lines[0].startswith("tlsrpt policy-type=sts policy-domain=moved.test "
                               "result-type=sts-webpki-invalid: certificate of "
                               "mta-sts.moved.test[127.0.0.1]"), lines
    assert lines[0].endswith("; no policy applies")


async def test_issue15_mta_sts_cached_policy_stays_enforced_when_its_server_is_gone(
        tmp_path: Path, dns, ca, https, peer_for, caplog) -> None:
    """An attacker who changes the MX record and blocks the policy host (the new record id
    makes the server try to fetch) gets nothing: the cached policy holds, in memory and,
    after a restart, from ``STATE_DIR/mta-sts.json``."""
    https.policies["mta-sts.cached.test"] = policy("enforce", "mx.cached.test")
    port, recorder = peer_for(*ca.write("mx", ("mx.cached.test", "mx.attacker.test")))
    async with _mta(tmp_path, dns, ca, port, https) as mta:
        await _delivered(mta, "bob@cached.test")
        await https.stop()
        dns.remove("cached.test", "MX")
        dns.add("cached.test. 0 IN MX 10 mx.attacker.test.")
        dns.remove("_mta-sts.cached.test", "TXT")
        dns.add('_mta-sts.cached.test. 0 IN TXT "v=STSv1; id=2;"')
        reply = await _deferred(mta, "carol@cached.test")
    assert "allows none of its MX hosts (mx.attacker.test)" in reply, reply
    assert "result-type=sts-policy-fetch-error" in _tlsrpt(caplog)[0]
    assert (tmp_path / "state" / "mta-sts.json").exists()
    async with _mta(tmp_path, dns, ca, port, https) as mta:
        reply = await _deferred(mta, "dave@cached.test")
        assert _relay(mta).connections_opened == 0
    assert "allows none of its MX hosts (mx.attacker.test)" in reply, reply
    assert recorder.received == [["bob@cached.test"]]
    assert https.requests == ["mta-sts.cached.test"]


async def test_issue15_mta_sts_a_new_record_id_fetches_the_policy_again(
        tmp_path: Path, dns, ca, https, peer_for) -> None:
    https.policies["mta-sts.change.test"] = policy("enforce", "mx1.change.test")
    port, recorder = peer_for(*ca.write("mx", ("mx.change.test",)))
    async with _mta(tmp_path, dns, ca, port, https) as mta:
        reply = await _deferred(mta, "bob@change.test")
        assert "allows none of its MX hosts (mx.change.test)" in reply, reply
        # the domain fixes its policy but forgets the id: the cached one is still used
        https.policies["mta-sts.change.test"] = policy("enforce", "mx.change.test")
        reply = await _deferred(mta, "carol@change.test")
        assert "allows none of its MX hosts" in reply, reply
        assert len(https.requests) == 1
        dns.remove("_mta-sts.change.test", "TXT")
        dns.add('_mta-sts.change.test. 0 IN TXT "v=STSv1; id=2;"')
        await _delivered(mta, "dave@change.test")
    assert len(https.requests) == 2
    assert recorder.received == [["dave@change.test"]]


async def test_issue15_mta_sts_an_explicit_tls_policy_entry_wins(
        tmp_path: Path, dns, ca, https, peer_for) -> None:
    """``PYMTA_TLS_POLICY`` names the domain: the operator decided, no policy is looked up
    (Postfix's policy table before the MTA-STS socketmap)."""
    https.policies["mta-sts.pinned.test"] = policy("enforce", "mx.pinned.test")
    port, recorder = peer_for(*make_self_signed(tmp_path / "self", "mx.elsewhere.test"))
    async with _mta(tmp_path, dns, ca, port, https, tls_policy=("pinned.test=may",)) as mta:
        await _delivered(mta, "bob@pinned.test")
    assert recorder.received == [["bob@pinned.test"]]
    assert https.requests == []


async def test_issue15_mta_sts_can_be_switched_off(
        tmp_path: Path, dns, ca, https, peer_for) -> None:
    https.policies["mta-sts.moved.test"] = policy("enforce", "mx.moved.test")
    port, recorder = peer_for(*ca.write("elsewhere", ("mx.elsewhere.test",)))
    config_dir = tmp_path
    mta = MTA(make_config(config_dir, dns_resolver=(dns.resolver_spec,), mx_port=port,
                          smtp_tls_ca_file=str(ca.root_file), mta_sts=False))
    assert _relay(mta).mta_sts is None
    async with mta:
        await _delivered(mta, "bob@moved.test")
    assert recorder.received == [["bob@moved.test"]]
    assert https.requests == []


async def test_review_mta_sts_enforce_trusts_the_system_roots_beside_the_ca_file(
        tmp_path: Path, dns, ca, https, peer_for, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PYMTA_SMTP_TLS_CA_FILE`` set for a private relay must not make every MX with an
    ``enforce`` policy untrusted: MTA-STS is the web PKI (RFC 8461 §4.2), so the system's
    roots (here the test CA, through OpenSSL's ``SSL_CERT_FILE``) count as well."""
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.root_file))
    private = TestCA(tmp_path / "private")
    https.policies["mta-sts.enforced.test"] = policy("enforce", "mx.enforced.test")
    port, recorder = peer_for(*ca.write("mx", ("mx.enforced.test",)))
    config = make_config(tmp_path, dns_resolver=(dns.resolver_spec,), mx_port=port,
                         smtp_connect_timeout=5.0, smtp_timeout=20.0,
                         smtp_tls_ca_file=str(private.root_file), queue_retry_first=30.0,
                         queue_retry_max=60.0, connection_cache_time=0.0)
    async with MTA(config) as mta:
        _relay(mta).mta_sts.https_port = https.port
        await _delivered(mta, "bob@enforced.test")
    assert recorder.received == [["bob@enforced.test"]]
