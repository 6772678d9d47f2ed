"""Outbound TLS levels (issue 15): which level a destination gets, and the certificate
name rules of ``verify`` and ``secure`` (RFC 6125 matching, Postfix's hostname and
nexthop/dot-nexthop strategies)."""

from __future__ import annotations

import pytest

from pymta.delivery.tlspolicy import (
    certificate_names,
    certificate_problem,
    level_for,
    name_matches,
    normalized_table,
)

TABLE = {"example.com": "secure", ".example.net": "verify", "mail.example.net": "encrypt"}


@pytest.mark.parametrize("nexthop, level", [
    ("example.com", "secure"),
    ("EXAMPLE.com.", "secure"),
    ("sub.example.com", "may"),            # an exact entry does not cover subdomains
    ("a.example.net", "verify"),
    ("a.b.example.net", "verify"),
    ("mail.example.net", "encrypt"),       # the exact entry wins over the parent's
    ("example.net", "may"),                # ".example.net" is for hosts under it only
    ("other.org", "may"),
])
def test_level_for(nexthop: str, level: str) -> None:
    assert level_for(nexthop, "may", TABLE) == level


@pytest.mark.parametrize("pattern, name, ok", [
    ("mx.example.com", "mx.example.com", True),
    ("MX.Example.COM.", "mx.example.com", True),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.mx.example.com", False),
    ("*.com", "example.com", False),            # no wildcard over a top-level domain
    ("m*.example.com", "mx.example.com", False),  # partial-label wildcards are not honoured
    ("*.*.example.com", "a.b.example.com", False),
    ("mx.example.com", "mx.example.org", False),
    ("", "mx.example.com", False),
])
def test_name_matches(pattern: str, name: str, ok: bool) -> None:
    assert name_matches(pattern, name) is ok


def _cert(*sans: str, cn: str = "") -> dict[str, object]:
    cert: dict[str, object] = {"subjectAltName": tuple(("DNS", n) for n in sans)}
    if cn:
        cert["subject"] = ((("commonName", cn),),)
    return cert


def test_certificate_names_prefer_subject_alt_names() -> None:
    assert certificate_names(_cert("a.test", "b.test", cn="c.test")) == ["a.test", "b.test"]
    assert certificate_names(_cert(cn="c.test")) == ["c.test"]
    assert certificate_names({"subjectAltName": (("IP Address", "192.0.2.1"),)}) == []


def test_verify_wants_the_mx_host_secure_the_next_hop() -> None:
    mx = _cert("mx.provider.test")                  # the MX of example.com is elsewhere
    assert certificate_problem(mx, "verify", "mx.provider.test", "example.com") == ""
    why = certificate_problem(mx, "secure", "mx.provider.test", "example.com")
    assert "do not match example.com or *.example.com" in why
    # secure: the next hop itself, a host under it, or a wildcard under it
    for names in (("example.com",), ("mx1.example.com",), ("*.example.com",),
                  ("*.mx.example.com",)):
        assert certificate_problem(_cert(*names), "secure", "mx.other.test",
                                   "example.com") == "", names
    for names in (("example.com.evil.test",), ("notexample.com",), ("*.com",)):
        assert certificate_problem(_cert(*names), "secure", "mx.other.test",
                                   "example.com") != "", names


def test_verify_rejects_a_certificate_for_another_host() -> None:
    why = certificate_problem(_cert("www.example.com"), "verify", "mx.example.com",
                              "example.com")
    assert why == "certificate names (www.example.com) do not match mx.example.com"
    assert certificate_problem(None, "verify", "mx.example.com", "example.com") == (
        "no certificate presented")


@pytest.mark.parametrize("level", ["none", "may", "encrypt"])
def test_lower_levels_check_no_names(level: str) -> None:
    assert certificate_problem(_cert("x.test"), level, "mx.example.com", "example.com") == ""


def test_review_internationalized_domains_match_in_their_ascii_form() -> None:
    """A policy for ``xn--bcher-kva.example`` covers mail to ``bücher.example`` (and the
    other way round), and secure matches certificates, which carry the ``xn--`` form: a
    sender must not get cleartext by writing the domain with U-labels."""
    for written, asked in (("xn--bcher-kva.example", "bücher.example"),
                           ("bücher.example", "xn--bcher-kva.example"),
                           (".bücher.example", "mx.xn--bcher-kva.example")):
        assert level_for(asked, "may", normalized_table({written: "secure"})) == "secure"
    cert = _cert("mx.xn--bcher-kva.example")
    assert certificate_problem(cert, "secure", "mx.bücher.example", "bücher.example") == ""
    assert certificate_problem(cert, "verify", "mx.bücher.example", "bücher.example") == ""
