"""SMTP AUTH building blocks without sockets: Dovecot password schemes, user-name formats,
the SASL variables, LDAP/MySQL templates, the method chain, the failure throttle, MYNETWORKS."""

from __future__ import annotations

import asyncio
import hmac

import pytest

from pymta.backends.authchain import AuthChain
from pymta.backends.ldapauth import expand_pass_filter, pass_filter, user_attribute
from pymta.backends.mysqlauth import compile_pass_query
from pymta.backends.passwd import (
    HASH_SCHEMES,
    PasswordFile,
    format_username,
    hash_password,
    parse_clientauth,
    verify_password,
)
from pymta.config import load as load_mod
from pymta.config.errors import ConfigError
from pymta.config.load import load_config
from pymta.receiving.auth import AuthThrottle
from pymta.receiving.session import network_matcher
from pymta.types import ConnInfo, Identity, TemporaryFailure
from pymta.wiring import build_authenticator
from tests.conftest import load_checked

CONN = ConnInfo("192.0.2.1", 1234, "c.test", tls=True)

# Made by `doveadm pw -s SCHEME -p 'pässwörd x'` (Dovecot 2.3, Debian 12).
DOVEADM = {
    "SHA512-CRYPT": "{SHA512-CRYPT}$6$3PZxB1/YxqQ8cSU1$/1ifLLx2BrPCvMiY2o7UbzWKiSnIm1lvw3E2NtHhzg"
                    "WBSLjThJ9rr7/GvvjdW8iTfUQzb7hPxfHYVVM/3zZjn.",
    "ARGON2ID": "{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$9945trwEelkqrLAwPLZ7Mg$GXRl7zHRmwTzeuj8"
                "w7hADiTX605hIm7AEYsvv4LAk9s",
    "SSHA512": "{SSHA512}//VxzaRHqbhQhTUVnpgfekaBPPBQ1jjFlE7eyUHCyZAkwrodyHEoGTa2B+XNKU9inQUeu3B"
               "7b6jG1AJwk0TOg/7YHI8=",
    "SSHA": "{SSHA}7J37FEgPX3G0XThpU4FO1kH1NQLV7k1p",
    "SHA256": "{SHA256}LXEWQrcmsEQBYnyp+6wy9chTD7GQPMTbAiWHF5IaSIE=",
    "PLAIN-MD5": "{PLAIN-MD5}9dd4e461268c8034f5c8564e155c67a6",
    "BLF-CRYPT": "{BLF-CRYPT}$2y$05$rySHy3FgOXjGUoYfPs7f..e54aPRS2/4ohY4XBmIrnrhTeszOkQzK",
}


@pytest.mark.parametrize("scheme", sorted(DOVEADM))
def test_doveadm_hashes_verify(scheme):
    assert verify_password("x", DOVEADM[scheme])
    assert not verify_password("y", DOVEADM[scheme])


@pytest.mark.parametrize("scheme", [s for s in HASH_SCHEMES
                                    if s not in ("SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT")])
def test_hash_round_trip(scheme):
    stored = hash_password("pässwörd", scheme)
    assert stored.startswith("{" + scheme + "}")
    assert verify_password("pässwörd", stored)
    assert not verify_password("pässword", stored)


def test_scheme_names_fold_case_and_default_to_crypt():
    assert verify_password("passwd1", "{plain}passwd1")   # mlan/postfix-amavis's example
    assert verify_password("x", "{cleartext}x")
    md5crypt = hash_password("x", "MD5-CRYPT").removeprefix("{MD5-CRYPT}")
    assert verify_password("x", md5crypt)                  # no {…}: CRYPT
    assert verify_password("x", "{MD5}" + md5crypt)        # Dovecot's MD5 is MD5-CRYPT
    assert not verify_password("x", "{PBKDF2}whatever")
    assert not verify_password("x", "{SSHA}!!!")
    assert not verify_password("x", "{SHA512-CRYPT}garbage")
    assert not verify_password("", "{PLAIN}x")


def test_plain_md5_accepts_base64_as_dovecot():
    assert verify_password("x", "{PLAIN-MD5}ndTkYSaMgDT1yFZOFVxnpg==")


