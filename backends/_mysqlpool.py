"""One lazily opened aiomysql pool with the query discipline both MySQL adapters need.

The recipient lookup (``mysql.py``) and the SASL check (``mysqlauth.py``) ask the same kind of
server the same way: bound parameters only, a timeout on every step, and one retry on a fresh
connection when a pooled one turns out to be dead (the server restarted, an idle connection
was cut). A connection that failed mid-query is closed, never reused: its state is unknown.
Callers turn :class:`MysqlUnavailable` into their own temporary SMTP reply.
"""

from __future__ import annotations

import asyncio
from typing import Any


class MysqlUnavailable(Exception):
    """The server could not answer (twice); ``__cause__`` is the last error."""


class MysqlPool:
    def __init__(self, *, host: str, port: int, database: str, user: str = "",
                 password: str = "", timeout: float = 5.0, size: int = 10) -> None:
        self.host = host
        self.port = port
        self.database = database
        self._user = user
        self._password = password
        self.timeout = timeout
        self.size = size
        self._pool: Any = None
        self._lock = asyncio.Lock()
        self.queries = 0   # queries sent, for metrics and tests

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def _get(self) -> Any:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    import aiomysql

                    self._pool = await aiomysql.create_pool(
                        minsize=0, maxsize=self.size, host=self.host, port=self.port,
                        user=self._user or None, password=self._password, db=self.database,
                        connect_timeout=self.timeout, autocommit=True, charset="utf8mb4",
                        pool_recycle=3600)
        return self._pool

    async def aclose(self) -> None:
        """Close the pool (at MTA stop); a later query opens a new one."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            await pool.wait_closed()

    async def probe(self) -> str:
        """``pymta health``: connect (as the adapters do, pool and retry included) and ask
        ``SELECT VERSION()``, as cheap as ``SELECT 1`` and it says who answered. Raises
        :class:`MysqlUnavailable` with the server's or the socket's own words."""
        try:
            rows, _ = await self.query("SELECT VERSION()", ())
        except MysqlUnavailable as exc:
            cause = exc.__cause__
            what = "timed out" if isinstance(cause, TimeoutError) else (
                f"{type(cause).__name__}: {cause}" if cause is not None else str(exc))
            raise MysqlUnavailable(f"database {self.database}: {what}") from None
        version = rows[0][0] if rows and rows[0] else "?"
        if isinstance(version, bytes | bytearray):
            version = version.decode("utf-8", "replace")
        return f"database {self.database} answers (server {version})"

    async def query(self, sql: str, args: tuple[Any, ...], *,
                    first_only: bool = False) -> tuple[list[tuple[Any, ...]], list[str]]:
        """(rows, lower-case column names); only the first row when ``first_only``."""
        import pymysql

        last: BaseException | None = None
        for _attempt in range(2):
            conn = None
            pool = None
            try:
                pool = await self._get()
                conn = await asyncio.wait_for(pool.acquire(), self.timeout)
                self.queries += 1
                async with conn.cursor() as cur:
                    await asyncio.wait_for(cur.execute(sql, args), self.timeout)
                    if first_only:
                        row = await asyncio.wait_for(cur.fetchone(), self.timeout)
                        rows = [row] if row else []
                    else:
                        rows = list(await asyncio.wait_for(cur.fetchall(), self.timeout))
                    names = [d[0].lower() for d in (cur.description or ())]
            except (pymysql.err.MySQLError, TimeoutError, OSError) as exc:
                last = exc
                if conn is not None:
                    conn.close()  # mid-query state is unknown: never reuse it
                continue
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            finally:
                if conn is not None and pool is not None:
                    pool.release(conn)
            return rows, names
        raise MysqlUnavailable(str(last)) from last
