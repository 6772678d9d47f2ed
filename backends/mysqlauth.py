"""SASL against a MySQL/MariaDB table: ``mlan/postfix-amavis``'s ``MYSQL_QUERY_PASS`` method.

The image hands ``MYSQL_QUERY_PASS`` to Dovecot's SQL passdb, e.g.
``select password, userid as user from users where userid = '%u'``. The query returns the
stored password as a ``{SCHEME}hash`` (``{PLAIN-MD5}5ebe…`` in the image's table), verified by
:func:`pymta.backends.passwd.averify_password`; a ``user`` column, when present, becomes the
authenticated identity (Dovecot's ``user`` field), otherwise the name the client gave.

The template takes Dovecot's variables: ``%u`` (the user name after
``DOVECOT_AUTH_USERNAME_FORMAT``), ``%n`` (before ``@``), ``%d`` (the domain), each optionally
``%L…`` (lower-case), and ``%%``. The image writes them inside quotes (``'%u'``): the template
is compiled once into parameterised SQL, quotes and all, so the values travel as bound
parameters and are never spliced into the SQL text (``x' OR '1'='1`` is just a user nobody
is).

Implementation summary: an aiomysql pool created on first use (a database that is down at
start-up does not stop the MTA), connect and query timeouts, one retry on a fresh connection;
a database that cannot answer raises TemporaryFailure (``454 4.7.0``). No row, a NULL
password or a wrong password is "no" (``535``). The password is never logged.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

from pymta.backends._mysqlpool import MysqlPool, MysqlUnavailable
from pymta.backends.passwd import averify_password
from pymta.config.errors import ConfigError
from pymta.types import ConnInfo, Identity, TemporaryFailure

log = logging.getLogger("pymta.sasl")

VAR = "MYSQL_QUERY_PASS"
_TEMPLATE_RE = re.compile(r"""'(%[LU]?[a-zA-Z])'|"(%[LU]?[a-zA-Z])"|(%[LU]?.)|%$""",
                          re.DOTALL)


@dataclass(frozen=True, slots=True)
class PassQuery:
    sql: str
    params: tuple[tuple[str, str], ...]     # (modifier, variable) per placeholder

    def args(self, username: str) -> tuple[str, ...]:
        local, _, domain = username.partition("@")
        values = {"u": username, "n": local, "d": domain, "s": username}
        out = []
        for modifier, var in self.params:
            value = values[var]
            out.append(value.lower() if modifier == "L" else value.upper() if modifier == "U"
                       else value)
        return tuple(out)


def compile_pass_query(template: str, var: str = VAR) -> PassQuery:
    """``... where userid = '%u'`` → ``... where userid = %s`` with ("", "u")."""
    params: list[tuple[str, str]] = []

    def replace(match: re.Match[str]) -> str:
        token = match.group(1) or match.group(2) or match.group(3)
        if token is None:
            raise ConfigError(f"{var}: query ends with a lone %: {template!r}")
        if token == "%%":
            return "%%"
        modifier = token[1] if len(token) == 3 else ""
        name = token[-1]
        if name not in "unds" or (len(token) == 3 and modifier not in "LU"):
            raise ConfigError(f"{var}: unsupported {token} in query (use %u, %n, %d, %Lu … "
                              f"or %%): {template!r}")
        params.append((modifier, name))
        return "%s"

    sql = _TEMPLATE_RE.sub(replace, template.strip()).rstrip().rstrip(";").rstrip()
    if not sql:
        raise ConfigError(f"{var}: empty query")
    if not params:
        raise ConfigError(f"{var}: the query never uses the user name (%u, %n or %d): "
                          f"{template!r}")
    return PassQuery(sql, tuple(params))


class MysqlAuthenticator:
    """An :class:`~pymta.contracts.Authenticator` over ``MYSQL_QUERY_PASS``."""

    name = "mysql"

    def __init__(self, *, host: str, database: str, query: str, user: str = "",
                 password: str = "", timeout: float = 5.0, pool_size: int = 4) -> None:
        from pymta.backends.mysql import parse_mysql_host

        self.host, self.port = parse_mysql_host(host)
        if not database:
            raise ConfigError("MYSQL_DATABASE: must be set for MYSQL_QUERY_PASS")
        self.database = database
        self.query = compile_pass_query(query)
        self.pool = MysqlPool(host=self.host, port=self.port, database=database, user=user,
                              password=password, timeout=timeout, size=pool_size)

    @staticmethod
    def check_config(config: Any) -> None:
        """Check ``MYSQL_QUERY_PASS`` (compiled now, so a typo stops start-up rather than
        every login), ``MYSQL_HOST`` and ``MYSQL_DATABASE``; builds nothing."""
        compile_pass_query(config.mysql_query_pass)
        from pymta.backends.mysql import parse_mysql_host

        parse_mysql_host(config.mysql_host)
        if not config.mysql_database:
            raise ConfigError("MYSQL_DATABASE: must be set for MYSQL_QUERY_PASS")

    @classmethod
    def from_config(cls, config: Any) -> MysqlAuthenticator:
        """The SASL method ``MYSQL_QUERY_PASS`` (with ``MYSQL_HOST``) asks for; the pool
        connects at the first check."""
        return cls(host=config.mysql_host, database=config.mysql_database,
                   query=config.mysql_query_pass, user=config.mysql_user,
                   password=config.mysql_password,
                   timeout=getattr(config, "lookup_timeout", 5.0))

    def __repr__(self) -> str:
        return f"MysqlAuthenticator({self.host}:{self.port}/{self.database})"

    async def aclose(self) -> None:
        await self.pool.aclose()

    async def probe(self) -> str:
        """``pymta health`` (:class:`~pymta.contracts.Probeable`): the method's own pool
        connects and asks ``SELECT VERSION()``."""
        return await self.pool.probe()

    async def _fetch(self, username: str) -> tuple[str | None, str | None]:
        """(stored password, user column) of the first row; (None, None) without a row."""
        try:
            rows, names = await self.pool.query(self.query.sql, self.query.args(username),
                                                first_only=True)
        except MysqlUnavailable as exc:
            last = exc.__cause__
            log.warning("MySQL SASL check on %s:%d failed: %s", self.host, self.port,
                        type(last).__name__ + (f": {last}" if last else ""))
            raise TemporaryFailure("Temporary authentication failure", "4.7.0", 454) from None
        if not rows:
            return None, None
        row = rows[0]
        index = names.index("password") if "password" in names else 0
        user = row[names.index("user")] if "user" in names else None
        return _text(row[index]), _text(user)

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None:
        if not username:
            return None
        stored, user = await self._fetch(username)
        if not stored:
            return None
        if await averify_password(password, stored):
            return Identity(user or username)
        return None


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else str(value)
