"""Recipient lookup in an LDAP directory: ``mlan/postfix-amavis``'s "LDAP mailbox lookup".

The image generates three Postfix ``ldap:`` tables from its variables; this module answers the
same questions directly:

* ``LDAP_QUERY_FILTER_ALIAS`` (searched under ``LDAP_USER_BASE``): an entry that lists the
  address as an alias; its ``mail`` values are the alias targets (virtual_alias_maps).
* ``LDAP_QUERY_FILTER_GROUP`` (under ``LDAP_GROUP_BASE``): a group whose mail is the address;
  its ``memberUid`` values are expanded with ``LDAP_QUERY_FILTER_EXPAND`` (``%s`` = the uid,
  searched under ``LDAP_USER_BASE``, where the members live) and its ``member`` /
  ``uniqueMember`` DNs are read directly; the members' ``mail`` values are the targets.
* ``LDAP_QUERY_FILTER_USER`` (under ``LDAP_USER_BASE``): a mailbox. The first value of
  ``LDAP_QUERY_ATTRS_USER`` (default ``mail``) is the mailbox path relative to the mail
  directory, exactly what Postfix's ``virtual_mailbox_maps`` with the image's
  ``virtual_mailbox_base`` makes of it: with the default, the user ``alice@example.com`` gets
  the mbox file ``<mail dir>/alice@example.com``, the same mailbox a ``MAIL_BOXES`` entry
  without ``:mailbox`` gets; an attribute holding ``example.com/alice/`` gives a maildir. When
  delivery goes to LMTP (``VIRTUAL_TRANSPORT``) the path is simply not used.

Aliases are consulted before mailboxes, as Postfix does. Alias and group targets come back
*unresolved* (local Targets without a mailbox); :class:`~pymta.backends.chain.LookupChain`
resolves them across every source, so an LDAP alias may point at a ``MAIL_BOXES`` mailbox.

Filter templates take ``%s`` (the address), ``%u`` (its local part), ``%d`` (its domain) and
``%%``; every substituted value is escaped per RFC 4515, so a recipient such as
``*)(uid=*@example.com`` is a literal value and can never widen the filter.

Implementation summary: ldap3 is synchronous, so each lookup runs in a small private thread
pool; threads borrow connections from a pool of bound ldap3 connections (one per thread at
most) and give them back after the search. Connect and receive timeouts bound every network
wait, and the coroutine also gives up after ``timeout`` seconds. A failed connection is
dropped and the search retried once on a fresh one (a restarted directory leaves stale
connections behind); if that fails too the lookup raises TemporaryFailure (``451 4.3.0``):
a directory that cannot answer never turns a recipient into "unknown".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import re
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pymta.backends.table import check_mailbox_path
from pymta.config.errors import ConfigError
from pymta.types import Address, Destination, Target, TemporaryFailure

log = logging.getLogger("pymta.ldap")

_PLACEHOLDER_RE = re.compile(r"%(.)", re.DOTALL)
_MEMBER_DN_ATTRS = ("member", "uniqueMember")
_SIZE_LIMIT = 1000          # entries per search; a bigger group is a directory problem


def escape_filter_value(text: str) -> str:
    """``text`` as an RFC 4515 assertion value: ``\\ * ( ) NUL`` become ``\\XX`` escapes."""
    from ldap3.utils.conv import escape_filter_chars

    return escape_filter_chars(text)


def expand_filter(template: str, var: str, *, full: str, local: str, domain: str) -> str:
    """Fill ``%s``/``%u``/``%d`` (escaped) and ``%%`` into a filter template.

    Any other ``%`` sequence is a ConfigError naming ``var`` (checked at start-up with dummy
    values, so a running server never meets it).
    """
    values = {"s": full, "u": local, "d": domain}

    def fill(match: re.Match[str]) -> str:
        char = match.group(1)
        if char == "%":
            return "%"
        if char in values:
            return escape_filter_value(values[char])
        raise ConfigError(f"{var}: unsupported %{char} in filter (use %s, %u, %d or %%): "
                          f"{template!r}")

    if template.endswith("%") and not template.endswith("%%"):
        raise ConfigError(f"{var}: filter ends with a lone %: {template!r}")
    return _PLACEHOLDER_RE.sub(fill, template)


@dataclass(frozen=True, slots=True)
class LdapServerAddress:
    host: str
    port: int
    use_ssl: bool

    @property
    def url(self) -> str:
        return f"{'ldaps' if self.use_ssl else 'ldap'}://{self.host}:{self.port}"


def parse_ldap_host(value: str, var: str = "LDAP_HOST") -> LdapServerAddress:
    """``auth``, ``auth:389``, ``ldap://auth:1444`` or ``ldaps://auth`` (port 636)."""
    text = value.strip()
    if not text or len(text.split()) != 1:
        raise ConfigError(f"{var}: expected one host, host:port or ldap[s]:// URL: {value!r}")
    if "://" not in text:
        text = f"ldap://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{var}: not a host, host:port or URL: {value!r}") from None
    if parts.scheme.lower() not in ("ldap", "ldaps"):
        raise ConfigError(f"{var}: scheme must be ldap:// or ldaps://: {value!r}")
    if not parts.hostname or parts.path not in ("", "/") or parts.query or parts.username:
        raise ConfigError(f"{var}: not a host, host:port or URL: {value!r}")
    use_ssl = parts.scheme.lower() == "ldaps"
    return LdapServerAddress(parts.hostname, port or (636 if use_ssl else 389), use_ssl)


