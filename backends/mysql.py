"""Recipient lookup in a MySQL/MariaDB database: ``mlan/postfix-amavis``'s "MySQL mailbox lookup".

``MYSQL_QUERY_ALIAS`` (optional) is asked first, as Postfix asks ``virtual_alias_maps``
before ``virtual_mailbox_maps``: the first column of every row is an alias target (a value may
hold several, comma separated). ``MYSQL_QUERY_USER`` is asked next: the first column of the
first row is the mailbox path relative to the mail directory, the Postfix meaning of a
``virtual_mailbox_maps`` result; the image's example ``select mail from users where
mail='%s'`` therefore gives the mbox file named after the address, the same mailbox a
``MAIL_BOXES`` entry without ``:mailbox`` gets. A NULL or empty value counts as no row.
Alias targets come back unresolved (local Targets without a mailbox) for
:class:`~pymta.backends.chain.LookupChain` to resolve across all sources.

The image's queries are Postfix templates with ``'%s'`` inside quotes. They are compiled once
into parameterised SQL: ``'%s'``, ``"%s"`` and bare ``%s`` (the address), ``%u`` (local part),
``%d`` (domain) become driver placeholders and the values travel as bound parameters, never
spliced into the SQL text, so ``x' OR '1'='1@example.com`` is just an address nobody has.
``%%`` is a literal ``%``; any other ``%`` sequence is a ConfigError.

Implementation summary: an aiomysql pool (created on first use, so a database that is down at
start-up does not stop the MTA) with a connect timeout and a per-query timeout. A failed query
is retried once on a fresh connection (a restarted server leaves dead pooled connections);
then TemporaryFailure (``451 4.3.0``). A connection interrupted mid-query is closed, never
returned to the pool. ``aclose()`` closes the pool when the MTA stops.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from typing import Any

from pymta.backends._mysqlpool import MysqlPool, MysqlUnavailable
from pymta.backends.table import check_mailbox_path
from pymta.config.errors import ConfigError
from pymta.types import Address, Destination, Target, TemporaryFailure

log = logging.getLogger("pymta.mysql")

_TEMPLATE_RE = re.compile(r"""'%([A-Za-z])'|"%([A-Za-z])"|%(.)|%$""", re.DOTALL)
_PARTS = {"s": "full", "u": "local", "d": "domain"}


@dataclass(frozen=True, slots=True)
class CompiledQuery:
    """A Postfix-style query as parameterised SQL plus which address part fills each slot."""

    sql: str
    params: tuple[str, ...]     # "full" | "local" | "domain", one per placeholder

    def args(self, address: str) -> tuple[str, ...]:
        local, _, domain = address.rpartition("@")
        parts = {"full": address, "local": local, "domain": domain.lower()}
        return tuple(parts[p] for p in self.params)


def compile_query(template: str, var: str) -> CompiledQuery:
    """Turn ``select mail from users where mail='%s'`` into ``... mail=%s`` + ("full",)."""
    params: list[str] = []

    def replace(match: re.Match[str]) -> str:
        quoted = match.group(1) or match.group(2)
        char = quoted or match.group(3)
        if char is None:
            raise ConfigError(f"{var}: query ends with a lone %: {template!r}")
        if char == "%" and not quoted:
            return "%%"  # stays a literal % through the driver's formatting
        if char not in _PARTS:
            raise ConfigError(f"{var}: unsupported %{char} in query (use %s, %u, %d or %%): "
                              f"{template!r}")
        params.append(_PARTS[char])
        return "%s"

    sql = _TEMPLATE_RE.sub(replace, template.strip()).rstrip().rstrip(";").rstrip()
    if not sql:
        raise ConfigError(f"{var}: empty query")
    if not params:
        raise ConfigError(f"{var}: the query never uses the address (%s, %u or %d): "
                          f"{template!r}")
    return CompiledQuery(sql, tuple(params))


def parse_mysql_host(value: str, var: str = "MYSQL_HOST") -> tuple[str, int]:
    """``db`` or ``db:3306`` (``[::1]:3306`` for IPv6)."""
    text = value.strip()
    if text.startswith("mysql://"):
        text = text[len("mysql://"):].rstrip("/")
    if not text or " " in text:
        raise ConfigError(f"{var}: expected host or host:port: {value!r}")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{var}: expected [address]:port: {value!r}")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"{var}: no host name: {value!r}")
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise ConfigError(f"{var}: not a port number: {value!r}")
    return host, int(port_text) if port_text else 3306


@dataclass(frozen=True, slots=True)
class MysqlSettings:
    host: str
    database: str
    query_user: str
    query_alias: str = ""
    user: str = ""
    password: str = ""
    timeout: float = 5.0
    pool_size: int = 10

    @classmethod
    def from_config(cls, config: Any) -> MysqlSettings:
        """The ``MYSQL_*`` settings of a Config, as they are (:meth:`check` checks them)."""
        return cls(host=config.mysql_host, database=config.mysql_database,
                   query_user=config.mysql_query_user, query_alias=config.mysql_query_alias,
                   user=config.mysql_user, password=config.mysql_password,
                   timeout=config.lookup_timeout)

    def check(self) -> tuple[str, int, CompiledQuery, CompiledQuery | None]:
        """(host, port, user query, alias query); ConfigError naming the variable."""
        host, port = parse_mysql_host(self.host)
        if not self.database:
            raise ConfigError("MYSQL_DATABASE: must be set when MYSQL_HOST is")
        if not self.query_user:
            raise ConfigError("MYSQL_QUERY_USER: must be set when MYSQL_HOST is")
        user_query = compile_query(self.query_user, "MYSQL_QUERY_USER")
        alias_query = (compile_query(self.query_alias, "MYSQL_QUERY_ALIAS")
                       if self.query_alias else None)
        return host, port, user_query, alias_query


class MysqlLookup:
    """A :class:`~pymta.contracts.RecipientLookup` over SQL queries (see module doc)."""

    def __init__(self, settings: MysqlSettings) -> None:
        s = settings
        self.settings = s
        self.host, self.port, self._user_query, self._alias_query = s.check()
        if importlib.util.find_spec("aiomysql") is None:
            raise ConfigError("MYSQL_HOST: needs the aiomysql package "
                              "(pip install 'pymta-server[mysql]')")
        self.pool = MysqlPool(host=self.host, port=self.port, database=s.database,
                              user=s.user, password=s.password, timeout=s.timeout,
                              size=s.pool_size)

    @property
    def queries(self) -> int:
        """Queries sent, for metrics and tests."""
        return self.pool.queries

    @classmethod
    def from_config(cls, config: Any) -> MysqlLookup:
        """The lookup ``MYSQL_HOST`` and the ``MYSQL_*`` settings describe. Opens no
        connection (the pool connects at the first lookup)."""
        return cls(MysqlSettings.from_config(config))

    @staticmethod
    def check_config(config: Any) -> None:
        """Check those settings, building nothing (``pymta check-config``). Query templates
        set without ``MYSQL_HOST`` are checked too: a typo stops start-up either way."""
        if config.mysql_host:
            MysqlSettings.from_config(config).check()
            return
        for var, template in (("MYSQL_QUERY_USER", config.mysql_query_user),
                              ("MYSQL_QUERY_ALIAS", config.mysql_query_alias)):
            if template:
                compile_query(template, var)

    def __repr__(self) -> str:
        return f"MysqlLookup({self.host}:{self.port}/{self.settings.database})"

    # ------------------------------------------------------------------ pool

    async def aclose(self) -> None:
        """Close the pool (at MTA stop); a later lookup would open a new one."""
        await self.pool.aclose()

    async def probe(self) -> str:
        """``pymta health`` (:class:`~pymta.contracts.Probeable`): the lookup's own pool
        connects and asks ``SELECT VERSION()``."""
        return await self.pool.probe()

    async def _query(self, query: CompiledQuery, address: str) -> list[Any]:
        """First-column values of every row; TemporaryFailure when the server can't answer."""
        try:
            rows, _ = await self.pool.query(query.sql, query.args(address))
        except MysqlUnavailable as exc:
            log.warning("MySQL %s:%d: %s", self.host, self.port, _describe(exc.__cause__))
            raise TemporaryFailure("Temporary lookup failure (database unavailable)") from None
        return [row[0] for row in rows if row and row[0] is not None]

    # ------------------------------------------------------------------ lookup

    async def lookup(self, address: Address) -> Destination | None:
        """Alias query, then user query; unresolved alias targets for the chain."""
        text = address.text
        key = address.key
        if self._alias_query is not None:
            targets: list[str] = []
            for value in await self._query(self._alias_query, text):
                targets.extend(t.strip() for t in _text(value).split(",") if t.strip())
            out: list[Target] = []
            seen: set[str] = set()
            for target in targets:
                tkey = target.lower()
                if tkey in seen:
                    continue
                seen.add(tkey)
                if tkey == key:  # self-reference: keep a copy in its own mailbox
                    box = await self._mailbox(text)
                    if box is not None:
                        out.append(box)
                else:
                    out.append(Target(target, True, None))
            if out:
                return Destination(tuple(out))
        box = await self._mailbox(text)
        return Destination((box,)) if box is not None else None

    async def _mailbox(self, text: str) -> Target | None:
        values = [_text(v).strip() for v in await self._query(self._user_query, text)]
        values = [v for v in values if v]
        if not values:
            return None
        problem = check_mailbox_path(values[0])
        if problem:
            log.error("MYSQL_QUERY_USER result for <%s> is unusable: %s", text, problem)
            raise TemporaryFailure("Temporary lookup failure (bad mailbox in database)",
                                   "4.3.5")
        return Target(text, True, values[0])


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}"
