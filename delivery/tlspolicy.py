"""Outbound TLS security levels: which level a destination gets, and whether a peer's
certificate passes it (Postfix's ``smtp_tls_security_level``, ``smtp_tls_policy_maps`` and
its ``verify``/``secure`` certificate matching).

Levels, weakest first:

- ``none``: never STARTTLS.
- ``may``: STARTTLS when offered, certificate not checked; a failed handshake is retried in
  cleartext (opportunistic TLS, RFC 7435).
- ``encrypt``: TLS required, certificate not checked.
- ``verify``: TLS required; the chain must lead to a trusted root (the system's, or only
  those of ``PYMTA_SMTP_TLS_CA_FILE`` when set) and the certificate must name the MX host
  (Postfix's ``smtp_tls_verify_cert_match = hostname``). The MX name comes from DNS, which
  without DNSSEC an attacker can forge: this stops a passive listener and a stranger's
  certificate, not a DNS spoofer.
- ``secure``: as ``verify``, but the certificate must name the next-hop domain (the
  recipient's domain, or the smart host's name) or a host under it (Postfix's
  ``nexthop, dot-nexthop``): a forged MX record cannot redirect the mail to a host that
  holds a valid certificate for a name of the attacker's.

At ``encrypt`` and above a failure defers the mail with the reason; it is never sent in
cleartext. Which level applies: the destination's entry in ``PYMTA_TLS_POLICY`` (``domain``
exactly, else the nearest ``.parent`` entry, which covers every host under ``parent``, as in
Postfix's policy table), else ``SMTP_TLS_SECURITY_LEVEL``.

Name matching is RFC 6125's: DNS names of the certificate's subjectAltName (its Common Name
only when it has none), case-insensitive, a wildcard only as the whole leftmost label and
matching exactly one label (``*.example.com`` matches ``mx.example.com``, not
``example.com`` nor ``a.b.example.com``). Names are compared in their ASCII form: a policy
entry, a recipient domain or an MX name written with U-labels (``bücher.example``) is the
``xn--`` name certificates carry, so ``secure`` for an internationalized domain cannot be
bypassed by writing the domain the other way.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterable, Mapping
from typing import Any

from pymta.config.load import TLS_LEVELS as LEVELS  # the words the configuration accepts

__all__ = ["LEVELS", "REQUIRED", "VERIFIED", "ascii_name", "certificate_names",
           "certificate_problem", "level_for", "name_matches", "normalized_table",
           "verifying_context"]
#: The levels whose certificate is checked.
VERIFIED = frozenset(("verify", "secure"))
#: The levels that never fall back to cleartext (``dane`` once a host has usable TLSA
#: records: ``delivery.dane`` decides a host's level).
REQUIRED = frozenset(("encrypt", "dane", "verify", "secure"))


def ascii_name(name: str) -> str:
    """``name`` lower-case, without a final dot, its labels in ASCII (IDNA A-labels); as it
    is when it cannot be converted (it then matches only itself)."""
    name = name.lower().rstrip(".")
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError:
        return name


def normalized_table(table: Mapping[str, str]) -> dict[str, str]:
    """A policy table with its domains as :func:`ascii_name` makes them (``.parent`` kept)."""
    out: dict[str, str] = {}
    for domain, level in table.items():
        dot = "." if domain.startswith(".") else ""
        out[dot + ascii_name(domain[len(dot):])] = level
    return out


def level_for(nexthop: str, default: str, table: Mapping[str, str]) -> str:
    """The level of ``nexthop`` (a domain or host name): its own entry, else the nearest
    ``.parent`` entry, else ``default``. ``table`` as :func:`normalized_table` makes it."""
    name = ascii_name(nexthop)
    level = table.get(name)
    if level is not None:
        return level
    labels = name.split(".")
    for i in range(1, len(labels)):
        level = table.get("." + ".".join(labels[i:]))
        if level is not None:
            return level
    return default


def verifying_context(ca_file: str = "") -> ssl.SSLContext:
    """A client context that checks the chain (``ca_file``'s roots, else the system's) and
    leaves the name to :func:`certificate_problem` (the name to match depends on the level,
    and ``check_hostname`` knows one name only)."""
    ctx = ssl.create_default_context(cafile=ca_file or None)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def certificate_names(peercert: Mapping[str, Any]) -> list[str]:
    """The DNS names a (verified) peer certificate is for, as ``SSLSocket.getpeercert()``
    gives them: its subjectAltName DNS entries, else its Common Name(s)."""
    names = [value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"]
    if names:
        return names
    return [value for rdn in peercert.get("subject", ()) for key, value in rdn
            if key == "commonName"]


def name_matches(pattern: str, name: str) -> bool:
    """Does the certificate name ``pattern`` cover the host ``name`` (RFC 6125 §6.4)?"""
    pattern = pattern.lower().rstrip(".")
    name = ascii_name(name)
    if not pattern or not name:
        return False
    if pattern.startswith("*."):
        rest = pattern[2:]
        if "*" in rest or "." not in rest:     # no wildcard over a top-level domain
            return False
        head, dot, tail = name.partition(".")
        return bool(head) and dot == "." and tail == rest
    return "*" not in pattern and pattern == name


def certificate_problem(peercert: Mapping[str, Any] | None, level: str, mx_host: str,
                        nexthop: str) -> str:
    """Why a verified chain's certificate does not pass ``level`` for this peer, or ``""``.

    ``verify``: it must name ``mx_host``. ``secure``: ``nexthop`` or a host under it."""
    if level not in VERIFIED:
        return ""
    if not peercert:
        return "no certificate presented"
    mx_host, nexthop = ascii_name(mx_host), ascii_name(nexthop)
    names = certificate_names(peercert)
    if level == "verify":
        wanted: Iterable[str] = (mx_host,)
        if any(name_matches(p, mx_host) for p in names):
            return ""
    else:
        wanted = (nexthop, f"*.{nexthop}")
        if any(_under(p, nexthop) for p in names):
            return ""
    shown = ", ".join(names[:5]) or "none"
    return (f"certificate names ({shown}) do not match "
            f"{' or '.join(n.lower().rstrip('.') for n in wanted)}")


def _under(pattern: str, domain: str) -> bool:
    """Does the certificate name ``pattern`` cover ``domain`` itself or a host under it
    (Postfix's ``nexthop`` and ``dot-nexthop``)?"""
    pattern = pattern.lower().rstrip(".")
    domain = ascii_name(domain)
    if name_matches(pattern, domain):
        return True
    if "*" in pattern:
        # a wildcard stands for hosts one label below its base: under the domain when the
        # base is the domain or below it
        base = pattern[2:] if pattern.startswith("*.") and "*" not in pattern[2:] else ""
        return bool(base) and (base == domain or base.endswith("." + domain))
    return pattern.endswith("." + domain)
