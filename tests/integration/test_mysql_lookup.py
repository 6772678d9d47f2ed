"""MySQL recipient lookup against a real MariaDB (issue 5).

``mlan/postfix-amavis``'s quoted ``'%s'`` queries run as bound parameters: SQL injection finds
nothing; users and aliases (including comma lists) resolve; a database stopped mid-test gives
``451 4.3.0`` over SMTP while mail accepted before is delivered; the cache saves real queries
(counted by the server's own ``Com_select`` status counter); the pool closes when the MTA
stops.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pymta.app import MTA
from pymta.backends.chain import LookupChain
from pymta.backends.mysql import MysqlLookup, MysqlSettings
from pymta.types import Address, Destination, Target, TemporaryFailure
from tests.conftest import RawClient, make_config, wait_for
from tests.integration._support import mbox_bytes
from tests.services.base import free_port
from tests.services.mariadb import MariaDBServer

QUERY_USER = "select email from users where email='%s' and active=1 limit 1;"
QUERY_ALIAS = "select goto from aliases where alias='%s'"
DOMAINS = ("example.com",)


@pytest.fixture(scope="module")
def database() -> Iterator[MariaDBServer]:
    server = MariaDBServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def settings(server: MariaDBServer, **overrides: object) -> MysqlSettings:
    base = {
        "host": f"{server.host}:{server.port}", "database": server.database,
        "user": server.user, "password": server.password, "query_user": QUERY_USER,
        "query_alias": QUERY_ALIAS, "timeout": 2.0,
    }
    base.update(overrides)
    return MysqlSettings(**base)  # type: ignore[arg-type]


def mailbox(address: str) -> Target:
    return Target(address, True, address)


def com_select(server: MariaDBServer) -> int:
    """SELECT statements the server executed (global status counter, read as root)."""
    ((_, value),) = server.execute("SHOW GLOBAL STATUS LIKE 'Com_select'")
    return int(value)


async def test_users_and_aliases(database: MariaDBServer) -> None:
    sql = MysqlLookup(settings(database))
    chain = LookupChain([sql], DOMAINS)
    try:
        alice = Destination((mailbox("alice@example.com"),))
        assert await chain.lookup(Address("alice@example.com")) == alice
        assert await chain.lookup(Address("postmaster@example.com")) == alice
        assert await chain.lookup(Address("robert@example.com")) == \
            Destination((mailbox("bob@example.com"),))
        assert await chain.lookup(Address("list@example.com")) == \
            Destination((mailbox("alice@example.com"), mailbox("bob@example.com")))
        assert await chain.lookup(Address("nobody@example.com")) is None
    finally:
        await chain.aclose()


async def test_local_part_and_domain_placeholders(database: MariaDBServer) -> None:
    query = "select email from users where email = concat('%u', '@', '%d')"
    sql = MysqlLookup(settings(database, query_user=query, query_alias=""))
    try:
        assert await sql.lookup(Address("bob@EXAMPLE.com")) == \
            Destination((Target("bob@EXAMPLE.com", True, "bob@example.com"),))
    finally:
        await sql.aclose()


@pytest.mark.parametrize("evil", [
    "x' OR '1'='1@example.com",
    "' OR 1=1 -- @example.com",
    "x'; DROP TABLE users; --@example.com",
    "\\' OR 1=1 #@example.com",
    "%@example.com",
    "x' UNION SELECT email FROM users WHERE '1'='1@example.com",
])
async def test_injection_finds_nothing(database: MariaDBServer, evil: str) -> None:
    sql = MysqlLookup(settings(database))
    try:
        assert await LookupChain([sql], DOMAINS).lookup(Address(evil)) is None
        local_query = "select email from users where email = concat('%u', '@', '%d')"
        parts = MysqlLookup(settings(database, query_user=local_query, query_alias=""))
        assert await parts.lookup(Address(evil)) is None
        await parts.aclose()
    finally:
        await sql.aclose()
    assert database.execute("SELECT COUNT(*) FROM users", "mailtest") == [("2",)]


def test_control_naive_substitution_would_have_matched(database: MariaDBServer) -> None:
    """The injection cases have teeth: spliced into the SQL text, one matches every user."""
    spliced = QUERY_USER.replace("%s", "' OR 1=1 -- @example.com")
    assert ("alice@example.com",) in database.execute(spliced, "mailtest")


async def test_cache_hit_sends_no_second_query(database: MariaDBServer) -> None:
    sql = MysqlLookup(settings(database))
    chain = LookupChain([sql], DOMAINS, ttl=60, negative_ttl=30)
    try:
        before = com_select(database)
        await chain.lookup(Address("bob@example.com"))
        await chain.lookup(Address("ghost@example.com"))
        first = sql.queries
        assert first == 4                  # alias + user query for each address
        assert com_select(database) - before == first
        for _ in range(10):
            await chain.lookup(Address("Bob@Example.com"))
            await chain.lookup(Address("ghost@example.com"))
        assert sql.queries == first
        assert com_select(database) - before == first
        assert chain.hits == 20
    finally:
        await chain.aclose()


async def test_unreachable_database_is_temporary() -> None:
    sql = MysqlLookup(MysqlSettings(host=f"127.0.0.1:{free_port()}", database="x",
                                    query_user=QUERY_USER, timeout=1.0))
    try:
        with pytest.raises(TemporaryFailure) as info:
            await LookupChain([sql], DOMAINS).lookup(Address("alice@example.com"))
        assert info.value.reply.code == 451 and info.value.reply.enhanced == "4.3.0"
    finally:
        await sql.aclose()


async def test_wrong_password_is_temporary(database: MariaDBServer) -> None:
    sql = MysqlLookup(settings(database, password="wrong"))
    try:
        with pytest.raises(TemporaryFailure):
            await sql.lookup(Address("alice@example.com"))
    finally:
        await sql.aclose()


async def _session(mta: MTA) -> RawClient:
    host, port = mta.addresses["smtp"][0]
    client = await RawClient.connect(host, port)
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.example.net"))[0] == 250
    return client


async def test_database_stopped_mid_test_gives_451_and_keeps_accepted_mail(
        tmp_path: Path) -> None:
    server = MariaDBServer()
    server.start()
    config = make_config(tmp_path)
    sql = MysqlLookup(settings(server))
    chain = LookupChain([sql], config.mail_domain)
    try:
        async with MTA(config, lookups=[chain]) as mta:
            client = await _session(mta)
            assert (await client.cmd("MAIL FROM:<sender@example.net>"))[0] == 250
            assert (await client.cmd("RCPT TO:<postmaster@example.com>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            code, text = await client.cmd(b"Subject: before\r\n\r\naccepted before\r\n.\r\n")
            assert code == 250, text

            server.stop()   # the database goes away mid-test (pooled connections die)

            assert (await client.cmd("MAIL FROM:<sender@example.net>"))[0] == 250
            code, text = await client.cmd("RCPT TO:<bob@example.com>")
            assert code == 451 and "4.3.0" in text, text
            code, text = await client.cmd("RCPT TO:<nobody@example.com>")
            assert code == 451, text
            await client.cmd("QUIT")
            await client.close()

            boxes = await wait_for(lambda: mbox_bytes(config.mail_dir, "alice@example.com"))
            assert len(boxes) == 1 and b"accepted before" in boxes[0]
            assert sql.pool.is_open
        assert not sql.pool.is_open       # MTA.stop closed the pool
    finally:
        server.stop()
