"""SASL by LDAP authentication bind: ``mlan/postfix-amavis``'s ``LDAP_QUERY_ATTRS_PASS`` method.

As Dovecot's ``auth_bind`` with ``auth_bind_userdn`` unset: search the directory for the one
entry that matches the user name (``LDAP_QUERY_FILTER_PASS`` under ``LDAP_USER_BASE``, as the
lookup bind ``LDAP_BIND_DN``/``LDAP_BIND_PW`` or anonymously), then bind as that entry's DN
with the client's password. The directory decides; no password hash is ever read.

``LDAP_QUERY_ATTRS_PASS=uid=user`` names the attribute that holds the user name. When
``LDAP_QUERY_FILTER_PASS`` is empty it is derived from ``LDAP_QUERY_FILTER_USER`` by replacing
``(mail=%s)`` with ``(<attr>=%u)``, exactly as the image describes. The filter takes Dovecot's
variables ``%u`` (the user name after ``DOVECOT_AUTH_USERNAME_FORMAT``), ``%n`` (its part
before ``@``), ``%d`` (the domain) and ``%%``; ``%s`` is accepted as ``%u``. Values are escaped
per RFC 4515 (ldap3.utils.conv.escape_filter_chars), so ``*`` or ``)(`` in a user name match
literally and can never widen the search.

Implementation summary: ldap3 is synchronous, so each check runs in a private thread pool
with connect and receive timeouts; the coroutine also gives up after ``timeout``. An empty
password is refused before anything is sent (an LDAP simple bind with an empty password is an
*unauthenticated* bind that servers report as success). No entry, several entries or
``invalidCredentials`` mean "no" (``535``); a directory that cannot be reached or fails the
search raises TemporaryFailure (``454 4.7.0``). The password is never logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import re
import ssl
from typing import Any

from pymta.config.errors import ConfigError
from pymta.types import ConnInfo, Identity, TemporaryFailure

log = logging.getLogger("pymta.sasl")

_VAR_RE = re.compile(r"%(.)|%$", re.DOTALL)


def user_attribute(attrs_pass: str, var: str = "LDAP_QUERY_ATTRS_PASS") -> str:
    """``uid=user`` (or Dovecot's longer ``uid=user,userPassword=password``) → ``uid``."""
    for item in attrs_pass.split(","):
        ldap_attr, sep, field = item.strip().partition("=")
        if sep and field.strip() == "user" and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*",
                                                             ldap_attr.strip()):
            return ldap_attr.strip()
    raise ConfigError(f"{var}: expected <attribute>=user, e.g. uid=user: {attrs_pass!r}")


def pass_filter(attrs_pass: str, filter_pass: str, filter_user: str) -> str:
    """The search filter template for the bind DN (see the module docstring)."""
    attr = user_attribute(attrs_pass)
    if filter_pass:
        template, var = filter_pass, "LDAP_QUERY_FILTER_PASS"
    else:
        if "(mail=%s)" not in filter_user:
            raise ConfigError(
                "LDAP_QUERY_FILTER_PASS: not set, and LDAP_QUERY_FILTER_USER has no (mail=%s) "
                f"to derive it from: {filter_user!r}")
        template, var = filter_user.replace("(mail=%s)", f"({attr}=%u)"), \
            "LDAP_QUERY_FILTER_PASS (derived from LDAP_QUERY_FILTER_USER)"
    expand_pass_filter(template, "probe@example.com", var)  # refuses unknown % sequences
    if not (template.startswith("(") and template.endswith(")")):
        raise ConfigError(f"{var}: an LDAP filter must be in parentheses: {template!r}")
    return template


def expand_pass_filter(template: str, username: str,
                       var: str = "LDAP_QUERY_FILTER_PASS") -> str:
    from ldap3.utils.conv import escape_filter_chars

    local, _, domain = username.partition("@")
    values = {"u": username, "s": username, "n": local, "d": domain}

    def fill(match: re.Match[str]) -> str:
        char = match.group(1)
        if char == "%":
            return "%"
        if char is None or char not in values:
            raise ConfigError(f"{var}: unknown %-sequence (use %u, %n, %d or %%): "
                              f"{template!r}")
        return escape_filter_chars(values[char])

    return _VAR_RE.sub(fill, template)


class _Unavailable(Exception):
    pass


