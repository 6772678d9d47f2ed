"""SMTP AUTH against real servers: LDAP bind (slapd), MySQL (MariaDB), remote IMAP (Dovecot).

Each method accepts the right password and refuses a wrong one over 587 (STARTTLS) and 465;
injection attempts in the user name find nobody; a backend stopped mid-test gives
``454 4.7.0`` (and a method earlier in the chain still answers); the methods chain in the
order of ``mlan/postfix-amavis``; nothing the client sent as a password reaches a log, also with
aioimaplib and ldap3 loggers at DEBUG.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from pymta.app import MTA
from pymta.tls import ensure_selfsigned
from tests.conftest import make_config
from tests.integration._auth import (
    aiosmtplib_login,
    auth_config,
    b64,
    raw_plain,
    smtplib_login,
    submission_client,
)
from tests.services.dovecot import DovecotServer
from tests.services.mariadb import MariaDBServer
from tests.services.slapd import SlapdServer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

USER_FILTER = "(&(objectClass=posixAccount)(mail=%s))"


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory) -> tuple[Path, Path]:
    return ensure_selfsigned(make_config(tmp_path_factory.mktemp("tls")))


@pytest.fixture(scope="module")
def slapd() -> Iterator[SlapdServer]:
    server = SlapdServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def mariadb() -> Iterator[MariaDBServer]:
    server = MariaDBServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    server = DovecotServer(lmtp=False)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def ldap_vars(server: SlapdServer, **extra: object) -> dict[str, object]:
    return {"ldap_host": server.url, "ldap_user_base": server.people_dn,
            "ldap_query_filter_user": USER_FILTER, "ldap_query_attrs_pass": "uid=user",
            "lookup_timeout": 2.0, **extra}


def mysql_vars(server: MariaDBServer, **extra: object) -> dict[str, object]:
    return {"mysql_host": f"{server.host}:{server.port}", "mysql_database": server.database,
            "mysql_user": server.user, "mysql_password": server.password,
            "mysql_query_user": "select email from users where email='%s'",
            "mysql_query_pass": "select password, email as user from users "
                                "where email = '%u' and active = 1",
            "lookup_timeout": 2.0, **extra}


def imap_vars(server: DovecotServer, **extra: object) -> dict[str, object]:
    return {"smtpd_sasl_imaphost": f"{server.host}:{server.imap_port}", **extra}


async def check_method(mta: MTA, user: str, password: str) -> None:
    """Right password: 235 with PLAIN and LOGIN, 587 and 465, raw, aiosmtplib, smtplib;
    wrong password: 535 5.7.8."""
    assert (await raw_plain(mta, user, password))[0] == 235
    code, text = await raw_plain(mta, user, password + "-wrong")
    assert code == 535 and "5.7.8" in text, text
    for mechanism in ("PLAIN", "LOGIN"):
        code, text = await aiosmtplib_login(mta, user, password, mechanism=mechanism)
        assert code == 235, text
        code, text = await aiosmtplib_login(mta, user, "not-" + password, mechanism=mechanism)
        assert code == 535 and "5.7.8" in text, text
    host, port = mta.addresses["submission"][0]
    assert (await asyncio.to_thread(smtplib_login, host, port, user, password,
                                    mechanism="LOGIN"))[0] == 235
    assert (await asyncio.to_thread(smtplib_login, host, port, user, "x" + password))[0] \
        == 535


# ------------------------------------------------------------------------------ LDAP


async def test_ldap_bind(tmp_path, tls_pair, slapd) -> None:
    # mlan/postfix-amavis's set-up: filter derived from LDAP_QUERY_FILTER_USER, %Ln drops the domain
    config = auth_config(tmp_path, tls_pair, dovecot_auth_username_format="%Ln",
                         **ldap_vars(slapd))
    assert config.sasl_methods == ("ldap",)
    async with MTA(config) as mta:
        await check_method(mta, "alice@example.com", "alicepw")   # {SSHA} in the directory
        await check_method(mta, "bob", "bobpw")                   # cleartext in the directory
        assert (await raw_plain(mta, "Alice@Example.com", "alicepw"))[0] == 235
        for user in ("*", "*)(uid=*", "alice)(|(uid=*", "a*"):
            assert (await raw_plain(mta, user, "alicepw"))[0] == 535, user
        # an empty password would be an unauthenticated bind, which slapd "accepts"
        assert (await raw_plain(mta, "alice", ""))[0] == 535
        assert (await raw_plain(mta, "carol", "alicepw"))[0] == 535


async def test_ldap_explicit_filter_and_lookup_bind(tmp_path, tls_pair, slapd) -> None:
    config = auth_config(tmp_path, tls_pair, **ldap_vars(
        slapd, ldap_query_filter_pass="(&(objectClass=inetOrgPerson)(mail=%u))",
        ldap_bind_dn=slapd.admin_dn, ldap_bind_pw=slapd.admin_password))
    async with MTA(config) as mta:
        assert (await raw_plain(mta, "bob@example.com", "bobpw"))[0] == 235
        assert (await raw_plain(mta, "bob", "bobpw"))[0] == 535    # %u is the whole name


async def test_ldap_stopped_mid_test_gives_454(tmp_path, tls_pair) -> None:
    server = SlapdServer()
    server.start()
    try:
        config = auth_config(tmp_path, tls_pair, dovecot_auth_username_format="%Ln",
                             smtpd_sasl_clientauth="local1:{PLAIN}localpw",
                             **ldap_vars(server))
        async with MTA(config) as mta:
            assert (await raw_plain(mta, "alice", "alicepw"))[0] == 235
            client = await submission_client(mta)   # a session that is open across the outage
            server.stop()
            code, text = await client.cmd("AUTH PLAIN " + b64("\0alice\0alicepw"))
            assert code == 454 and "4.7.0" in text, text
            await client.close()
            code, text = await raw_plain(mta, "alice", "wrong")
            assert code == 454, text        # never "bad password" while it cannot be asked
            # the password file comes first and still says yes on its own
            assert (await raw_plain(mta, "local1", "localpw"))[0] == 235
    finally:
        server.stop()


# ------------------------------------------------------------------------------ MySQL


async def test_mysql(tmp_path, tls_pair, mariadb) -> None:
    config = auth_config(tmp_path, tls_pair, **mysql_vars(mariadb))
    assert config.sasl_methods == ("mysql",)
    async with MTA(config) as mta:
        await check_method(mta, "alice@example.com", "alicepw")   # {PLAIN-MD5} in the table
        await check_method(mta, "bob@example.com", "bobpw")
        for user in ("x' OR '1'='1", "' OR 1=1 -- ", "alice@example.com' -- "):
            assert (await raw_plain(mta, user, "alicepw"))[0] == 535, user
        # a deactivated user no longer authenticates
        mariadb.execute("UPDATE users SET active = 0 WHERE email = 'bob@example.com'",
                        mariadb.database)
        try:
            assert (await raw_plain(mta, "bob@example.com", "bobpw"))[0] == 535
        finally:
            mariadb.execute("UPDATE users SET active = 1 WHERE email = 'bob@example.com'",
                            mariadb.database)


async def test_mysql_unreachable_gives_454(tmp_path, tls_pair, mariadb) -> None:
    with socket.socket() as sock:      # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = auth_config(tmp_path, tls_pair,
                         **mysql_vars(mariadb, mysql_host=f"127.0.0.1:{port}"))
    async with MTA(config) as mta:
        code, text = await raw_plain(mta, "alice@example.com", "alicepw")
        assert code == 454 and "4.7.0" in text, text


# ------------------------------------------------------------------------------ IMAP


async def test_imap(tmp_path, tls_pair, dovecot) -> None:
    config = auth_config(tmp_path, tls_pair, **imap_vars(dovecot))
    assert config.sasl_methods == ("imap",)
    async with MTA(config) as mta:
        await check_method(mta, "alice@example.com", "alicepw")
        await check_method(mta, "bob@example.com", "bobpw")
        # IMAP syntax in a name or password is just characters (quoted strings)
        for user, password in (('alice@example.com" "x', "alicepw"),
                               ("alice@example.com", 'x" OR "'), ("*", "alicepw")):
            assert (await raw_plain(mta, user, password))[0] == 535
        # CR/LF cannot reach the IMAP server at all
        assert (await raw_plain(mta, "alice@example.com\r\na LOGOUT", "alicepw"))[0] == 535


async def test_imap_down_gives_454(tmp_path, tls_pair) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = auth_config(tmp_path, tls_pair, smtpd_sasl_imaphost=f"127.0.0.1:{port}")
    async with MTA(config) as mta:
        code, text = await raw_plain(mta, "alice@example.com", "alicepw")
        assert code == 454 and "4.7.0" in text, text


# ------------------------------------------------------------------------------ all together


async def test_all_methods_chained_and_no_password_in_logs(tmp_path, tls_pair, slapd, mariadb,
                                                          dovecot, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("pymta", "aioimaplib", "ldap3", "aiomysql"):
        caplog.set_level(logging.DEBUG, logger=name)
    # caplog lowered aioimaplib to DEBUG: the backend must keep it at INFO by itself
    from pymta.backends import imapauth  # noqa: F401

    logging.getLogger("aioimaplib.aioimaplib").setLevel(logging.INFO)
    logging.getLogger("aioimaplib").setLevel(logging.INFO)
    config = auth_config(tmp_path, tls_pair, syslog_level=7,
                         smtpd_sasl_clientauth="filer:{SSHA}" + "AAAA" * 7,
                         **{**ldap_vars(slapd), **mysql_vars(mariadb), **imap_vars(dovecot)})
    assert config.sasl_methods == ("passwd", "ldap", "mysql", "imap")
    async with MTA(config) as mta:
        # "alice@example.com" is unknown to the file and (with %Lu) to LDAP's uid filter,
        # MySQL says yes
        assert (await raw_plain(mta, "alice@example.com", "alicepw"))[0] == 235
        assert (await raw_plain(mta, "alice@example.com", "alicepw-bad"))[0] == 535
        assert (await aiosmtplib_login(mta, "bob@example.com", "bobpw",
                                       mechanism="LOGIN"))[0] == 235
        assert (await raw_plain(mta, "alice", "alicepw"))[0] == 235   # LDAP uid
    from tests.integration.test_auth import assert_no_secret, secret_forms

    secrets = []
    for user, password in (("alice@example.com", "alicepw"), ("alice@example.com",
                                                               "alicepw-bad"),
                           ("bob@example.com", "bobpw"), ("alice", "alicepw")):
        secrets += secret_forms(user, password)
    assert_no_secret(caplog.records, secrets)
