"""The wiring (issue 11, items 2 and 5): one recipient lookup whatever the sources, adapters
chosen by name from the configuration, settings checked by their adapters without building
anything, and no process-wide state (each ``MTA`` has its own DNS resolver; importing the
core changes no library and loads no adapter)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pymta import wiring
from pymta.app import MTA
from pymta.backends.chain import LookupChain
from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.types import Address, Destination, Target, TemporaryFailure
from tests.conftest import _test_dkim_key

REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("example.com", "example.org")
BASE = Config(hostname="mx.example.com", mail_domain=DOMAINS)
# An address nothing answers on (TEST-NET-1, RFC 5737): connecting there would hang, not fail.
UNREACHABLE = "192.0.2.1"
LDAP = {"ldap_host": f"ldap://{UNREACHABLE}", "ldap_user_base": "ou=people,dc=example,dc=com",
        "ldap_query_filter_user": "(mail=%s)"}
MYSQL = {"mysql_host": f"{UNREACHABLE}:3306", "mysql_database": "mail",
         "mysql_query_user": "SELECT maildir FROM users WHERE email='%s'"}


def config(tmp_path: Path, **overrides: Any) -> Config:
    return dataclasses.replace(BASE, state_dir=str(tmp_path / "state"),
                               mail_dir=str(tmp_path / "mail"), **overrides)


def one(address: str, mailbox: str | None) -> Destination:
    return Destination((Target(address, True, mailbox),))


def fresh_python(code: str) -> Any:
    """Run ``code`` in a new interpreter (nothing imported yet); the JSON it prints last."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


