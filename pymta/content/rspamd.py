"""An asyncio client of rspamd's HTTP API: ``/checkv2``, ``/learnspam``, ``/learnham``, ``/ping``.

Plain HTTP/1.1 over asyncio streams, one request per connection (``Connection: close``): the
API needs nothing more, and a hand-written request keeps the message streamed from its spool
file (``Content-Length`` from the file size) without a new dependency. The SMTP envelope and
the client travel as rspamd's request headers (``IP``, ``Helo``, ``Hostname``, ``From``, one
``Rcpt`` per recipient, ``Queue-Id``, ``User``), which is what lets rspamd run SPF, DMARC and
its per-user rules the way it does behind a milter.

Checks go to the normal worker; learning goes to the controller (another port, optionally
with a password), as rspamd splits them. Reply headers and bodies are bounded
(``max_reply``), ``timeout`` covers one exchange, and at most ``max_in_flight`` requests run at
once per client; the wait for a slot is bounded by the exchanges ahead of it.
"""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import dataclass
from typing import Any

from .netio import (
    Address,
    ScannerError,
    bounded_exchange,
    close,
    connect,
    header_value,
    parse_address,
    read_body,
    read_head,
    send_file,
)
from .spoolfile import MessageSource, open_message

DEFAULT_PORT = 11333
DEFAULT_CONTROLLER_PORT = 11334
# rspamd's own actions; the ones that mean "this is spam" to rspamd's configuration.
SPAM_ACTIONS = frozenset({"reject", "add header", "rewrite subject"})


class RspamdError(ScannerError):
    """rspamd gave no usable answer (``timeout`` says whether it ran out of time)."""


@dataclass(frozen=True)
class RspamdResult:
    """rspamd's verdict. ``required_score`` is its reject threshold; ``is_spam`` is True when
    its action is one of ``reject``, ``add header``, ``rewrite subject``. ``smtp_message`` is
    the reply text rspamd suggests (e.g. ``Gtube pattern``), if any."""

    score: float
    required_score: float
    action: str
    is_spam: bool
    symbols: tuple[str, ...]
    smtp_message: str | None = None


@dataclass(frozen=True)
class Envelope:
    """What rspamd is told about the SMTP transaction; empty fields are not sent."""

    ip: str = ""
    helo: str = ""
    hostname: str = ""
    mail_from: str = ""
    rcpts: tuple[str, ...] = ()
    queue_id: str = ""
    user: str = ""

    def headers(self) -> bytes:
        out = b""
        for name, value in (("IP", self.ip), ("Helo", self.helo), ("Hostname", self.hostname),
                            ("From", self.mail_from), ("Queue-Id", self.queue_id),
                            ("User", self.user)):
            if value:
                out += header_value(name, value)
        for rcpt in self.rcpts:
            out += header_value("Rcpt", rcpt)
        return out