def test_username_formats():
    assert format_username("Alice@Example.COM", "%Ln") == "alice"
    assert format_username("Alice@Example.COM", "%Lu") == "alice@example.com"
    assert format_username("Alice@Example.COM", "%u") == "Alice@Example.COM"
    assert format_username("Alice", "%n@%Ld") == "Alice@"
    assert format_username("a", "100%%") == "100%"


def test_clientauth_parsing_never_shows_secrets():
    entries = parse_clientauth("client1:{plain}passwd1 client2:{SHA256}abc=  ")
    assert entries == {"client1": "{plain}passwd1", "client2": "{SHA256}abc="}
    for bad in ("client1", "client1:", ":{plain}topsecret", "u:{NOPE}topsecret",
                "u:{plain}a u:{plain}topsecret"):
        with pytest.raises(ConfigError) as info:
            parse_clientauth(bad)
        assert "topsecret" not in str(info.value)
        assert str(info.value).startswith("SMTPD_SASL_CLIENTAUTH: ")


async def test_password_file_and_cram_md5():
    pf = PasswordFile.from_text("alice:{PLAIN}s3cret bob:" + hash_password("pw", "SSHA"))
    assert await pf.authenticate("alice", "s3cret", CONN) == Identity("alice")
    assert await pf.authenticate("alice", "nope", CONN) is None
    assert await pf.authenticate("carol", "s3cret", CONN) is None
    assert await pf.authenticate("bob", "pw", CONN) == Identity("bob")
    assert not pf.supports_cram_md5
    plain = PasswordFile.from_text("alice:{PLAIN}s3cret")
    assert plain.supports_cram_md5
    challenge = "<1.2@mx.test>"
    digest = hmac.new(b"s3cret", challenge.encode(), "md5").hexdigest()
    assert await plain.authenticate_cram_md5("alice", challenge, digest, CONN) == \
        Identity("alice")
    assert await plain.authenticate_cram_md5("alice", challenge, "0" * 32, CONN) is None


async def test_slow_hash_does_not_block_the_loop():
    pf = PasswordFile.from_text("u:" + hash_password("pw", "BLF-CRYPT"))
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(ticker())
    assert await pf.authenticate("u", "pw", CONN) == Identity("u")
    task.cancel()
    assert ticks >= 5   # bcrypt cost 12 takes ~0.2 s; the loop kept running meanwhile


# ------------------------------------------------------------------------------ LDAP / MySQL


def test_ldap_pass_filter_derivation_and_escaping():
    assert user_attribute("uid=user") == "uid"
    assert user_attribute("uid=user,userPassword=password") == "uid"
    with pytest.raises(ConfigError, match="LDAP_QUERY_ATTRS_PASS"):
        user_attribute("uid")
    derived = pass_filter("uid=user", "", "(&(objectclass=posixAccount)(mail=%s))")
    assert derived == "(&(objectclass=posixAccount)(uid=%u))"
    assert pass_filter("uid=user", "(cn=%n)", "") == "(cn=%n)"
    with pytest.raises(ConfigError, match="LDAP_QUERY_FILTER_PASS"):
        pass_filter("uid=user", "", "(&(objectclass=x)(uid=%s))")
    with pytest.raises(ConfigError, match="LDAP_QUERY_FILTER_PASS"):
        pass_filter("uid=user", "(uid=%x)", "")
    assert expand_pass_filter(derived, "*)(uid=*") == \
        "(&(objectclass=posixAccount)(uid=\\2a\\29\\28uid=\\2a))"
    assert expand_pass_filter("(&(uid=%n)(dc=%d))", "a@b.c") == "(&(uid=a)(dc=b.c))"


def test_mysql_pass_query_is_parameterised():
    q = compile_pass_query("select password, userid as user from users where userid = '%u'")
    assert q.sql == "select password, userid as user from users where userid = %s"
    assert q.args("x' OR '1'='1") == ("x' OR '1'='1",)
    q2 = compile_pass_query('select p from t where n="%Ln" and d=%d and x like \'a%%\';')
    assert q2.sql == "select p from t where n=%s and d=%s and x like 'a%%'"
    assert q2.args("Bob@Example.com") == ("bob", "Example.com")
    for bad in ("select 1", "select p from t where u='%q'", "select %"):
        with pytest.raises(ConfigError, match="MYSQL_QUERY_PASS"):
            compile_pass_query(bad)