class LdapBindAuthenticator:
    """An :class:`~pymta.contracts.Authenticator` that binds to the directory as the user."""

    name = "ldap"

    def __init__(self, *, host: str, user_base: str, filter_template: str, bind_dn: str = "",
                 bind_pw: str = "", ca_file: str = "", timeout: float = 5.0,
                 threads: int = 4) -> None:
        from pymta.backends.ldap import parse_ldap_host

        if not user_base:
            raise ConfigError("LDAP_USER_BASE: must be set for LDAP_QUERY_ATTRS_PASS")
        self.address = parse_ldap_host(host)
        self.user_base = user_base
        self.template = filter_template
        self.bind_dn = bind_dn
        self._bind_pw = bind_pw
        self.ca_file = ca_file
        self.timeout = timeout
        self._threads = threads
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._server: Any = None

    @staticmethod
    def check_config(config: Any) -> None:
        """Check ``LDAP_QUERY_ATTRS_PASS``/``LDAP_QUERY_FILTER_PASS`` (the filter is derived
        and compiled now, so a typo stops start-up rather than every login), ``LDAP_HOST``
        and ``LDAP_USER_BASE``; builds nothing."""
        pass_filter(config.ldap_query_attrs_pass, config.ldap_query_filter_pass,
                    config.ldap_query_filter_user)
        from pymta.backends.ldap import parse_ldap_host

        parse_ldap_host(config.ldap_host)
        if not config.ldap_user_base:
            raise ConfigError("LDAP_USER_BASE: must be set for LDAP_QUERY_ATTRS_PASS")

    @classmethod
    def from_config(cls, config: Any) -> LdapBindAuthenticator:
        """The SASL method ``LDAP_QUERY_ATTRS_PASS`` (with ``LDAP_HOST``) asks for; no
        connection until the first check."""
        template = pass_filter(config.ldap_query_attrs_pass, config.ldap_query_filter_pass,
                               config.ldap_query_filter_user)
        return cls(host=config.ldap_host, user_base=config.ldap_user_base,
                   filter_template=template, bind_dn=config.ldap_bind_dn,
                   bind_pw=config.ldap_bind_pw,
                   ca_file=getattr(config, "ldap_tls_ca_file", ""),
                   timeout=getattr(config, "lookup_timeout", 5.0))

    def __repr__(self) -> str:
        return f"LdapBindAuthenticator({self.address.url})"

    def _make_server(self) -> Any:
        from ldap3 import NONE, Server, Tls

        if self._server is None:
            tls = None
            if self.address.use_ssl:
                tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.ca_file or None,
                          sni=self.address.host)
            self._server = Server(self.address.host, port=self.address.port,
                                  use_ssl=self.address.use_ssl, tls=tls, get_info=NONE,
                                  connect_timeout=self.timeout)
        return self._server

    def _connection(self, user: str | None, password: str | None) -> Any:
        from ldap3 import Connection

        return Connection(self._make_server(), user=user, password=password,
                          receive_timeout=max(1, math.ceil(self.timeout)),
                          read_only=True, raise_exceptions=False,
                          check_names=False, auto_referrals=False)

    def _find_dn(self, username: str) -> str | None:
        from ldap3 import SUBTREE
        from ldap3.core.exceptions import LDAPException

        search_filter = expand_pass_filter(self.template, username)
        conn = self._connection(self.bind_dn or None, self._bind_pw or None)
        try:
            if not conn.bind():
                raise _Unavailable(f"lookup bind failed: "
                                   f"{(conn.result or {}).get('description', 'unknown')}")
            ok = conn.search(self.user_base, search_filter, search_scope=SUBTREE,
                             attributes=["1.1"], size_limit=2)
            result = conn.result or {}
            code = result.get("result", 0)
            if not ok and code not in (0, 4, 32):  # success, sizeLimitExceeded, noSuchObject
                raise _Unavailable(f"search failed: {result.get('description', code)}")
            dns = [e["dn"] for e in (conn.response or []) if e.get("type") == "searchResEntry"]
        except LDAPException as exc:
            raise _Unavailable(str(exc)) from None
        finally:
            with contextlib.suppress(Exception):  # a broken socket: nothing left to close
                conn.unbind()
        if len(dns) != 1:
            if len(dns) > 1:
                log.warning("LDAP: %d entries match the SASL user %r; refusing", len(dns),
                            username)
            return None
        return dns[0]

    def _check(self, username: str, password: str) -> bool:
        from ldap3.core.exceptions import LDAPException

        dn = self._find_dn(username)
        if dn is None:
            return False
        conn = self._connection(dn, password)
        try:
            if conn.bind():
                return True
            code = (conn.result or {}).get("result")
            if code in (49, 50, 53):  # invalidCredentials, insufficientAccess, unwilling
                return False
            if code is None:
                raise _Unavailable("bind: no answer")
            raise _Unavailable(f"bind: {(conn.result or {}).get('description', code)}")
        except LDAPException as exc:
            raise _Unavailable(str(exc)) from None
        finally:
            with contextlib.suppress(Exception):
                conn.unbind()

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None:
        if not password or not username:
            return None
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="pymta-ldapauth")
        loop = asyncio.get_running_loop()
        try:
            ok = await asyncio.wait_for(
                loop.run_in_executor(self._executor, self._check, username, password),
                self.timeout * 3)
        except _Unavailable as exc:
            log.warning("LDAP SASL check failed: %s", exc)
            raise TemporaryFailure("Temporary authentication failure", "4.7.0", 454) from None
        except TimeoutError:
            log.warning("LDAP SASL check timed out (%s)", self.address.url)
            raise TemporaryFailure("Temporary authentication failure", "4.7.0", 454) from None
        return Identity(username) if ok else None

    async def probe(self) -> str:
        """``pymta health`` (:class:`~pymta.contracts.Probeable`): bind as the search for the
        user's DN does (``LDAP_BIND_DN`` or anonymous) and read ``LDAP_USER_BASE``."""
        from pymta.backends.ldap import probe_directory

        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix="pymta-ldapauth")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._executor, probe_directory, self._connection(self.bind_dn or None,
                                                              self._bind_pw or None),
            self.user_base, self.bind_dn, self.timeout)

    async def aclose(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
