"""What a reload (SIGHUP) may change in a running server, and what waits for a restart.

Administrators reload an MTA with ``kill -HUP`` after editing its tables or replacing its
certificates; a restart would refuse connections meanwhile and cut sessions. A reload here
re-reads the configuration (the TOML file; the environment of a process does not change)
and takes over only the settings whose parts can be rebuilt beside the running ones and
swapped in one step: the recipient tables and directory lookups, the SASL users (also
``PYMTA_SASL_PASSWD_FILE``, re-read every time), the server certificates (their files
re-read every time), ``MYNETWORKS`` and ``SYSLOG_LEVEL``. Every other changed setting is
named in the log as waiting for a restart and keeps its running value, so the server never
runs half of a new configuration: listeners, queue, delivery and the pipeline stay as they
started. Turning TLS or SASL on or off changes which ports listen: a restart, too.

:func:`plan` is pure (old and new Config in, the merged Config and the two lists out), so a
worker process and the supervisor that forks replacements compute the same result.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pymta.acme import VARIABLE as ACME_VARIABLE
from pymta.config.load import setting_names
from pymta.config.model import Config
from pymta.servertls import explicit_files, tls_configured

__all__ = ["ReloadPlan", "is_reloadable", "plan"]

_RELOADABLE = frozenset({
    # recipients: the lookup chain is rebuilt (a fresh cache) and swapped
    "mail_boxes", "mail_aliases", "regex_alias",
    "ldap_host", "ldap_user_base", "ldap_query_filter_user", "ldap_query_attrs_user",
    "ldap_group_base", "ldap_query_filter_alias", "ldap_query_filter_group",
    "ldap_query_filter_expand", "ldap_bind_dn", "ldap_bind_pw", "ldap_tls_ca_file",
    "mysql_host", "mysql_database", "mysql_user", "mysql_password", "mysql_query_user",
    "mysql_query_alias", "lookup_cache_ttl", "lookup_negative_ttl", "lookup_timeout",
    # SASL: the authenticator is rebuilt and swapped
    "smtpd_sasl_clientauth", "sasl_passwd_file", "smtpd_sasl_imaphost",
    "ldap_query_attrs_pass", "ldap_query_filter_pass", "mysql_query_pass",
    "dovecot_auth_username_format",
    # policy read per connection or per line
    "mynetworks", "syslog_level",
})
# The server certificates (pymta.tls): every setting of the server side of TLS, including
# those of ACME.
_RELOADABLE_PREFIXES = ("smtpd_tls_", "acme_")


def is_reloadable(field_name: str) -> bool:
    """Whether a reload takes over a new value of the Config field ``field_name``."""
    return field_name in _RELOADABLE or field_name.startswith(_RELOADABLE_PREFIXES)


@dataclass(frozen=True)
class ReloadPlan:
    """``config``: the running configuration with the reloadable settings of the new one.
    ``changed``: the variables whose new values a reload applies. ``restart``: the
    variables that changed but keep their running values until a restart."""

    config: Config
    changed: tuple[str, ...]
    restart: tuple[str, ...]


def plan(old: Config, new: Config, *, tls_running: bool | None = None) -> ReloadPlan:
    """Compare two configurations: what a reload applies and what it leaves for a restart.
    ``extra`` (the TOML ``[extra]`` table, read by embedders' own adapters) is never
    applied: the adapters that read it are not rebuilt.

    ``tls_running``: whether the running server started with TLS. Pass it: whether TLS is
    on depends on the file system too (an ``ACME_FILE`` that appeared since the start), so
    ``old`` looked at now may not say how the server started."""
    names = setting_names()
    changed: list[str] = []
    restart: list[str] = []
    take: dict[str, object] = {}
    # Which ports listen, and whether STARTTLS is offered, depend on whether TLS and SASL
    # are on at all.
    tls_before = tls_configured(old) if tls_running is None else tls_running
    tls_after = tls_configured(new)
    if tls_before != tls_after:
        restart.append("TLS " + ("on" if tls_after else "off")
                       + (f" ({ACME_VARIABLE} {'appeared' if tls_after else 'is gone'})"
                          if new.acme_file and not explicit_files(new)
                          and not new.smtpd_use_tls else ""))
    toggles = tls_before != tls_after or bool(old.sasl_methods) != bool(new.sasl_methods)
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        name = names.get(f.name, f.name)
        if is_reloadable(f.name) and not toggles:
            take[f.name] = after
            changed.append(name)
        else:
            restart.append(name)
    merged = dataclasses.replace(old, **take) if take else old   # type: ignore[arg-type]
    return ReloadPlan(merged, tuple(changed), tuple(restart))
