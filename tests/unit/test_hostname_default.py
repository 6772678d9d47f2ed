"""``MYHOSTNAME`` when unset: the machine's name, as Postfix's ``myhostname`` (issue 11).

The defect: on a host named ``vm`` whose ``/etc/hosts`` lists ``127.0.0.1 localhost`` first
(containers, VMs), ``socket.getfqdn()`` answers ``localhost``, so the server said ``started
on vm`` in one place and ``Received: ... by localhost`` in another. The name is now
``gethostname()``, qualified only when the resolver knows a qualified name for it that is not
a loopback name. The greeting, ``Received:`` and the start-up log line are checked over a
real connection in ``tests/integration/test_embedding.py``.
"""

from __future__ import annotations

import socket

import pytest

from pymta.config.errors import ConfigError
from pymta.config.load import load_config

DOMAIN = {"MAIL_DOMAIN": "example.com"}


def test_issue11_myhostname_defaults_to_the_host_name() -> None:
    name = socket.gethostname().rstrip(".")
    hostname = load_config(DOMAIN).hostname
    if "." in name:
        assert hostname == name
    else:   # qualified only by a name the resolver gives for this very host
        assert hostname == name or hostname.startswith(f"{name}.")
    if name.partition(".")[0] != "localhost":
        assert not hostname.startswith("localhost")


def test_issue11_myhostname_default_without_mail_domain() -> None:
    """``load_config({})``: MAIL_DOMAIN defaults to the host name's domain; a host name
    without one is named in the error (the machine's, not ``localhost``)."""
    name = socket.gethostname().rstrip(".")
    try:
        config = load_config({})
    except ConfigError as exc:
        assert str(exc).startswith("MAIL_DOMAIN: not set and the host name has no domain part")
        assert str(exc).endswith(f": {name!r}")     # not 'localhost'
    else:
        assert config.hostname.partition(".")[0] == name.partition(".")[0]
        assert config.mail_domain == (config.hostname.partition(".")[2].lower(),)


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch):
    """``host(name, fqdn)``: make the machine's name ``name`` and what the resolver says
    about it ``fqdn`` (a string, or an exception to raise)."""
    asked: list[str] = []

    def set_host(name: str, fqdn: str | Exception) -> list[str]:
        def getfqdn(n: str = "") -> str:
            asked.append(n)
            if isinstance(fqdn, Exception):
                raise fqdn
            return fqdn

        monkeypatch.setattr(socket, "gethostname", lambda: name)
        monkeypatch.setattr(socket, "getfqdn", getfqdn)
        return asked

    return set_host


def test_issue11_myhostname_is_not_localhost_from_etc_hosts(host) -> None:
    """The container's /etc/hosts: ``127.0.0.1 localhost`` above ``127.0.0.1 vm``."""
    asked = host("vm", "localhost")
    assert load_config(DOMAIN).hostname == "vm"
    assert asked == ["vm"]


@pytest.mark.parametrize("loopback", ["localhost.localdomain", "localhost6.localdomain6",
                                      "ip6-localhost", "localhost.example.com"])
def test_issue11_myhostname_never_a_loopback_name(host, loopback: str) -> None:
    host("vm", loopback)
    assert load_config(DOMAIN).hostname == "vm"


def test_myhostname_qualified_by_the_resolver(host) -> None:
    host("mail", "mail.example.org")
    config = load_config({})
    assert config.hostname == "mail.example.org"
    assert config.mail_domain == ("example.org",)


def test_myhostname_already_qualified_is_taken_as_it_is(host) -> None:
    asked = host("mx1.example.net.", "something.else.example")
    assert load_config({}).hostname == "mx1.example.net"
    assert asked == []      # no resolver query for a name that is qualified already


def test_myhostname_when_the_resolver_fails(host) -> None:
    host("vm", OSError("no resolver"))
    assert load_config(DOMAIN).hostname == "vm"


def test_myhostname_set_wins(host) -> None:
    asked = host("vm", "vm.example.org")
    assert load_config({**DOMAIN, "MYHOSTNAME": "mx.example.com"}).hostname == "mx.example.com"
    assert load_config({**DOMAIN, "MYHOSTNAME": ""}).hostname == "vm.example.org"  # empty: unset
    assert asked == ["vm"]