@dataclass(frozen=True, slots=True)
class LdapSettings:
    """Everything the lookup needs; ``from_config`` reads it from a Config."""

    host: str
    user_base: str
    filter_user: str
    attrs_user: str = "mail"
    group_base: str = ""
    filter_alias: str = ""
    filter_group: str = ""
    filter_expand: str = ""
    bind_dn: str = ""
    bind_pw: str = ""
    ca_file: str = ""
    timeout: float = 5.0
    pool_size: int = 4

    @classmethod
    def from_config(cls, config: Any) -> LdapSettings:
        """The ``LDAP_*`` settings of a Config, as they are (:meth:`check` checks them)."""
        return cls(
            host=config.ldap_host, user_base=config.ldap_user_base,
            filter_user=config.ldap_query_filter_user,
            attrs_user=config.ldap_query_attrs_user or "mail",
            group_base=config.ldap_group_base, filter_alias=config.ldap_query_filter_alias,
            filter_group=config.ldap_query_filter_group,
            filter_expand=config.ldap_query_filter_expand, bind_dn=config.ldap_bind_dn,
            bind_pw=config.ldap_bind_pw, ca_file=config.ldap_tls_ca_file,
            timeout=config.lookup_timeout)

    def check(self) -> LdapServerAddress:
        """The server's address; ConfigError naming the variable for anything a lookup
        could not work with (a missing base or filter, a filter that does not parse)."""
        address = parse_ldap_host(self.host)
        if not self.user_base:
            raise ConfigError("LDAP_USER_BASE: must be set when LDAP_HOST is")
        if not self.filter_user:
            raise ConfigError("LDAP_QUERY_FILTER_USER: must be set when LDAP_HOST is")
        if not self.attrs_user or len(self.attrs_user.split()) != 1:
            raise ConfigError(f"LDAP_QUERY_ATTRS_USER: one attribute name: {self.attrs_user!r}")
        for var, template in (("LDAP_QUERY_FILTER_USER", self.filter_user),
                              ("LDAP_QUERY_FILTER_ALIAS", self.filter_alias),
                              ("LDAP_QUERY_FILTER_GROUP", self.filter_group),
                              ("LDAP_QUERY_FILTER_EXPAND", self.filter_expand)):
            if template:
                _check_filter(var, template)
        if self.bind_pw and not self.bind_dn:
            raise ConfigError("LDAP_BIND_DN: not set, but LDAP_BIND_PW is")
        return address