# ------------------------------------------------------------------------------ the chain


class Fake:
    def __init__(self, answer, cram=False):
        self.answer = answer
        self.supports_cram_md5 = cram
        self.seen: list[str] = []

    async def authenticate(self, username, password, conn):
        self.seen.append(username)
        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer

    async def authenticate_cram_md5(self, username, challenge, digest, conn):
        return await self.authenticate(username, digest, conn)


async def test_chain_first_yes_wins_and_normalises_once():
    no, yes, later = Fake(None), Fake(Identity("alice")), Fake(Identity("other"))
    chain = AuthChain([no, yes, later], "%Ln")
    assert await chain.authenticate("Alice@Example.com", "pw", CONN) == Identity("alice")
    assert no.seen == ["alice"] and yes.seen == ["alice"] and later.seen == []


async def test_chain_backend_down_is_temporary_unless_another_says_yes():
    down = Fake(TemporaryFailure("x", "4.7.0", 454))
    with pytest.raises(TemporaryFailure) as info:
        await AuthChain([down, Fake(None)]).authenticate("a", "b", CONN)
    assert info.value.reply.code == 454 and info.value.reply.enhanced == "4.7.0"
    assert await AuthChain([down, Fake(Identity("a"))]).authenticate("a", "b", CONN) == \
        Identity("a")
    broken = Fake(RuntimeError("bug"))
    with pytest.raises(TemporaryFailure):
        await AuthChain([broken]).authenticate("a", "b", CONN)
    assert await AuthChain([Fake(None), Fake(None)]).authenticate("a", "b", CONN) is None


async def test_chain_timeout_is_temporary():
    class Slow:
        async def authenticate(self, *a):
            await asyncio.sleep(10)

    with pytest.raises(TemporaryFailure):
        await AuthChain([Slow()], timeout=0.05).authenticate("a", "b", CONN)


def test_cram_md5_only_when_every_method_can():
    assert AuthChain([Fake(None, cram=True)]).supports_cram_md5
    assert not AuthChain([Fake(None, cram=True), Fake(None)]).supports_cram_md5


# ------------------------------------------------------------------------------ configuration


@pytest.fixture
def _fqdn(monkeypatch):
    monkeypatch.setattr(load_mod, "_host_fqdn", lambda: "mx1.example.net")


BASE = {"MAIL_DOMAIN": "example.com"}


@pytest.mark.usefixtures("_fqdn")
def test_methods_follow_from_the_variables():
    assert load_config(BASE).sasl_methods == ()
    cfg = load_config({**BASE, "SMTPD_SASL_CLIENTAUTH": "c1:{plain}p1",
                       "SMTPD_SASL_IMAPHOST": "app:1143",
                       "LDAP_HOST": "auth", "LDAP_USER_BASE": "ou=people,dc=example,dc=com",
                       "LDAP_QUERY_FILTER_USER": "(&(objectclass=posixAccount)(mail=%s))",
                       "LDAP_QUERY_ATTRS_PASS": "uid=user",
                       "MYSQL_HOST": "db", "MYSQL_DATABASE": "postfix",
                       "MYSQL_QUERY_USER": "select mail from users where mail='%s'",
                       "MYSQL_QUERY_PASS": "select password from users where userid='%u'",
                       "DOVECOT_AUTH_USERNAME_FORMAT": "%Ln"})
    assert cfg.sasl_methods == ("passwd", "ldap", "mysql", "imap")
    assert cfg.dovecot_auth_username_format == "%Ln"
    chain = build_authenticator(cfg)
    assert [m.name for m in chain.methods] == ["passwd", "ldap", "mysql", "imap"]
    # LDAP_QUERY_ATTRS_PASS alone (no LDAP_HOST) activates nothing, as in mlan/postfix-amavis
    assert load_config({**BASE, "LDAP_QUERY_ATTRS_PASS": "uid=user"}).sasl_methods == ()
    assert "topsecret" not in repr(load_config({**BASE,
                                                "SMTPD_SASL_CLIENTAUTH": "a:{plain}topsecret"}))


