"""SMTP AUTH policy: checking the credentials a client sent, and what follows from the answer.

The protocol part stays in the engine (``pymta.smtp.engine``: the SASL exchange, ``334``
challenges, base64, cancel, line limits; it hands over finished credentials as one ``Auth``
event and never logs them). Everything else is here, in one place: which mechanisms are
offered, what a user name may contain, calling the :class:`~pymta.contracts.Authenticator`
under the framework's time limit, the delay before a ``535``, the log lines. The session
only records who the client is (``auth_user``) when this module says ``235``.

Answers: ``235 2.7.0`` with the Identity; ``535 5.7.8`` for wrong credentials or a name no
backend should see (line breaks, NUL, over 255 characters, a proxy login with a different
authorization identity), after a delay that grows with the client address's recent failures
(:class:`AuthThrottle`, ``asyncio.sleep``: every other session runs on); ``454 4.7.0`` when no
method could answer: a TemporaryFailure, any other exception (a broken authenticator: one log
line with the exception's type, no traceback, whose frames could show the password), or no
answer within ``timeout`` seconds (``PYMTA_PIPELINE_TIMEOUT``, the limit of every pre-queue
stage). Passwords never reach a log; the user name only as Postfix's ``sasl_username=``,
with control characters replaced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from pymta import metrics
from pymta.contracts import Authenticator, CramMD5Authenticator
from pymta.smtp import events as ev
from pymta.types import ConnInfo, Identity, Reply, TemporaryFailure

log = logging.getLogger("pymta.smtpd")

R_AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
R_AUTH_FAILED = Reply(535, "5.7.8", "Error: authentication failed")
R_AUTH_TEMP = Reply(454, "4.7.0", "Temporary authentication failure")

DEFAULT_TIMEOUT = 30.0      # PYMTA_PIPELINE_TIMEOUT's default


def printable(text: str) -> str:
    """A client-given name as it may appear in a log line: one line, no control bytes."""
    return "".join(c if c.isprintable() else "?" for c in text)[:255]


class AuthThrottle:
    """Per-client-address failed-AUTH counter: the delay before each ``535`` grows with the
    failures of that address (``step`` × n, at most ``maximum``); an address that fails no
    more for ``forget`` seconds starts again from zero. Bounded: at most ``max_entries``
    addresses are remembered (the oldest are dropped first)."""

    def __init__(self, step: float = 0.5, maximum: float = 5.0, forget: float = 900.0,
                 max_entries: int = 10000) -> None:
        self.step = step
        self.maximum = maximum
        self.forget = forget
        self.max_entries = max_entries
        self._failures: dict[str, tuple[int, float]] = {}

    def failed(self, ip: str) -> float:
        """Record one failure of ``ip``; return how long to wait before answering."""
        now = time.monotonic()
        count, last = self._failures.pop(ip, (0, now))
        if now - last > self.forget:
            count = 0
        count += 1
        self._failures[ip] = (count, now)  # re-inserted: dict order is recency order
        while len(self._failures) > self.max_entries:
            del self._failures[next(iter(self._failures))]
        return min(self.step * count, self.maximum)

    def failures(self, ip: str) -> int:
        return self._failures.get(ip, (0, 0.0))[0]


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The reply for the client and, with ``235``, who it is."""

    reply: Reply
    identity: Identity | None = None


class AuthPolicy:
    """The AUTH policy of one server (all its listeners share the throttle)."""

    __slots__ = ("authenticator", "throttle", "timeout")

    def __init__(self, authenticator: Authenticator, *, throttle: AuthThrottle | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.authenticator = authenticator
        self.throttle = throttle if throttle is not None else AuthThrottle()
        self.timeout = timeout

    @property
    def mechanisms(self) -> tuple[str, ...]:
        """What the submission listeners advertise: PLAIN and LOGIN, and CRAM-MD5 only when
        the authenticator can check it with the secrets it holds."""
        auth = self.authenticator
        if isinstance(auth, CramMD5Authenticator) and auth.supports_cram_md5:
            return ("PLAIN", "LOGIN", "CRAM-MD5")
        return ("PLAIN", "LOGIN")

    async def check(self, event: ev.Auth, conn: ConnInfo) -> AuthResult:
        """Check the credentials of ``event`` from the client ``conn`` describes; see the
        module docstring for the answers."""
        ip, name = conn.peer_ip, conn.peer_name
        user = event.username
        shown = printable(user)
        if (any(c in user or c in event.password for c in "\r\n\0") or len(user) > 255
                or (event.authzid and event.authzid != user)):
            # a name no backend should ever see (IMAP/LDAP syntax), or a proxy login
            log.warning("%s[%s]: SASL %s authentication failed: bad user name or "
                        "authorization id, sasl_username=%s", name, ip, event.mechanism, shown)
            return await self._failed(ip)
        try:
            async with asyncio.timeout(self.timeout):
                identity = await self._ask(event, conn)
        except TemporaryFailure as exc:
            log.warning("%s[%s]: SASL %s authentication failed: %s, sasl_username=%s",
                        name, ip, event.mechanism, exc.reply.text, shown)
            metrics.error("auth")
            return AuthResult(R_AUTH_TEMP)
        except TimeoutError:
            log.warning("%s[%s]: SASL %s authentication failed: no answer within %gs, "
                        "sasl_username=%s", name, ip, event.mechanism, self.timeout, shown)
            metrics.error("auth")
            return AuthResult(R_AUTH_TEMP)
        except Exception as exc:  # noqa: BLE001 - a broken authenticator: temporary, no traceback
            log.error("%s[%s]: SASL %s authenticator failed: %s, sasl_username=%s",
                      name, ip, event.mechanism, type(exc).__name__, shown)
            metrics.error("auth")
            return AuthResult(R_AUTH_TEMP)
        if identity is None:
            log.warning("%s[%s]: SASL %s authentication failed: authentication failure, "
                        "sasl_username=%s", name, ip, event.mechanism, shown)
            return await self._failed(ip)
        log.info("%s[%s]: sasl_method=%s, sasl_username=%s", name, ip, event.mechanism,
                 printable(identity.username))
        return AuthResult(R_AUTH_OK, identity)

    async def _ask(self, event: ev.Auth, conn: ConnInfo) -> Identity | None:
        auth = self.authenticator
        if event.mechanism == "CRAM-MD5":
            if not isinstance(auth, CramMD5Authenticator) or not auth.supports_cram_md5:
                # not offered (or no longer: a reload changed the users); a client that
                # tries anyway fails
                return None
            return await auth.authenticate_cram_md5(event.username, event.challenge,
                                                    event.password, conn)
        return await auth.authenticate(event.username, event.password, conn)

    async def _failed(self, ip: str) -> AuthResult:
        """A ``535``, after this address's delay (password guessing slows down)."""
        delay = self.throttle.failed(ip)
        if delay > 0:
            await asyncio.sleep(delay)
        return AuthResult(R_AUTH_FAILED)
