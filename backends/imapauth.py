"""SASL against a remote IMAP server: ``mlan/postfix-amavis``'s ``SMTPD_SASL_IMAPHOST`` method
(Dovecot's "remote IMAP" passdb).

``SMTPD_SASL_IMAPHOST=app`` or ``app:143`` names the server; the credentials are right when
an IMAP ``LOGIN`` with them succeeds. Port 993 means implicit TLS; on any other port the
connection is upgraded with ``STARTTLS`` whenever the server offers it, so the password is
not sent in the clear to a server that can do better. The upgrade is opportunistic (the
server's certificate is not verified), as Dovecot's remote-IMAP passdb does by default.

Client: aioimaplib. Its ``LOGIN`` sends the user name as a bare atom, so this module sends
its own ``LOGIN`` with both arguments as quoted strings (and refuses names or passwords with
CR, LF or NUL, which a quoted string cannot carry), so a SASL user name can never inject an
IMAP command. aioimaplib logs every line it sends at DEBUG; its logger is held at INFO so
``SYSLOG_LEVEL=7`` cannot put a password in a log.

Answers: ``OK`` → yes; ``NO``/``BAD`` → no (``535``), except ``NO [UNAVAILABLE]`` (the IMAP
server's own backend is down) and any connection problem or timeout, which raise
TemporaryFailure (``454 4.7.0``). One connection per check, closed with ``LOGOUT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

from pymta.config.errors import ConfigError
from pymta.tls import client_ssl_context
from pymta.types import ConnInfo, Identity, TemporaryFailure

log = logging.getLogger("pymta.sasl")
# aioimaplib's DEBUG lines include what it sends; keep them out of every log.
logging.getLogger("aioimaplib").setLevel(logging.INFO)
logging.getLogger("aioimaplib.aioimaplib").setLevel(logging.INFO)

VAR = "SMTPD_SASL_IMAPHOST"
_FORBIDDEN = ("\r", "\n", "\0")


def parse_imap_host(value: str, var: str = VAR) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port``; the port defaults to 143."""
    text = value.strip()
    if text.lower().startswith("imap://"):
        text = text[7:].rstrip("/")
    if not text or any(c.isspace() for c in text):
        raise ConfigError(f"{var}: expected host or host:port: {value!r}")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{var}: expected [address]:port: {value!r}")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    elif ":" in text:
        raise ConfigError(f"{var}: IPv6 addresses need brackets, as in [::1]:143: {value!r}")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"{var}: no host name: {value!r}")
    if port_text and (not port_text.isdigit() or not 0 < int(port_text) < 65536):
        raise ConfigError(f"{var}: not a port number (1-65535): {value!r}")
    return host, int(port_text) if port_text else 143


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class _Unavailable(Exception):
    pass


