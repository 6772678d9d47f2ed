"""Session-scoped fixtures for the real services of ``tests/services`` (see its README.md).

Each service starts lazily, the first time a test requests its fixture, and is stopped at the
end of the session: every service is sent SIGTERM first and then all are waited for, so the
shutdowns overlap. Tests share one instance per fixture: a test that changes one (DNS records,
Postfix relayhost, SQL rows, LDAP entries) must set what it relies on itself, and should undo
changes others could trip over (``dns_zone`` resets the DNS records after each test).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.services import (
    ClamdServer,
    DNSTestServer,
    DovecotServer,
    HAProxy,
    MariaDBServer,
    PostfixPeer,
    RedisServer,
    RspamdServer,
    SlapdServer,
    SpamdServer,
    free_port,
)


class _Stopper:
    def __init__(self) -> None:
        self.services: list[Any] = []

    def started(self, service: Any) -> Any:
        self.services.append(service)
        return service


@pytest.fixture(scope="session")
def _service_stopper() -> Iterator[_Stopper]:
    stopper = _Stopper()
    yield stopper
    # the service fixtures already sent SIGTERM on their teardown; now wait for each (KILL late)
    for service in reversed(stopper.services):
        service.wait_stopped()


def _run(stopper: _Stopper, service: Any) -> Iterator[Any]:
    stopper.started(service.start())
    yield service
    service.terminate()


@pytest.fixture(scope="session")
def slapd(_service_stopper: _Stopper) -> Iterator[SlapdServer]:
    """OpenLDAP on ``slapd.url`` (ldap://127.0.0.1:3389 unless busy/moved)."""
    yield from _run(_service_stopper, SlapdServer())


@pytest.fixture(scope="session")
def mariadb(_service_stopper: _Stopper) -> Iterator[MariaDBServer]:
    """Own MariaDB on 127.0.0.1:13306 (+ ``mariadb.socket``), database ``mailtest``."""
    yield from _run(_service_stopper, MariaDBServer())


@pytest.fixture(scope="session")
def dovecot(_service_stopper: _Stopper) -> Iterator[DovecotServer]:
    """Dovecot IMAP 1143 (STARTTLS offered), LMTP 2424 + ``dovecot.lmtp_socket``."""
    yield from _run(_service_stopper, DovecotServer())


@pytest.fixture(scope="session")
def dns_server(_service_stopper: _Stopper) -> Iterator[DNSTestServer]:
    """In-process authoritative DNS; ``dns_server.resolver_spec`` = "127.0.0.1:PORT"."""
    yield from _run(_service_stopper, DNSTestServer())


@pytest.fixture
def dns_zone(dns_server: DNSTestServer) -> Iterator[DNSTestServer]:
    """``dns_server`` for one test: records and failures are reset to the default zone after."""
    yield dns_server
    dns_server.reset()


@pytest.fixture(scope="session")
def clamd(_service_stopper: _Stopper) -> Iterator[ClamdServer]:
    """ClamAV clamd on ``clamd.address`` (127.0.0.1:13310 unless busy/moved) and
    ``clamd.unix_address``; one test signature (``tests.services.clamd.DETECTED_AS``),
    StreamMaxLength 1 MiB."""
    yield from _run(_service_stopper, ClamdServer())


@pytest.fixture(scope="session")
def spamd(_service_stopper: _Stopper) -> Iterator[SpamdServer]:
    """SpamAssassin spamd on ``spamd.address`` (127.0.0.1:7830 unless busy/moved): shipped
    rules, ``--local``, ``--allow-tell`` with a Bayes database in its scratch dir."""
    yield from _run(_service_stopper, SpamdServer())


@pytest.fixture(scope="session")
def rspamd(_service_stopper: _Stopper, dns_server: DNSTestServer) -> Iterator[RspamdServer]:
    """rspamd (no redis) worker on ``rspamd.address`` (127.0.0.1:11333 unless busy/moved),
    controller on ``rspamd.controller`` (11334, password ``rspamd.password``); DNS goes to
    ``dns_server`` (its zone's SPF records count)."""
    yield from _run(_service_stopper, RspamdServer(nameserver=dns_server.resolver_spec))


@pytest.fixture(scope="session")
def redis_server(_service_stopper: _Stopper) -> Iterator[RedisServer]:
    """redis on ``redis_server.address`` (127.0.0.1:16379 unless busy/moved), nothing saved."""
    yield from _run(_service_stopper, RedisServer())


@pytest.fixture(scope="session")
def rspamd_bayes(_service_stopper: _Stopper, dns_server: DNSTestServer,
                 redis_server: RedisServer) -> Iterator[RspamdServer]:
    """A second rspamd whose Bayes keeps its tokens in ``redis_server``: learning works."""
    yield from _run(_service_stopper, RspamdServer(
        port=free_port(), controller_port=free_port(), nameserver=dns_server.resolver_spec,
        redis=redis_server.address))


@pytest.fixture(scope="session")
def postfix_peer(_service_stopper: _Stopper) -> Iterator[PostfixPeer]:
    """Plain Postfix peer on 127.0.0.1:10025: delivers example.net (rcpt@, other@) to maildirs,
    relays for 127.0.0.0/8 to ``relayhost`` (none until ``set_relayhost``)."""
    yield from _run(_service_stopper, PostfixPeer())


@pytest.fixture(scope="session")
def postfix_smarthost(_service_stopper: _Stopper) -> Iterator[PostfixPeer]:
    """Postfix smart host on 127.0.0.1:10587: relays only after AUTH (Dovecot SASL, users
    alice@example.com/alicepw, bob@example.com/bobpw), AUTH only after STARTTLS."""
    yield from _run(_service_stopper, PostfixPeer(smart_host=True))


@pytest.fixture(scope="session")
def postfix_factory(_service_stopper: _Stopper) -> Iterator[Callable[..., PostfixPeer]]:
    """``postfix_factory(**kwargs)`` -> a started ``PostfixPeer(**kwargs)`` of your own
    (e.g. ``port=``, ``smart_host=``, ``virtual_domains=``, ``mailboxes=``, ``relayhost=``,
    ``transport=``); stopped at the end of the session."""
    made: list[PostfixPeer] = []

    def make(**kwargs: Any) -> PostfixPeer:
        peer = PostfixPeer(**kwargs)
        made.append(_service_stopper.started(peer.start()))
        return peer

    yield make
    for peer in made:
        peer.terminate()


@pytest.fixture
def haproxy_factory() -> Iterator[Callable[[str], HAProxy]]:
    """``haproxy_factory("host:port")`` -> a started HAProxy sending the PROXY header to that
    backend (``port_v1``: ``send-proxy``, ``port_v2``: ``send-proxy-v2``); one per test, since
    its backend is the test's own server; stopped when the test ends."""
    made: list[HAProxy] = []

    def make(backend: str) -> HAProxy:
        proxy = HAProxy(backend)
        made.append(proxy)
        proxy.start()
        return proxy

    yield make
    for proxy in made:
        proxy.stop()
