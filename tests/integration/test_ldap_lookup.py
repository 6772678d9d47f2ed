"""LDAP recipient lookup against a real OpenLDAP slapd (issue 5).

Users, aliases (``mailLocalAddress``), posixGroup (``memberUid`` + LDAP_QUERY_FILTER_EXPAND)
and groupOfNames (``member`` DNs) expansion; RFC 4515 injection attempts; a directory that is
stopped or hangs gives ``451 4.3.0`` over SMTP while mail accepted before is delivered; the
lookup cache saves real searches (counted by slapd's own stats log and by the backend).
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymta.app import MTA
from pymta.backends.chain import LookupChain
from pymta.backends.ldap import LdapLookup, LdapSettings
from pymta.types import Address, Destination, Target, TemporaryFailure
from tests.conftest import RawClient, make_config, wait_for
from tests.integration._support import mbox_bytes
from tests.services.slapd import SlapdServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

USER = "(&(objectClass=posixAccount)(mail=%s))"
ALIAS = "(&(objectClass=posixAccount)(mailLocalAddress=%s))"
GROUP = "(|(&(objectClass=posixGroup)(cn=%u))(&(objectClass=groupOfNames)(cn=%u)))"
EXPAND = "(&(objectClass=posixAccount)(uid=%s))"
DOMAINS = ("example.com",)


@pytest.fixture(scope="module")
def directory() -> Iterator[SlapdServer]:
    server = SlapdServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def settings(server: SlapdServer, **overrides: object) -> LdapSettings:
    base = {
        "host": server.url, "user_base": server.people_dn, "filter_user": USER,
        "group_base": server.groups_dn, "filter_alias": ALIAS, "filter_group": GROUP,
        "filter_expand": EXPAND, "timeout": 2.0,
    }
    base.update(overrides)
    return LdapSettings(**base)  # type: ignore[arg-type]


def mailbox(address: str) -> Target:
    return Target(address, True, address)


def srch_count(server: SlapdServer) -> int:
    """Searches slapd itself logged (``-d 256`` stats: one ``SRCH base=`` line each)."""
    return len(re.findall(r" SRCH base=", (server.dir / "slapd.log").read_text()))


async def test_users_aliases_and_groups(directory: SlapdServer) -> None:
    ldap = LdapLookup(settings(directory))
    chain = LookupChain([ldap], DOMAINS)
    try:
        alice = Destination((mailbox("alice@example.com"),))
        assert await chain.lookup(Address("alice@example.com")) == alice
        assert await chain.lookup(Address("ALICE@Example.COM")) == alice   # cached, case-folded
        upper = await ldap.lookup(Address("ALICE@Example.COM"))            # the directory itself
        assert upper == Destination((Target("ALICE@Example.COM", True, "alice@example.com"),))
        assert await chain.lookup(Address("alice.alias@example.com")) == alice
        assert await chain.lookup(Address("postmaster@example.com")) == alice
        assert await chain.lookup(Address("robert@example.com")) == \
            Destination((mailbox("bob@example.com"),))
        both = Destination((mailbox("alice@example.com"), mailbox("bob@example.com")))
        assert await chain.lookup(Address("staff@example.com")) == both   # memberUid
        assert await chain.lookup(Address("list@example.com")) == both    # member DNs
        assert await chain.lookup(Address("nobody@example.com")) is None
    finally:
        await chain.aclose()


async def test_bind_dn_and_attribute_for_the_mailbox(directory: SlapdServer) -> None:
    ldap = LdapLookup(settings(directory, bind_dn=directory.admin_dn,
                               bind_pw=directory.admin_password, attrs_user="uid"))
    try:
        assert await ldap.lookup(Address("bob@example.com")) == \
            Destination((Target("bob@example.com", True, "bob"),))
    finally:
        await ldap.aclose()
    wrong = LdapLookup(settings(directory, bind_dn=directory.admin_dn, bind_pw="wrong"))
    try:
        with pytest.raises(TemporaryFailure):
            await wrong.lookup(Address("bob@example.com"))
    finally:
        await wrong.aclose()


@pytest.mark.parametrize("evil", [
    "*)(uid=*@example.com",
    "*@example.com",
    "alice@example.com)(mail=*",
    "*)(|(objectClass=*@example.com",
    "al*@example.com",
    "st*@example.com",          # %u in the group filter
    "\\2a@example.com",
])
async def test_injection_finds_nothing(directory: SlapdServer, evil: str) -> None:
    ldap = LdapLookup(settings(directory))
    try:
        assert await LookupChain([ldap], DOMAINS).lookup(Address(evil)) is None
    finally:
        await ldap.aclose()


async def test_alias_in_the_table_resolves_in_the_directory(directory: SlapdServer) -> None:
    from pymta.backends.table import TableLookup

    table = TableLookup.from_text(DOMAINS, "local@example.com:local/",
                                    "sales:robert,local", other_sources=True)
    ldap = LdapLookup(settings(directory))
    try:
        dest = await LookupChain([table, ldap], DOMAINS).lookup(Address("sales@example.com"))
        assert dest == Destination((mailbox("bob@example.com"),
                                    Target("local@example.com", True, "local/")))
    finally:
        await ldap.aclose()


async def test_cache_hit_sends_no_second_search(directory: SlapdServer) -> None:
    ldap = LdapLookup(settings(directory))
    chain = LookupChain([ldap], DOMAINS, ttl=60, negative_ttl=30)
    try:
        before = srch_count(directory)
        await chain.lookup(Address("bob@example.com"))
        await chain.lookup(Address("ghost@example.com"))
        first = ldap.queries
        assert first >= 2
        await wait_for(lambda: srch_count(directory) - before >= first, 5)
        for _ in range(10):
            await chain.lookup(Address("bob@example.com"))
            await chain.lookup(Address("GHOST@example.com"))
        await asyncio.sleep(0.3)  # give slapd time to log anything it received
        assert ldap.queries == first
        assert srch_count(directory) - before == first
        assert chain.hits == 20
    finally:
        await chain.aclose()


async def test_hanging_directory_times_out_without_blocking_the_loop() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)   # accepts TCP (backlog) but never answers a byte
    port = listener.getsockname()[1]
    ldap = LdapLookup(LdapSettings(host=f"127.0.0.1:{port}", user_base="dc=example,dc=com",
                                   filter_user=USER, timeout=0.5))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.ensure_future(ticker())
    try:
        started = time.monotonic()
        with pytest.raises(TemporaryFailure) as info:
            await ldap.lookup(Address("alice@example.com"))
        elapsed = time.monotonic() - started
        assert info.value.reply.code == 451 and info.value.reply.enhanced == "4.3.0"
        assert elapsed < 2.5
        assert ticks > elapsed / 0.01 / 4   # the event loop kept running meanwhile
    finally:
        task.cancel()
        await ldap.aclose()
        listener.close()


async def _session(mta: MTA) -> RawClient:
    host, port = mta.addresses["smtp"][0]
    client = await RawClient.connect(host, port)
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.example.net"))[0] == 250
    return client


async def test_directory_stopped_mid_test_gives_451_and_keeps_accepted_mail(
        tmp_path: Path) -> None:
    server = SlapdServer()
    server.start()
    config = make_config(tmp_path)
    ldap = LdapLookup(settings(server))
    chain = LookupChain([ldap], config.mail_domain)
    try:
        async with MTA(config, lookups=[chain]) as mta:
            client = await _session(mta)
            assert (await client.cmd("MAIL FROM:<sender@example.net>"))[0] == 250
            assert (await client.cmd("RCPT TO:<alice.alias@example.com>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            code, text = await client.cmd(b"Subject: before\r\n\r\naccepted before\r\n.\r\n")
            assert code == 250, text

            server.stop()   # the directory goes away mid-test

            assert (await client.cmd("MAIL FROM:<sender@example.net>"))[0] == 250
            code, text = await client.cmd("RCPT TO:<bob@example.com>")
            assert code == 451 and "4.3.0" in text, text
            code, text = await client.cmd("RCPT TO:<nobody@example.com>")
            assert code == 451, text           # unknown is never claimed while it is down
            assert (await client.cmd("RSET"))[0] == 250
            await client.cmd("QUIT")
            await client.close()

            boxes = await wait_for(lambda: mbox_bytes(config.mail_dir, "alice@example.com"))
            assert len(boxes) == 1 and b"accepted before" in boxes[0]
        assert ldap._executor is None     # MTA.stop closed the lookup's threads and pool
    finally:
        server.stop()
