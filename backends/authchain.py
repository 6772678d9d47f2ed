"""The configured SASL methods, tried in order until one says yes (``mlan/postfix-amavis``: "all
authentication methods are attempted one after another").

:class:`AuthChain` is itself an :class:`~pymta.contracts.Authenticator` (and a
:class:`~pymta.contracts.CramMD5Authenticator`, supporting it when all its methods do). It
applies ``DOVECOT_AUTH_USERNAME_FORMAT`` (``%Ln``: lower-case, domain dropped; Dovecot's
default ``%Lu``) once, before any method sees the name, then asks each method with a time
limit.
The first Identity wins. When no method says yes and at least one could not answer
(TemporaryFailure, a timeout, an unexpected error) the chain raises TemporaryFailure
(``454 4.7.0``): a backend that is down must never turn a right password into ``535``.

Which methods exist follows from the variables (``Config.sasl_methods``; the wiring,
:func:`pymta.wiring.build_authenticator`, builds them by name): ``SMTPD_SASL_CLIENTAUTH`` →
password file, ``LDAP_QUERY_ATTRS_PASS`` (+ ``LDAP_HOST``) → LDAP bind, ``MYSQL_QUERY_PASS``
(+ ``MYSQL_HOST``) → MySQL, ``SMTPD_SASL_IMAPHOST`` → remote IMAP.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from pymta.backends.passwd import check_username_format, format_username
from pymta.contracts import Authenticator, Closeable, CramMD5Authenticator
from pymta.types import ConnInfo, Identity, TemporaryFailure

log = logging.getLogger("pymta.sasl")


def _temporary() -> TemporaryFailure:
    return TemporaryFailure("Temporary authentication failure", "4.7.0", 454)


class AuthChain:
    """Several authenticators as one (see module doc)."""

    def __init__(self, methods: Sequence[Authenticator], username_format: str = "%Lu",
                 timeout: float = 15.0) -> None:
        self.methods = list(methods)
        self.username_format = username_format
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"AuthChain({', '.join(repr(m) for m in self.methods)})"

    @staticmethod
    def check_config(config: Any) -> None:
        """Check ``DOVECOT_AUTH_USERNAME_FORMAT`` (only ``%u``, ``%n``, ``%d`` …)."""
        check_username_format(config.dovecot_auth_username_format)

    @property
    def supports_cram_md5(self) -> bool:
        """True only when every method can check a CRAM-MD5 digest (holds plaintext secrets)."""
        return bool(self.methods) and all(
            isinstance(m, CramMD5Authenticator) and m.supports_cram_md5 for m in self.methods)

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None:
        name = format_username(username, self.username_format)
        return await self._run(lambda m: m.authenticate(name, password, conn), name)

    async def authenticate_cram_md5(self, username: str, challenge: str, digest: str,
                                    conn: ConnInfo) -> Identity | None:
        name = format_username(username, self.username_format)
        # Offered only when every method is a CramMD5Authenticator (``supports_cram_md5``).
        return await self._run(
            lambda m: m.authenticate_cram_md5(name, challenge, digest, conn), name)

    async def _run(self, call: Any, name: str) -> Identity | None:
        unavailable = False
        for method in self.methods:
            try:
                identity = await asyncio.wait_for(call(method), self.timeout)
            except TemporaryFailure:
                unavailable = True
                continue
            except TimeoutError:
                log.warning("SASL method %r did not answer within %gs", method, self.timeout)
                unavailable = True
                continue
            except Exception as exc:  # noqa: BLE001 - a broken method is "cannot answer"
                # Only the type and text: a traceback's frames could show arguments.
                log.error("SASL method %r failed: %s: %s", method, type(exc).__name__, exc)
                unavailable = True
                continue
            if identity is not None:
                return identity
        if unavailable:
            raise _temporary()
        return None

    async def aclose(self) -> None:
        for method in self.methods:
            if isinstance(method, Closeable):
                try:
                    await method.aclose()
                except Exception as exc:  # noqa: BLE001 - the other methods must close too
                    log.debug("closing %r: %s", method, exc)
