"""LDAP filter escaping (RFC 4515) and SQL templates as bound parameters (issue 5)."""

from __future__ import annotations

import pytest
from ldap3.operation.search import MATCH_EQUAL, parse_filter
from ldap3.utils.conv import ldap_escape_to_bytes

from pymta.backends.ldap import _check_filter, expand_filter, parse_ldap_host
from pymta.backends.mysql import compile_query, parse_mysql_host
from pymta.config.errors import ConfigError
from pymta.config.load import load_config
from tests.conftest import load_checked

USER = "(&(objectClass=posixAccount)(mail=%s))"


def fill(template: str, address: str) -> str:
    local, _, domain = address.rpartition("@")
    return expand_filter(template, "LDAP_QUERY_FILTER_USER", full=address, local=local,
                         domain=domain)


def test_plain_address_is_substituted() -> None:
    assert fill(USER, "alice@example.com") == \
        "(&(objectClass=posixAccount)(mail=alice@example.com))"


@pytest.mark.parametrize("evil", [
    "*)(uid=*@example.com",
    "*@example.com",
    "a)(|(mail=*@example.com",
    "x\\2a@example.com",
    "nul\x00byte@example.com",
])
def test_injection_stays_one_equality_assertion(evil: str) -> None:
    text = fill(USER, evil)
    for char in "*()":
        assert char not in text[len("(&(objectClass=posixAccount)(mail="):-2]
    # the parsed filter is still AND(objectClass, mail=<literal>): nothing widened
    root = parse_filter(text, None, True, True, None, False)
    assert len(root.elements) == 1
    and_node = root.elements[0]
    assert len(and_node.elements) == 2
    mail = and_node.elements[1]
    assert mail.tag == MATCH_EQUAL               # not a substring/presence match
    assert mail.assertion["attr"] == "mail"
    assert ldap_escape_to_bytes(mail.assertion["value"].decode()) == evil.encode()


def test_local_part_domain_and_percent() -> None:
    text = expand_filter("(&(uid=%u)(dc=%d)(note=100%%))", "V", full="a*b@Ex.com",
                         local="a*b", domain="ex.com")
    assert text == "(&(uid=a\\2ab)(dc=ex.com)(note=100%))"


@pytest.mark.parametrize("template", ["(mail=%x)", "(mail=%s)%"])
def test_unknown_placeholders_are_config_errors(template: str) -> None:
    with pytest.raises(ConfigError, match="^LDAP_QUERY_FILTER_USER: "):
        fill(template, "a@example.com")


def test_invalid_filter_is_refused_at_start() -> None:
    _check_filter("LDAP_QUERY_FILTER_USER", USER)
    with pytest.raises(ConfigError, match="^LDAP_QUERY_FILTER_USER: not a valid LDAP filter"):
        _check_filter("LDAP_QUERY_FILTER_USER", "(&(mail=%s)")


@pytest.mark.parametrize(("value", "url"), [
    ("auth", "ldap://auth:389"),
    ("auth:1389", "ldap://auth:1389"),
    ("ldap://ldap.example.com:1444", "ldap://ldap.example.com:1444"),
    ("ldap://ldap.example.com/", "ldap://ldap.example.com:389"),
    ("ldaps://ldap.example.com", "ldaps://ldap.example.com:636"),
    ("LDAPS://h:6360", "ldaps://h:6360"),
])
def test_ldap_host_forms(value: str, url: str) -> None:
    assert parse_ldap_host(value).url == url


@pytest.mark.parametrize("value", ["http://x", "a b", "ldap://h:99999", "ldap://h/dc=x", ""])
def test_bad_ldap_host(value: str) -> None:
    with pytest.raises(ConfigError, match="^LDAP_HOST: "):
        parse_ldap_host(value)


# ---------------------------------------------------------------------- SQL


def test_image_query_becomes_a_bound_parameter() -> None:
    q = compile_query("select mail from users where mail='%s' limit 1;", "MYSQL_QUERY_USER")
    assert q.sql == "select mail from users where mail=%s limit 1"
    assert q.args("x' OR '1'='1@example.com") == ("x' OR '1'='1@example.com",)