class RspamdClient:
    """Talks to one rspamd.

    ``address``: the normal worker, ``host:port`` (default port 11333), ``[v6]:port`` or
    ``unix:/path``. ``controller``: the controller for learning (default: the worker's host on
    port 11334; unix sockets must be given). ``password``: sent as ``Password:`` to the
    controller. ``timeout``: seconds for one exchange. ``max_in_flight``: concurrent requests.
    ``max_reply``: bytes of reply accepted (a check reply with all symbols is a few KiB).
    """

    def __init__(self, address: str, *, controller: str | None = None,
                 password: str | None = None, timeout: float = 30.0, max_in_flight: int = 8,
                 max_reply: int = 256 * 1024) -> None:
        if timeout <= 0:
            raise ValueError(f"rspamd timeout must be positive, not {timeout!r}")
        if max_in_flight < 1:
            raise ValueError(f"rspamd max_in_flight must be at least 1, not {max_in_flight!r}")
        self.address = parse_address(address, DEFAULT_PORT)
        if controller is not None:
            self.controller: Address | None = parse_address(controller, DEFAULT_CONTROLLER_PORT)
        elif self.address.path:
            self.controller = None
        else:
            self.controller = Address(host=self.address.host, port=DEFAULT_CONTROLLER_PORT)
        if password is not None:
            header_value("Password", password)
        self.password = password
        self.timeout = timeout
        self.max_reply = max_reply
        self._slots = asyncio.Semaphore(max_in_flight)

    async def check(self, message: MessageSource, envelope: Envelope | None = None
                    ) -> RspamdResult:
        """Scan a spooled message (``POST /checkv2``) with the envelope as headers."""
        extra = (envelope or Envelope()).headers()
        status, body = await self._exchange(self.address, b"POST", b"/checkv2", extra, message)
        data = _json(body, status, self.address)
        if status != 200:
            raise RspamdError(f"rspamd at {self.address}: HTTP {status}: {_error_text(data)}")
        return parse_check(data)

    async def learn(self, message: MessageSource, *, spam: bool) -> None:
        """Teach the message as spam or ham (controller ``/learnspam`` / ``/learnham``).
        Returns on success, and when rspamd already knew it as that class (HTTP 208, or
        older versions' 404 "has been already learned"); RspamdError with rspamd's own reason
        otherwise (without a classifier backend, e.g. no redis for Bayes, rspamd refuses
        every learn)."""
        if self.controller is None:
            raise ValueError("rspamd learning needs a controller address (unix socket worker)")
        extra = header_value("Password", self.password) if self.password is not None else b""
        path = b"/learnspam" if spam else b"/learnham"
        status, body = await self._exchange(self.controller, b"POST", path, extra, message)
        data = _json(body, status, self.controller)
        if status == 208 or (status == 404 and "already learned" in _error_text(data)):
            return      # it knew the message as that class: nothing to do, not a failure
        if status != 200 or not (isinstance(data, dict) and data.get("success") is True):
            raise RspamdError(f"rspamd controller at {self.controller}: learn"
                              f"{'spam' if spam else 'ham'} refused (HTTP {status}): "
                              f"{_error_text(data)}")

    async def ping(self) -> None:
        """Return when the worker answers ``/ping`` with ``pong``; RspamdError otherwise."""
        status, body = await self._exchange(self.address, b"GET", b"/ping", b"", None)
        if status != 200 or body.strip() != b"pong":
            raise RspamdError(f"rspamd at {self.address}: /ping answered HTTP {status} "
                              f"{body[:80]!r}")

    # ------------------------------------------------------------------------------------
    async def _exchange(self, address: Address, method: bytes, path: bytes, extra: bytes,
                        message: MessageSource | None) -> tuple[int, bytes]:
        return await bounded_exchange(
            lambda: self._talk(address, method, path, extra, message), self.timeout,
            f"rspamd at {address}", RspamdError, self._slots)

    async def _talk(self, address: Address, method: bytes, path: bytes, extra: bytes,
                    message: MessageSource | None) -> tuple[int, bytes]:
        reader, writer = await connect(address, self.max_reply)
        host = (address.host or "localhost").encode()
        try:
            head = (method + b" " + path + b" HTTP/1.1\r\nHost: " + host +
                    b"\r\nConnection: close\r\n" + extra)
            if message is None:
                writer.write(head + b"\r\n")
                await writer.drain()
            else:
                with open_message(message) as (f, size):
                    writer.write(head + f"Content-Length: {size}\r\n\r\n".encode())
                    await send_file(writer, f, size)
            raw_head = await read_head(reader, self.max_reply, "rspamd")
            status, length = parse_head(raw_head)
            body = await read_body(reader, length, self.max_reply, "rspamd")
        finally:
            await close(writer)
        return status, body


def parse_head(raw: bytes) -> tuple[int, int | None]:
    """(status, Content-Length or None) of an HTTP reply head; a chunked reply is refused
    (rspamd sends Content-Length; anything else is not the server we expect)."""
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise RspamdError(f"not an HTTP reply: {lines[0][:80]!r}")
    length: int | None = None
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        if name == "content-length":
            if not value.isdigit():
                raise RspamdError(f"bad Content-Length in reply: {value[:40]!r}")
            length = int(value)
        elif name == "transfer-encoding" and value.lower() != "identity":
            raise RspamdError(f"unsupported Transfer-Encoding in reply: {value[:40]!r}")
    return int(parts[1]), length


def parse_check(data: Any) -> RspamdResult:
    """The verdict in a ``/checkv2`` JSON reply."""
    if not isinstance(data, dict):
        raise RspamdError("check reply is not a JSON object")
    try:
        score = float(data["score"])
        required = float(data["required_score"])
        action = str(data["action"])
    except (KeyError, TypeError, ValueError) as e:
        raise RspamdError(f"check reply lacks a usable {e}: {str(data)[:120]}") from None
    if not (math.isfinite(score) and math.isfinite(required)):
        raise RspamdError(f"check reply with a score that is not a number: {str(data)[:120]}")
    symbols = data.get("symbols") or {}
    if not isinstance(symbols, dict):
        raise RspamdError("check reply: 'symbols' is not an object")
    messages = data.get("messages")
    smtp = messages.get("smtp_message") if isinstance(messages, dict) else None
    return RspamdResult(score=score, required_score=required, action=action,
                        is_spam=action in SPAM_ACTIONS, symbols=tuple(sorted(symbols)),
                        smtp_message=str(smtp) if smtp is not None else None)


def _json(body: bytes, status: int, address: Address) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        if status == 200:
            raise RspamdError(f"rspamd at {address}: reply is not JSON: {body[:80]!r}") from None
        return body.decode("utf-8", "replace").strip()[:200]


def _error_text(data: Any) -> str:
    if isinstance(data, dict) and "error" in data:
        return str(data["error"])[:200]
    return str(data)[:200]