class ImapAuthenticator:
    """An :class:`~pymta.contracts.Authenticator` that logs in to a remote IMAP server."""

    name = "imap"

    def __init__(self, host: str, port: int = 143, timeout: float = 10.0) -> None:
        self.host = host
        self.port = port
        self.timeout = timeout

    @staticmethod
    def check_config(config: Any) -> None:
        """Check ``SMTPD_SASL_IMAPHOST``; builds nothing."""
        parse_imap_host(config.smtpd_sasl_imaphost)

    @classmethod
    def from_config(cls, config: Any) -> ImapAuthenticator:
        """The SASL method ``SMTPD_SASL_IMAPHOST`` asks for (a connection per check)."""
        host, port = parse_imap_host(config.smtpd_sasl_imaphost)
        return cls(host, port, timeout=max(getattr(config, "lookup_timeout", 5.0), 5.0))

    def __repr__(self) -> str:
        return f"ImapAuthenticator({self.host}:{self.port})"

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None:
        if not username or not password or any(
                c in username or c in password for c in _FORBIDDEN):
            return None
        try:
            ok = await asyncio.wait_for(self._login(username, password), self.timeout)
        except _Unavailable as exc:
            log.warning("IMAP SASL check on %s:%d failed: %s", self.host, self.port, exc)
            raise TemporaryFailure("Temporary authentication failure", "4.7.0", 454) from None
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.warning("IMAP SASL check on %s:%d failed: %s", self.host, self.port,
                        type(exc).__name__ + (f": {exc}" if str(exc) else ""))
            raise TemporaryFailure("Temporary authentication failure", "4.7.0", 454) from None
        return Identity(username) if ok else None

    def _client(self) -> Any:
        """An aioimaplib client connecting now (implicit TLS on port 993)."""
        import aioimaplib

        if self.port == 993:
            return aioimaplib.IMAP4_SSL(self.host, self.port, timeout=self.timeout,
                                        ssl_context=client_ssl_context())
        return aioimaplib.IMAP4(self.host, self.port, timeout=self.timeout)

    async def probe(self) -> str:
        """``pymta health`` (:class:`~pymta.contracts.Probeable`): what a check does up to
        its ``LOGIN``: the greeting, ``CAPABILITY`` (aioimaplib asks), ``STARTTLS`` when
        offered; then ``LOGOUT``. Raises saying what failed (a refused connection, a bad
        greeting, ``PREAUTH``, ``LOGINDISABLED``, a failed TLS upgrade)."""
        async with self._session() as (_, tls):
            return f"IMAP greeting{' and TLS' if tls else ' (no TLS)'}, LOGIN allowed"

    async def _login(self, username: str, password: str) -> bool:
        import aioimaplib

        async with self._session() as (proto, _):
            secret = _quoted(password)
            response = await proto.execute(
                aioimaplib.Command("LOGIN", proto.new_tag(), _quoted(username), secret,
                                   loop=asyncio.get_running_loop()),
                scrub=secret)
            if response.result == "OK":
                proto.state = "AUTH"
                return True
            text = b" ".join(response.lines).decode("utf-8", "replace")
            if "[UNAVAILABLE]" in text.upper():
                raise _Unavailable(f"server says: {text[:200]}")
            return False

    @contextlib.asynccontextmanager
    async def _session(self) -> AsyncIterator[tuple[Any, bool]]:
        """A connection ready for ``LOGIN``: (its aioimaplib protocol, whether it is
        encrypted). Greeting, ``STARTTLS`` when offered; ``PREAUTH`` and ``LOGINDISABLED``
        raise _Unavailable; ``LOGOUT`` and close at the end, whatever happened."""
        import aioimaplib

        client = self._client()
        proto = None
        try:
            try:
                await client.wait_hello_from_server()
            except aioimaplib.Error as exc:
                raise _Unavailable(f"bad greeting: {exc}") from None
            proto = client.protocol
            if proto.state == "AUTH":  # PREAUTH: the server trusts us without a login
                raise _Unavailable("server sent PREAUTH; cannot check passwords")
            tls = self.port == 993
            if not tls and "STARTTLS" in proto.capabilities:
                await self._starttls(proto)
                tls = True
            if "LOGINDISABLED" in proto.capabilities:
                raise _Unavailable("server refuses LOGIN (LOGINDISABLED)")
            yield proto, tls
        except aioimaplib.Abort:
            # not the message: aioimaplib puts the pending command, password included, in it
            raise _Unavailable("IMAP protocol error") from None
        finally:
            if proto is not None and proto.transport is not None:
                with contextlib.suppress(Exception):
                    if proto.state in ("AUTH", "NONAUTH"):
                        await asyncio.wait_for(client.logout(), 2)
                with contextlib.suppress(Exception):
                    proto.transport.close()

    async def _starttls(self, proto: Any) -> None:
        import aioimaplib

        loop = asyncio.get_running_loop()
        response = await proto.execute(aioimaplib.Command("STARTTLS", proto.new_tag(),
                                                          loop=loop))
        if response.result != "OK":
            raise _Unavailable("STARTTLS refused")
        proto.transport = await loop.start_tls(proto.transport, proto, client_ssl_context(),
                                               server_hostname=self.host)
        await proto.capability()  # RFC 3501 §6.2.1: forget pre-TLS capabilities