class LdapLookup:
    """A :class:`~pymta.contracts.RecipientLookup` against an LDAP directory (see module doc)."""

    def __init__(self, settings: LdapSettings) -> None:
        s = settings
        self.settings = s
        self.address = s.check()
        if s.filter_group and not s.filter_expand:
            log.info("LDAP_QUERY_FILTER_EXPAND is empty: only member DNs of groups expand, "
                     "not memberUid values")
        try:
            self._server = self._make_server()
        except ImportError:
            raise ConfigError("LDAP_HOST: needs the ldap3 package "
                              "(pip install 'pymta-server[ldap]')") from None
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.queries = 0   # searches sent, for metrics and tests

    @classmethod
    def from_config(cls, config: Any) -> LdapLookup:
        """The lookup ``LDAP_HOST`` and the ``LDAP_QUERY_*`` settings describe. Opens no
        connection (that happens at the first lookup)."""
        return cls(LdapSettings.from_config(config))

    @staticmethod
    def check_config(config: Any) -> None:
        """Check those settings, building nothing (``pymta check-config``)."""
        LdapSettings.from_config(config).check()

    def __repr__(self) -> str:
        return f"LdapLookup({self.address.url})"

    # ------------------------------------------------------------------ connections

    def _make_server(self) -> Any:
        from ldap3 import NONE, Server, Tls

        tls = None
        if self.address.use_ssl:
            tls = Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=self.settings.ca_file or None,
                      sni=self.address.host)
        return Server(self.address.host, port=self.address.port, use_ssl=self.address.use_ssl,
                      tls=tls, get_info=NONE, connect_timeout=self.settings.timeout)

    def _connection(self) -> Any:
        """A new, unbound connection as the lookup bind (``LDAP_BIND_DN`` or anonymous)."""
        from ldap3 import Connection

        s = self.settings
        return Connection(self._server, user=s.bind_dn or None, password=s.bind_pw or None,
                          receive_timeout=max(1, math.ceil(s.timeout)), read_only=True,
                          raise_exceptions=False, check_names=False, auto_referrals=False)

    def _connect(self) -> Any:
        conn = self._connection()
        if not conn.bind():
            result = conn.result or {}
            conn.unbind()
            raise _DirectoryError(f"bind failed: {result.get('description', 'unknown')}")
        return conn

    def _search(self, base: str, search_filter: str, attributes: Sequence[str],
                scope: str = "SUBTREE") -> list[dict[str, list[Any]]]:
        """One search, in a worker thread; returns each entry's attributes (values as lists)."""
        from ldap3.core.exceptions import LDAPException

        last: Exception | None = None
        for _attempt in range(2):
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            try:
                if conn is None:
                    conn = self._connect()
                with self._lock:
                    self.queries += 1
                ok = conn.search(base, search_filter, search_scope=scope,
                                 attributes=list(attributes), size_limit=_SIZE_LIMIT,
                                 time_limit=max(1, int(self.settings.timeout)))
                result = conn.result or {}
                code = result.get("result", 0)
                if not ok and code not in (0, 4, 32):  # 4 sizeLimitExceeded, 32 noSuchObject
                    raise _DirectoryError(f"search failed: {result.get('description')}")
                entries = [dict(e["attributes"]) for e in (conn.response or [])
                           if e.get("type") == "searchResEntry"]
            except (LDAPException, OSError, _DirectoryError, ValueError, TypeError) as exc:
                last = exc
                if conn is not None:
                    _quiet_unbind(conn)
                continue
            with self._lock:
                self._idle.append(conn)
            return entries
        raise _DirectoryError(str(last) or type(last).__name__)

    def _threads(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.settings.pool_size, thread_name_prefix="pymta-ldap")
        return self._executor

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._threads(), func, *args),
                                          timeout=self.settings.timeout * 3)
        except (TimeoutError, _DirectoryError) as exc:
            log.warning("LDAP %s: %s", self.address.url, exc or "timed out")
            raise TemporaryFailure("Temporary lookup failure (directory unavailable)") from None
        except Exception:  # any unexpected fault is temporary, never "unknown"
            log.exception("LDAP %s: lookup failed", self.address.url)
            raise TemporaryFailure("Temporary lookup failure (directory error)") from None

    async def aclose(self) -> None:
        """Close pooled connections and stop the worker threads (at MTA stop)."""
        executor, self._executor = self._executor, None
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            _quiet_unbind(conn)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)

    async def probe(self) -> str:
        """``pymta health`` (:class:`~pymta.contracts.Probeable`): bind as the lookups do
        and read the entry ``LDAP_USER_BASE`` names; raises saying what failed."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads(), probe_directory, self._connection(),
                                          self.settings.user_base, self.settings.bind_dn,
                                          self.settings.timeout)

    # ------------------------------------------------------------------ lookup

    async def lookup(self, address: Address) -> Destination | None:
        """Alias, then group, then mailbox; unresolved alias targets for the chain."""
        return await self._run(self._lookup_sync, address.text)

    def _lookup_sync(self, text: str) -> Destination | None:
        s = self.settings
        local, _, domain = text.rpartition("@")
        parts = {"full": text, "local": local, "domain": domain.lower()}
        key = text.lower()
        targets: list[str] = []
        if s.filter_alias:
            flt = expand_filter(s.filter_alias, "LDAP_QUERY_FILTER_ALIAS", **parts)
            for entry in self._search(s.user_base, flt, ["mail"]):
                targets.extend(_strings(entry.get("mail")))
        if s.filter_group:
            targets.extend(self._group_members(parts))
        if targets:
            out: list[Target] = []
            seen: set[str] = set()
            for target in targets:
                tkey = target.lower()
                if tkey in seen:
                    continue
                seen.add(tkey)
                if tkey == key:  # self-reference: keep a copy in the address's own mailbox
                    box = self._mailbox(text, parts)
                    if box is not None:
                        out.append(box)
                    continue
                out.append(Target(target, True, None))
            if out:
                return Destination(tuple(out))
        box = self._mailbox(text, parts)
        return Destination((box,)) if box is not None else None

    def _mailbox(self, text: str, parts: dict[str, str]) -> Target | None:
        s = self.settings
        flt = expand_filter(s.filter_user, "LDAP_QUERY_FILTER_USER", **parts)
        entries = self._search(s.user_base, flt, [s.attrs_user])
        if not entries:
            return None
        values = _strings(entries[0].get(s.attrs_user))
        if not values:
            raise _DirectoryError(f"user entry for <{text}> has no {s.attrs_user} attribute")
        mailbox = values[0]
        problem = check_mailbox_path(mailbox)
        if problem:
            raise _DirectoryError(f"{s.attrs_user} of <{text}> is unusable: {problem}")
        return Target(text, True, mailbox)

    def _group_members(self, parts: dict[str, str]) -> list[str]:
        s = self.settings
        flt = expand_filter(s.filter_group, "LDAP_QUERY_FILTER_GROUP", **parts)
        groups = self._search(s.group_base or s.user_base, flt,
                              ["memberUid", *_MEMBER_DN_ATTRS])
        uids: list[str] = []
        dns: list[str] = []
        for group in groups:
            uids.extend(_strings(group.get("memberUid")))
            for attr in _MEMBER_DN_ATTRS:
                dns.extend(_strings(group.get(attr)))
        mails: list[str] = []
        if uids and s.filter_expand:
            alternatives = "".join(
                expand_filter(s.filter_expand, "LDAP_QUERY_FILTER_EXPAND", full=uid,
                              local=uid, domain=parts["domain"]) for uid in uids)
            flt = alternatives if len(uids) == 1 else f"(|{alternatives})"
            for entry in self._search(s.user_base, flt, ["mail"]):
                mails.extend(_strings(entry.get("mail"))[:1])
        for dn in dns:
            for entry in self._search(dn, "(objectClass=*)", ["mail"], scope="BASE"):
                mails.extend(_strings(entry.get("mail"))[:1])
        return mails


class _DirectoryError(Exception):
    """The directory could not answer (becomes TemporaryFailure in the event loop)."""


def probe_directory(conn: Any, base: str, bind_dn: str, timeout: float) -> str:
    """``pymta health``'s question to a directory, on an unbound ldap3 connection (run in a
    thread): bind, then read the search base itself (scope BASE, no attributes). The
    cheapest request that proves what a lookup needs: the server answers, the bind works and
    the base exists. Raises :class:`_DirectoryError` saying which step failed (the bind
    password is never part of it); returns what answered."""
    from ldap3 import BASE
    from ldap3.core.exceptions import LDAPException

    who = f"as {bind_dn}" if bind_dn else "anonymously"
    try:
        if not conn.bind():
            result = conn.result or {}
            raise _DirectoryError(f"bind {who} failed: {result.get('description', 'no answer')}")
        ok = conn.search(base, "(objectClass=*)", search_scope=BASE, attributes=["1.1"],
                         size_limit=1, time_limit=max(1, math.ceil(timeout)))
        result = conn.result or {}
        if not ok:
            if result.get("result") == 32:     # noSuchObject
                raise _DirectoryError(f"LDAP_USER_BASE {base!r} not found")
            raise _DirectoryError(f"search of {base!r} failed: "
                                  f"{result.get('description', 'no answer')}")
    except LDAPException as exc:
        raise _DirectoryError(f"{type(exc).__name__}: {exc}") from None
    finally:
        _quiet_unbind(conn)
    return f"bound {who}, {base} found"


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | tuple):
        return [v.decode() if isinstance(v, bytes) else str(v) for v in value if v]
    return [value.decode() if isinstance(value, bytes) else str(value)] if value else []


def _quiet_unbind(conn: Any) -> None:
    with contextlib.suppress(Exception):  # a dead connection may fail to unbind in any way
        conn.unbind()


def _check_filter(var: str, template: str) -> None:
    """Refuse a filter template that cannot become a valid LDAP filter."""
    from ldap3.core.exceptions import LDAPException
    from ldap3.operation.search import parse_filter

    text = expand_filter(template, var, full="x@example.com", local="x", domain="example.com")
    try:
        parse_filter(text, None, True, True, None, False)
    except (LDAPException, ValueError, IndexError, TypeError) as exc:
        raise ConfigError(f"{var}: not a valid LDAP filter ({exc}): {template!r}") from None