@pytest.mark.usefixtures("_fqdn")
@pytest.mark.parametrize("env, var", [
    ({"SMTPD_SASL_CLIENTAUTH": "nocolon"}, "SMTPD_SASL_CLIENTAUTH"),
    ({"SMTPD_SASL_IMAPHOST": "app:notaport"}, "SMTPD_SASL_IMAPHOST"),
    ({"DOVECOT_AUTH_USERNAME_FORMAT": "%Lx"}, "DOVECOT_AUTH_USERNAME_FORMAT"),
    ({"MYNETWORKS": "10.0.0.0/8 not-a-net"}, "MYNETWORKS"),
    ({"MYNETWORKS": "10.0.0.0/33"}, "MYNETWORKS"),
    ({"LDAP_HOST": "auth", "LDAP_USER_BASE": "dc=x", "LDAP_QUERY_FILTER_USER": "(uid=%s)",
      "LDAP_QUERY_ATTRS_PASS": "uid=user"}, "LDAP_QUERY_FILTER_PASS"),
    ({"MYSQL_HOST": "db", "MYSQL_DATABASE": "d", "MYSQL_QUERY_USER": "select 1 where a='%s'",
      "MYSQL_QUERY_PASS": "select password from users"}, "MYSQL_QUERY_PASS"),
])
def test_bad_sasl_variables_name_the_variable(env, var):
    with pytest.raises(ConfigError) as info:
        load_checked({**BASE, **env})
    assert str(info.value).startswith(var)


@pytest.mark.usefixtures("_fqdn")
def test_mynetworks():
    assert load_config(BASE).mynetworks == ()
    cfg = load_config({**BASE, "MYNETWORKS": "127.0.0.0/8, 10.1.2.3 [::1]/128 192.168.1.7/24"})
    assert cfg.mynetworks == ("127.0.0.0/8", "10.1.2.3/32", "::1/128", "192.168.1.0/24")
    allowed = network_matcher(cfg.mynetworks)
    assert allowed("127.0.0.1") and allowed("10.1.2.3") and allowed("::1")
    assert allowed("::ffff:192.168.1.200")
    assert not allowed("10.1.2.4") and not allowed("192.0.2.1") and not allowed("garbage")
    assert not network_matcher(())("127.0.0.1")


def test_throttle_grows_per_address_and_is_capped():
    t = AuthThrottle(step=0.5, maximum=2.0)
    assert [t.failed("192.0.2.1") for _ in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert t.failed("192.0.2.2") == 0.5
    small = AuthThrottle(max_entries=2)
    for ip in ("a", "b", "c"):
        small.failed(ip)
    assert small.failures("a") == 0 and small.failures("c") == 1
    forgetful = AuthThrottle(forget=0.0)
    forgetful.failed("x")
    assert forgetful.failed("x") == 0.5 or forgetful.failures("x") <= 2


async def test_review_cram_md5_after_a_reload_dropped_plain_secrets_is_a_535() -> None:
    """Issue 13 review: CRAM-MD5 is advertised from the users at start; a SIGHUP that gives
    users whose secrets are hashes cannot check it any more. The client gets a 535 (not an
    exception from the authenticator, seen as 454)."""
    from pymta.receiving.auth import AuthPolicy
    from pymta.smtp import events as ev

    policy = AuthPolicy(PasswordFile.from_text("alice:{PLAIN}s3cret"), timeout=5,
                        throttle=AuthThrottle(0, 0))
    assert "CRAM-MD5" in policy.mechanisms
    # the reload added SMTPD_SASL_IMAPHOST: a chain whose IMAP method has no secrets at all
    policy.authenticator = build_authenticator(load_config(
        {**BASE, "SMTPD_SASL_CLIENTAUTH": "alice:{PLAIN}s3cret",
         "SMTPD_SASL_IMAPHOST": "127.0.0.1:9"}))
    challenge = "<1.2@mx.test>"
    digest = hmac.new(b"s3cret", challenge.encode(), "md5").hexdigest()
    result = await policy.check(ev.Auth("CRAM-MD5", "alice", digest, challenge=challenge),
                                CONN)
    assert result.reply.code == 535