class Counted:
    """A recipient source answering from a dict and counting what it was asked."""

    def __init__(self, table: dict[str, Destination]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def lookup(self, address: Address) -> Destination | None:
        self.asked.append(address.key)
        return self.table.get(address.key)


# --------------------------------------------------------------------------- one composition


async def test_issue11_library_lookups_are_one_chain_alias_resolves_across_sources(
        tmp_path: Path) -> None:
    """``MTA(config, lookups=[a, b])``: an alias in ``a`` whose target only ``b`` knows
    resolves to ``b``'s mailbox (before issue 11 the library's own loop asked ``a`` alone
    for the alias and gave its unresolved target)."""
    a = {"sales@example.com": [Target("bob@example.com", True, None),
                               Target("partner@example.net", False)]}
    b = {"bob@example.com": "bob/"}
    mta = MTA(config(tmp_path), lookups=[a, b])
    dest = await mta.lookup.lookup(Address("Sales@example.com"))
    assert dest == Destination((Target("bob@example.com", True, "bob/"),
                                Target("partner@example.net", False)))
    # the DSN resolver asks the same lookup
    rcpt = await mta.resolve("sales@example.com")
    assert rcpt is not None and (rcpt.address, rcpt.mailbox) == ("bob@example.com", "bob/")


async def test_issue11_library_lookups_are_one_chain_first_source_that_knows_wins(
        tmp_path: Path) -> None:
    first = Counted({"a@example.com": one("a@example.com", "first/")})
    second = Counted({"a@example.com": one("a@example.com", "second/"),
                      "b@example.com": one("b@example.com", "b/")})
    mta = MTA(config(tmp_path), lookups=[first, second])
    assert await mta.lookup.lookup(Address("a@example.com")) == one("a@example.com", "first/")
    assert second.asked == []
    assert await mta.lookup.lookup(Address("b@example.com")) == one("b@example.com", "b/")
    assert await mta.lookup.lookup(Address("c@example.com")) is None
    assert first.asked == ["a@example.com", "b@example.com", "c@example.com"]
    assert second.asked == ["b@example.com", "c@example.com"]


async def test_issue11_library_lookups_are_one_chain_alias_loops_are_cut(tmp_path: Path) -> None:
    a = {"x@example.com": [Target("y@example.com", True, None)]}
    b = {"y@example.com": [Target("x@example.com", True, None)]}
    mta = MTA(config(tmp_path), lookups=[a, b])
    assert await mta.lookup.lookup(Address("x@example.com")) is None   # every branch loops


async def test_issue11_library_lookups_are_cached_per_the_chain_ttl(tmp_path: Path) -> None:
    source = Counted({"a@example.com": one("a@example.com", "a/")})
    mta = MTA(config(tmp_path, lookup_cache_ttl=0.5, lookup_negative_ttl=60.0),
              lookups=[source])
    for _ in range(3):
        assert await mta.lookup.lookup(Address("A@example.com")) == one("a@example.com", "a/")
        assert await mta.lookup.lookup(Address("nobody@example.com")) is None
    assert source.asked == ["a@example.com", "nobody@example.com"]
    await asyncio.sleep(0.6)     # the known address's entry expires, the unknown one's does not
    await mta.lookup.lookup(Address("a@example.com"))
    await mta.lookup.lookup(Address("nobody@example.com"))
    assert source.asked == ["a@example.com", "nobody@example.com", "a@example.com"]


async def test_issue11_library_lookups_cache_off_asks_every_time(tmp_path: Path) -> None:
    source = Counted({"a@example.com": one("a@example.com", "a/")})
    mta = MTA(config(tmp_path, lookup_cache_ttl=0, lookup_negative_ttl=0), lookups=source)
    for _ in range(3):
        await mta.lookup.lookup(Address("a@example.com"))
        await mta.lookup.lookup(Address("nobody@example.com"))
    assert len(source.asked) == 6


async def test_issue11_a_temporary_failure_stops_the_chain(tmp_path: Path) -> None:
    """A later source must not answer for an address the failing one might know."""
    def down(address: str) -> None:
        raise TemporaryFailure("directory down")

    later = Counted({"a@example.com": one("a@example.com", "a/")})
    mta = MTA(config(tmp_path), lookups=[down, later])
    with pytest.raises(TemporaryFailure):
        await mta.lookup.lookup(Address("a@example.com"))
    assert later.asked == []


async def test_library_lookups_get_regex_alias_around_the_chain(tmp_path: Path) -> None:
    mta = MTA(config(tmp_path, regex_alias=r"/^(.+)\+.*@(.+)$/ $1@$2"),
              lookups=[{"alice@example.com": "alice/"}])
    assert await mta.lookup.lookup(Address("alice+news@example.com")) == one(
        "alice@example.com", "alice/")


def test_a_chain_given_as_the_only_source_is_the_chain(tmp_path: Path) -> None:
    chain = LookupChain([], DOMAINS, ttl=5)
    assert wiring.recipient_lookup(config(tmp_path, srs_enable=False), [chain]) is chain
    # any other single source goes into a chain with the configured cache
    built = wiring.recipient_lookup(config(tmp_path, srs_enable=False, lookup_cache_ttl=7),
                                    {"a@example.com": True})
    assert isinstance(built, LookupChain) and built.ttl == 7 and len(built.sources) == 1


def test_configured_sources_are_one_chain_in_order(tmp_path: Path) -> None:
    cfg = config(tmp_path, srs_enable=False, mail_boxes="alice@example.com:alice/",
                 **LDAP, **MYSQL)
    chain = wiring.recipient_lookup(cfg)
    assert isinstance(chain, LookupChain)
    assert [type(s).__name__ for s in chain.sources] == ["TableLookup", "LdapLookup",
                                                         "MysqlLookup"]
    assert (chain.ttl, chain.negative_ttl) == (cfg.lookup_cache_ttl, cfg.lookup_negative_ttl)


async def test_a_table_alias_target_left_to_the_directory(tmp_path: Path) -> None:
    """With LDAP/MySQL configured, a MAIL_ALIASES target missing from MAIL_BOXES is left to
    the chain (it is an error without them)."""
    table = {"mail_boxes": "alice@example.com:alice/", "mail_aliases": "team:alice,dave"}
    with pytest.raises(ConfigError, match=r"^MAIL_ALIASES: .*dave@example.com"):
        wiring.check(config(tmp_path, **table))
    wiring.check(config(tmp_path, **table, **MYSQL))


# --------------------------------------------------------------------------- the tables


CASES: list[tuple[Callable[[], Any], str, str, dict[str, Any]]] = [
    (lambda: wiring.RECIPIENT_LOOKUPS, "table", "TableLookup", {}),
    (lambda: wiring.RECIPIENT_LOOKUPS, "ldap", "LdapLookup", LDAP),
    (lambda: wiring.RECIPIENT_LOOKUPS, "mysql", "MysqlLookup", MYSQL),
    (lambda: wiring.AUTHENTICATORS, "passwd", "PasswordFile",
     {"smtpd_sasl_clientauth": "alice@example.com:{PLAIN}secret"}),
    (lambda: wiring.AUTHENTICATORS, "ldap", "LdapBindAuthenticator",
     {**LDAP, "ldap_query_attrs_pass": "uid=user"}),
    (lambda: wiring.AUTHENTICATORS, "mysql", "MysqlAuthenticator",
     {**MYSQL, "mysql_query_pass": "SELECT password FROM users WHERE email='%s'"}),
    (lambda: wiring.AUTHENTICATORS, "imap", "ImapAuthenticator",
     {"smtpd_sasl_imaphost": f"{UNREACHABLE}:143"}),
    (lambda: wiring.DELIVERY_AGENTS, "local", "LocalDeliveryAgent", {}),
    (lambda: wiring.DELIVERY_AGENTS, "lmtp", "LMTPDeliveryAgent",
     {"virtual_transport": f"lmtp:{UNREACHABLE}:24"}),
    (lambda: wiring.DELIVERY_AGENTS, "relay", "SMTPRelayAgent", {}),
    (lambda: wiring.PIPELINE_STAGES, "spf", "SPFCheck", {}),
    (lambda: wiring.PIPELINE_STAGES, "dkim", "DkimVerify", {}),
    (lambda: wiring.PIPELINE_STAGES, "arc", "ArcVerify", {"arc": True}),
    (lambda: wiring.PIPELINE_STAGES, "dmarc", "DMARCCheck", {}),
    (lambda: wiring.PIPELINE_STAGES, "authresults", "AuthResultsModifier", {}),
    (lambda: wiring.PIPELINE_STAGES, "arc-seal", "ArcSeal", {"arc": True}),
    (lambda: wiring.PIPELINE_STAGES, "dkim-sign", "DkimSign", {"dkim_sign": True}),
    (lambda: wiring.PIPELINE_STAGES, "srs", "SRSRewrite", {"srs_enable": True}),
]


@pytest.mark.parametrize(("table", "name", "cls", "settings"), CASES,
                         ids=[f"{c[1]}-{c[2]}" for c in CASES])
def test_each_name_builds_its_adapter_from_a_config(
        tmp_path: Path, table: Callable[[], Any], name: str, cls: str,
        settings: dict[str, Any]) -> None:
    cfg = config(tmp_path, dkim_private_key=_test_dkim_key(), **settings)
    adapter = table()[name]
    assert adapter.name == name
    assert adapter.active(cfg)
    services = wiring.Services.from_config(cfg)
    built = adapter.build(cfg, services)
    assert type(built).__name__ == cls
    # whatever does DNS uses the server's resolver
    if hasattr(built, "resolver"):
        assert built.resolver is services.dns
    assert not (tmp_path / "state").exists()      # building wrote nothing


def test_adapters_are_off_unless_configured() -> None:
    assert [n for n, a in wiring.RECIPIENT_LOOKUPS.items() if a.active(BASE)] == ["table"]
    assert [n for n, a in wiring.AUTHENTICATORS.items() if a.active(BASE)] == []
    assert [n for n, a in wiring.DELIVERY_AGENTS.items() if a.active(BASE)] == ["local",
                                                                                 "relay"]
    lmtp = dataclasses.replace(BASE, virtual_transport="lmtp:127.0.0.1:24")
    assert [n for n, a in wiring.DELIVERY_AGENTS.items() if a.active(lmtp)] == ["lmtp",
                                                                                 "relay"]
    off = dataclasses.replace(BASE, spf_check=False, dkim_verify=False, dmarc_check=False,
                              arc=False, dkim_sign=False, srs_enable=False,
                              banned_check=False, bad_header_check=False)
    assert wiring.build_pipeline(off).checks == []
    assert [type(m).__name__ for m in wiring.build_pipeline(off).modifiers] == [
        "AuthResultsModifier"]


def test_pipeline_stages_run_in_table_order(tmp_path: Path) -> None:
    cfg = config(tmp_path, arc=True, dkim_sign=True, srs_enable=True,
                 dkim_private_key=_test_dkim_key())
    pipeline = wiring.build_pipeline(cfg)
    assert [type(c).__name__ for c in pipeline.checks] == [
        "SPFCheck", "DkimVerify", "ArcVerify", "DMARCCheck", "ContentCheck"]
    assert [type(m).__name__ for m in pipeline.modifiers] == [
        "AuthResultsModifier", "ContentTags", "ArcSeal", "DkimSign", "SRSRewrite"]


def test_the_authenticators_are_one_chain_in_the_configured_order(tmp_path: Path) -> None:
    cfg = config(tmp_path, smtpd_sasl_clientauth="u:{PLAIN}p",
                 smtpd_sasl_imaphost=f"{UNREACHABLE}:143",
                 dovecot_auth_username_format="%Ln")
    chain = wiring.build_authenticator(cfg)
    assert type(chain).__name__ == "AuthChain"
    assert [type(m).__name__ for m in chain.methods] == ["PasswordFile", "ImapAuthenticator"]
    assert chain.username_format == "%Ln"
    assert wiring.build_authenticator(BASE) is None      # no SASL: no submission ports


# --------------------------------------------------------------------------- checking


# (settings, error): used by the server built from them
BAD_USED: list[tuple[dict[str, Any], str]] = [
    ({**LDAP, "ldap_query_filter_user": "(mail=%s"},
     r"^LDAP_QUERY_FILTER_USER: not a valid LDAP filter"),
    ({**LDAP, "ldap_query_filter_alias": "mail=%s)"},
     r"^LDAP_QUERY_FILTER_ALIAS: not a valid LDAP filter"),
    ({**LDAP, "ldap_host": "http://ldap.example.com"}, r"^LDAP_HOST: scheme must be"),
    ({**LDAP, "ldap_user_base": ""}, r"^LDAP_USER_BASE: must be set when LDAP_HOST is"),
    ({**LDAP, "ldap_bind_pw": "secret"}, r"^LDAP_BIND_DN: not set, but LDAP_BIND_PW is"),
    ({**MYSQL, "mysql_query_user": "SELECT maildir FROM users WHERE email='%z'"},
     r"^MYSQL_QUERY_USER: unsupported %z"),
    ({**MYSQL, "mysql_query_alias": "SELECT dest FROM aliases WHERE src='%x'"},
     r"^MYSQL_QUERY_ALIAS: unsupported %x"),
    ({**MYSQL, "mysql_database": ""}, r"^MYSQL_DATABASE: must be set when MYSQL_HOST is"),
    ({"regex_alias": "/(unclosed/ someone@example.com"},
     r"^REGEX_ALIAS: invalid regular expression"),
    ({"regex_alias": "no slashes"}, r"^REGEX_ALIAS: expected /pattern/ replacement"),
    ({"smtpd_sasl_clientauth": "alice:{NOPE}secret"},
     r"^SMTPD_SASL_CLIENTAUTH: unsupported password scheme \{NOPE\} for user 'alice'"),
    ({"smtpd_sasl_clientauth": "alice"}, r"^SMTPD_SASL_CLIENTAUTH: entries are user:"),
    ({**LDAP, "ldap_query_attrs_pass": "uid=user", "ldap_query_filter_pass": "(uid=%u"},
     r"^LDAP_QUERY_FILTER_PASS: "),
    ({**MYSQL, "mysql_query_pass": "SELECT password FROM u WHERE x='%q'"},
     r"^MYSQL_QUERY_PASS: "),
    ({"smtpd_sasl_imaphost": "imap.example.com:99999"}, r"^SMTPD_SASL_IMAPHOST: "),
    ({"dkim_private_key": "/etc/pymta/dkim.key"},               # a path, not a key
     r"^DKIM_PRIVATEKEY: not a PEM \(or base64 DER\) private key"),
    ({"mail_boxes": "alice@other.test:alice/"}, r"^MAIL_BOXES: 'alice@other.test'"),
    ({"mail_aliases": "team:nobody@example.com"}, r"^MAIL_ALIASES: team@example.com"),
]
# set but unused: check-config and serve still refuse them (a typo stops start-up either way)
BAD_UNUSED: list[tuple[dict[str, Any], str]] = [
    ({"mysql_query_user": "SELECT x FROM y WHERE z='%z'"}, r"^MYSQL_QUERY_USER: unsupported %z"),
    ({"dkim_private_key": "/etc/pymta/dkim.key", "dkim_sign": False, "arc": False},
     r"^DKIM_PRIVATEKEY: not a PEM"),
    ({"dovecot_auth_username_format": "%x"}, r"^DOVECOT_AUTH_USERNAME_FORMAT: only %u"),
]


@pytest.mark.parametrize(("settings", "message"), BAD_USED)
def test_check_names_the_variable_of_a_bad_setting(tmp_path: Path, settings: dict[str, Any],
                                                   message: str) -> None:
    cfg = config(tmp_path, **settings)
    with pytest.raises(ConfigError, match=message):
        wiring.check(cfg)
    # a library user building the server gets the same error, before anything listens
    with pytest.raises(ConfigError, match=message):
        MTA(cfg)


@pytest.mark.parametrize(("settings", "message"), BAD_UNUSED)
def test_check_names_the_variable_of_a_bad_unused_setting(
        tmp_path: Path, settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        wiring.check(config(tmp_path, **settings))


def test_check_passes_a_good_configuration_of_every_kind(tmp_path: Path) -> None:
    wiring.check(config(tmp_path, **LDAP, **MYSQL, regex_alias=r"/^(.+)\+.*@(.+)$/ $1@$2",
                        smtpd_sasl_clientauth="u:{PLAIN}p", dkim_private_key=_test_dkim_key(),
                        ldap_query_attrs_pass="uid=user",
                        mysql_query_pass="SELECT password FROM users WHERE email='%s'",
                        smtpd_sasl_imaphost=f"{UNREACHABLE}:143", arc=True))


def test_check_names_the_extra_of_a_missing_package(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ldap3", None)     # import ldap3 -> ImportError
    monkeypatch.setitem(sys.modules, "aiomysql", None)
    with pytest.raises(ConfigError, match=r"^LDAP_HOST: needs the ldap3 package "
                                          r"\(pip install 'pymta-server\[ldap\]'\)$"):
        wiring.check(config(tmp_path, **LDAP))
    with pytest.raises(ConfigError, match=r"^MYSQL_HOST: needs the aiomysql package "
                                          r"\(pip install 'pymta-server\[mysql\]'\)$"):
        wiring.check(config(tmp_path, **MYSQL))
    wiring.check(config(tmp_path))      # a server without them needs neither


def test_check_and_build_open_no_socket_thread_or_file(tmp_path: Path) -> None:
    """``check`` (what check-config and the supervisor run) builds nothing: an unreachable
    LDAP or MySQL host is fine, no socket is made, no thread started, no file opened but
    the modules imported, not even resolv.conf; building the lookups connects nowhere
    either (the pools connect at the first lookup)."""
    state = tmp_path / "state"
    result = fresh_python(f"""
        import json, sys, threading
        from pymta import wiring
        from pymta.config.model import Config
        cfg = Config(hostname="mx.example.com", mail_domain=("example.com",),
                     state_dir={str(state)!r}, ldap_host="ldap://{UNREACHABLE}",
                     ldap_user_base="dc=example,dc=com", ldap_query_filter_user="(mail=%s)",
                     ldap_query_attrs_pass="uid=user", mysql_host="{UNREACHABLE}",
                     mysql_database="mail",
                     mysql_query_user="SELECT maildir FROM users WHERE email='%s'",
                     mysql_query_pass="SELECT password FROM users WHERE email='%s'",
                     smtpd_sasl_imaphost="{UNREACHABLE}:143", dkim_sign=True, arc=True,
                     regex_alias="/^(.+)[+].*@(.+)$/ $1@$2")
        events = []
        def hook(event, args):
            if event.startswith("socket.") or event == "subprocess.Popen":
                events.append(event)
            elif event == "open" and isinstance(args[0], str) and not args[0].endswith(
                    (".py", ".pyc", ".so", ".zip")):
                events.append(f"open {{args[0]}}")
        threads = threading.active_count()
        sys.addaudithook(hook)
        wiring.check(cfg)
        checked = list(events)
        services = wiring.Services.from_config(cfg)
        lookup = wiring.recipient_lookup(cfg, services=services)
        auth = wiring.build_authenticator(cfg)
        while not hasattr(lookup, "sources"):  # SRS, then REGEX_ALIAS, around the chain
            lookup = lookup.inner
        print(json.dumps({{"check": checked, "build": events[len(checked):],
                          "threads": threading.active_count() - threads,
                          "sources": [repr(s) for s in lookup.sources]}}))
    """)
    assert result["check"] == []
    assert result["build"] == []
    assert result["threads"] == 0
    assert result["sources"][1:] == ["LdapLookup(ldap://192.0.2.1:389)",
                                     "MysqlLookup(192.0.2.1:3306/mail)"]
    assert not state.exists()           # no DKIM key, no SRS secret made


# --------------------------------------------------------------------------- no global state


def test_config_load_imports_no_adapter() -> None:
    loaded = fresh_python("""
        import json, sys
        import pymta.config.load
        from pymta.config.load import load_config
        load_config({"MAIL_DOMAIN": "example.com", "LDAP_HOST": "ldap.example.com",
                     "MYSQL_HOST": "db.example.com", "REGEX_ALIAS": "/x/ y@example.com",
                     "SMTPD_SASL_CLIENTAUTH": "u:{PLAIN}p"})
        print(json.dumps(sorted(sys.modules)))
    """)
    adapters = [m for m in loaded if m.split(".")[0] in ("ldap3", "aiomysql", "pymysql",
                                                         "backends", "delivery", "spf", "re2")
                or m.startswith(("pymta.backends", "pymta.delivery", "pymta.pipeline",
                                 "pymta.wiring", "pymta.app"))]
    assert adapters == []
    assert "pymta.config.load" in loaded        # the probe did run


def test_importing_the_spf_stage_changes_nothing_in_pyspf() -> None:
    """No monkeypatching at import: another pyspf user in the process sees pyspf as it is
    until a server builds its SPF check."""
    changed = fresh_python("""
        import json, spf
        before = dict(vars(spf))
        import pymta.pipeline.spf
        import pymta.app
        after = vars(spf)
        print(json.dumps(sorted(k for k in before.keys() | after.keys()
                                if before.get(k, before) is not after.get(k, after))))
    """)
    assert changed == []


def test_two_servers_have_their_own_resolvers(tmp_path: Path) -> None:
    one_ = MTA(config(tmp_path / "1", dns_resolver=("127.0.0.1:5301",), dns_timeout=2.0))
    two = MTA(config(tmp_path / "2", dns_resolver=("127.0.0.2:5302",), dns_timeout=3.0))
    assert one_.dns is not two.dns
    assert (one_.dns.nameservers, one_.dns.timeout) == (("127.0.0.1:5301",), 2.0)
    assert (two.dns.nameservers, two.dns.timeout) == (("127.0.0.2:5302",), 3.0)
    for mta in (one_, two):
        users = [*(c for c in mta.pipeline.checks if hasattr(c, "resolver")),
                 mta.router.remote]   # type: ignore[attr-defined]
        assert [type(u).__name__ for u in users] == ["SPFCheck", "DkimVerify", "ArcVerify",
                                                      "DMARCCheck", "SMTPRelayAgent"]
        assert all(u.resolver is mta.dns for u in users)
    assert one_.dns.resolver.port == 5301 and two.dns.resolver.port == 5302


def test_issue11_client_name_lookup_is_one_per_server_on_its_resolver(tmp_path: Path) -> None:
    """Each server looks client names up through its own DNS resolver (with
    PYMTA_DNS_RESOLVER; the host's resolver without it), with its own cache."""
    one_ = MTA(config(tmp_path / "1", dns_resolver=("127.0.0.1:5301",), dns_timeout=2.0))
    two = MTA(config(tmp_path / "2", peername_lookup=False))
    assert one_.peer_names is not None and two.peer_names is not None
    assert one_.peer_names is not two.peer_names
    assert one_.peer_names.resolver is one_.dns and one_.peer_names.timeout == 2.0
    assert one_.peer_names.enabled and not two.peer_names.enabled
    assert two.peer_names.resolver is None      # the host's resolver (were it on)