def test_parts_double_quotes_and_literal_percent() -> None:
    q = compile_query('SELECT m FROM u WHERE local="%u" AND domain=%d AND note LIKE \'10%%\'',
                      "MYSQL_QUERY_USER")
    assert q.sql == "SELECT m FROM u WHERE local=%s AND domain=%s AND note LIKE '10%%'"
    assert q.args("Alice@Example.COM") == ("Alice", "example.com")
    # what PyMySQL will do with it: the %% becomes %, the values are escaped literals
    from pymysql.converters import escape_string
    rendered = q.sql % tuple(f"'{escape_string(a)}'" for a in q.args("a'b@x.org"))
    assert rendered == "SELECT m FROM u WHERE local='a\\'b' AND domain='x.org' AND note LIKE '10%'"


@pytest.mark.parametrize("template", [
    "select mail from users where mail='%x'",
    "select mail from users",
    "select mail from users where mail like '%s%'",
    "select mail where mail=%s %",
    "",
])
def test_bad_queries_are_config_errors(template: str) -> None:
    with pytest.raises(ConfigError, match="^MYSQL_QUERY_ALIAS: "):
        compile_query(template, "MYSQL_QUERY_ALIAS")


@pytest.mark.parametrize(("value", "expected"), [
    ("db", ("db", 3306)), ("db:3307", ("db", 3307)), ("[::1]:3308", ("::1", 3308)),
    ("127.0.0.1", ("127.0.0.1", 3306)),
])
def test_mysql_host_forms(value: str, expected: tuple[str, int]) -> None:
    assert parse_mysql_host(value) == expected


@pytest.mark.parametrize("value", ["db:x", "db:0", "a b", ":3306"])
def test_bad_mysql_host(value: str) -> None:
    with pytest.raises(ConfigError, match="^MYSQL_HOST: "):
        parse_mysql_host(value)


def test_variables_load_from_the_environment() -> None:
    env = {
        "MAIL_DOMAIN": "example.com", "LDAP_HOST": "ldaps://ldap.example.com",
        "LDAP_USER_BASE": "ou=people,dc=example,dc=com", "LDAP_QUERY_FILTER_USER": USER,
        "LDAP_QUERY_ATTRS_USER": "mailbox", "LDAP_GROUP_BASE": "ou=groups,dc=example,dc=com",
        "LDAP_QUERY_FILTER_ALIAS": "(mailLocalAddress=%s)",
        "LDAP_QUERY_FILTER_GROUP": "(&(objectClass=posixGroup)(mail=%s))",
        "LDAP_QUERY_FILTER_EXPAND": "(uid=%s)", "LDAP_BIND_DN": "cn=admin,dc=example,dc=com",
        "LDAP_BIND_PW": " secret ", "MYSQL_HOST": "db:3307", "MYSQL_DATABASE": "mail",
        "MYSQL_USER": "pf", "MYSQL_PASSWORD": "pw", "MYSQL_QUERY_USER":
        "select mail from users where mail='%s'", "MYSQL_QUERY_ALIAS":
        "select goto from aliases where alias='%s'", "PYMTA_LOOKUP_CACHE_TTL": "2m",
        "PYMTA_LOOKUP_NEGATIVE_TTL": "10", "PYMTA_LOOKUP_TIMEOUT": "3s",
    }
    c = load_config(env)
    assert (c.ldap_host, c.ldap_query_attrs_user, c.ldap_bind_pw) == \
        ("ldaps://ldap.example.com", "mailbox", " secret ")
    assert (c.mysql_host, c.mysql_database, c.mysql_password) == ("db:3307", "mail", "pw")
    assert (c.lookup_cache_ttl, c.lookup_negative_ttl, c.lookup_timeout) == (120, 10, 3)
    assert "secret" not in repr(c) and "'pw'" not in repr(c)
    assert load_config({"MAIL_DOMAIN": "example.com"}).ldap_query_attrs_user == "mail"
    with pytest.raises(ConfigError, match="^MYSQL_QUERY_USER: "):
        load_checked({**env, "MYSQL_QUERY_USER": "select mail where mail='%x'"})
    with pytest.raises(ConfigError, match="^LDAP_HOST: "):
        load_checked({**env, "LDAP_HOST": "http://x"})
