"""``pymta health``'s backends as the wiring finds them (issue 13): each configured LDAP,
MySQL and remote-IMAP adapter, built without I/O and named after where its service is; a
table or password file is not asked; the adapters are Probeable through the contract, so the
CLI never names one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pymta import wiring
from pymta.backends.imapauth import ImapAuthenticator
from pymta.backends.ldap import LdapLookup
from pymta.backends.ldapauth import LdapBindAuthenticator
from pymta.backends.mysql import MysqlLookup
from pymta.backends.mysqlauth import MysqlAuthenticator
from pymta.config.model import Config
from pymta.contracts import Closeable, Probeable

REPO = Path(__file__).resolve().parents[2]
BASE = Config(hostname="mx.example.com", mail_domain=("example.com",),
              mail_boxes="a@example.com", smtpd_sasl_clientauth="u:{PLAIN}p")
UNREACHABLE = "192.0.2.1"       # TEST-NET-1: connecting would hang, so nothing may connect
EVERYTHING = dataclasses.replace(
    BASE, ldap_host=f"ldap://{UNREACHABLE}", ldap_user_base="ou=people,dc=example,dc=com",
    ldap_query_filter_user="(mail=%s)", ldap_query_attrs_pass="uid=user",
    mysql_host=f"{UNREACHABLE}:3306", mysql_database="mail",
    mysql_query_user="select m from u where e='%s'",
    mysql_query_pass="select password from u where e='%u'",
    smtpd_sasl_imaphost=f"{UNREACHABLE}:143")


def test_every_network_backend_is_probed_in_chain_order() -> None:
    probes = wiring.backend_probes(EVERYTHING)
    assert [name for name, _ in probes] == [
        f"ldap lookup ldap://{UNREACHABLE}", f"mysql lookup {UNREACHABLE}:3306",
        f"ldap auth ldap://{UNREACHABLE}", f"mysql auth {UNREACHABLE}:3306",
        f"imap auth {UNREACHABLE}:143"]
    kinds = [type(adapter) for _, adapter in probes]
    assert kinds == [LdapLookup, MysqlLookup, LdapBindAuthenticator, MysqlAuthenticator,
                     ImapAuthenticator]
    assert all(isinstance(adapter, Probeable) for _, adapter in probes)


def test_table_and_password_file_alone_have_nothing_to_probe() -> None:
    assert BASE.sasl_methods == ("passwd",)
    assert wiring.backend_probes(BASE) == []


def test_the_probed_adapters_use_the_configured_timeout() -> None:
    bounded = dataclasses.replace(EVERYTHING, lookup_timeout=1.5)
    found = dict(wiring.backend_probes(bounded))
    ldap = found[f"ldap lookup ldap://{UNREACHABLE}"]
    assert isinstance(ldap, LdapLookup) and ldap.settings.timeout == 1.5
    mysql = found[f"mysql auth {UNREACHABLE}:3306"]
    assert isinstance(mysql, MysqlAuthenticator) and mysql.pool.timeout == 1.5
    assert isinstance(mysql, Closeable)


def test_the_health_command_names_no_adapter() -> None:
    """The CLI reaches the backends through the wiring and the contract only."""
    source = (REPO / "pymta" / "cli" / "health.py").read_text()
    assert "pymta.backends" not in source and "import backends" not in source
    assert "wiring.backend_probes(" in source
