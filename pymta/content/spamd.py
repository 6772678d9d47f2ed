"""An asyncio client of SpamAssassin's spamd (the SPAMC/1.5 protocol).

One request per connection, as spamd wants: ``SYMBOLS`` is the check, because it answers the
score, the threshold, the spam flag and the names of the rules that hit in one round trip
(``CHECK`` lacks the names, ``REPORT`` adds text nobody parses). ``TELL`` teaches Bayes
(``Message-class: spam|ham`` with ``Set: local``; spamd must run with ``--allow-tell``), and
``PING`` answers whether the daemon is there at all.

The message is streamed from its spool file with ``Content-length`` from the file size; the
reply is read up to ``max_reply`` bytes and refused beyond that. At most ``max_in_flight``
requests run at once per client, so a burst of mail queues here instead of forking spamd
children beyond what the machine has; the ``timeout`` covers one exchange (connect, send,
reply), not the wait for a slot, which is itself bounded by the exchanges ahead of it.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

from .netio import (
    ScannerError,
    bounded_exchange,
    close,
    connect,
    header_value,
    parse_address,
    read_body,
    send_file,
)
from .spoolfile import MessageSource, open_message

DEFAULT_PORT = 783
PROTOCOL = b"SPAMC/1.5"


class SpamdError(ScannerError):
    """spamd gave no usable answer (``timeout`` says whether it ran out of time)."""


@dataclass(frozen=True)
class SpamdResult:
    """spamd's verdict: ``is_spam`` is spamd's own (score >= its threshold)."""

    score: float
    threshold: float
    is_spam: bool
    rules: tuple[str, ...]


@dataclass(frozen=True)
class _Reply:
    code: int
    message: str
    headers: dict[str, str]
    body: bytes


class SpamdClient:
    """Talks to one spamd.

    ``address``: ``host:port`` (port defaults to 783), ``[v6]:port`` or ``unix:/path``.
    ``timeout``: seconds for one whole exchange. ``max_in_flight``: concurrent requests.
    ``user``: sent as ``User:`` (spamd's per-user settings and Bayes database), or none.
    ``max_reply``: bytes of reply accepted (the rule list of a real message is ~1 KiB).
    """

    def __init__(self, address: str, *, timeout: float = 30.0, max_in_flight: int = 8,
                 user: str | None = None, max_reply: int = 64 * 1024) -> None:
        if timeout <= 0:
            raise ValueError(f"spamd timeout must be positive, not {timeout!r}")
        if max_in_flight < 1:
            raise ValueError(f"spamd max_in_flight must be at least 1, not {max_in_flight!r}")
        self.address = parse_address(address, DEFAULT_PORT)
        self.timeout = timeout
        self.max_reply = max_reply
        self.user = user
        if user is not None:
            header_value("User", user)      # refuse a bad name now, not at the first message
        self._slots = asyncio.Semaphore(max_in_flight)

    async def check(self, message: MessageSource) -> SpamdResult:
        """Score a spooled message (``SYMBOLS``)."""
        reply = await self._exchange(b"SYMBOLS", {}, message)
        spam = reply.headers.get("spam")
        if spam is None:
            raise SpamdError(f"spamd at {self.address}: reply without a Spam header")
        score, threshold, is_spam = parse_spam_header(spam)
        names = reply.body.decode("ascii", "replace").strip()
        rules = tuple(n.strip() for n in names.split(",") if n.strip())
        return SpamdResult(score=score, threshold=threshold, is_spam=is_spam, rules=rules)

    async def learn(self, message: MessageSource, *, spam: bool) -> bool:
        """Teach the message to Bayes as spam or ham (``TELL``). True when spamd learned it,
        False when it already knew it as that class (both are success)."""
        headers = {"Message-class": "spam" if spam else "ham", "Set": "local"}
        reply = await self._exchange(b"TELL", headers, message)
        return "local" in reply.headers.get("didset", "")

    async def ping(self) -> None:
        """Return when spamd answers ``PONG``; SpamdError otherwise."""
        reply = await self._exchange(b"PING", {}, None)
        if reply.message != "PONG":
            raise SpamdError(f"spamd at {self.address}: PING answered {reply.message!r}")

    # ------------------------------------------------------------------------------------
    async def _exchange(self, verb: bytes, headers: dict[str, str],
                        message: MessageSource | None) -> _Reply:
        return await bounded_exchange(lambda: self._talk(verb, headers, message),
                                      self.timeout, f"spamd at {self.address}", SpamdError,
                                      self._slots)

    async def _talk(self, verb: bytes, headers: dict[str, str],
                    message: MessageSource | None) -> _Reply:
        reader, writer = await connect(self.address, self.max_reply)
        try:
            head = verb + b" " + PROTOCOL + b"\r\n"
            if self.user is not None:
                head += header_value("User", self.user)
            for name, value in headers.items():
                head += header_value(name, value)
            if message is None:
                writer.write(head + b"\r\n")
                await writer.drain()
            else:
                with open_message(message) as (f, size):
                    writer.write(head + f"Content-length: {size}\r\n\r\n".encode())
                    await send_file(writer, f, size)
            # spamd answers one request per connection and then closes: read to the end.
            raw = await read_body(reader, None, self.max_reply, "spamd")
        finally:
            await close(writer)
        return parse_reply(raw)


def parse_reply(raw: bytes) -> _Reply:
    """Split a spamd reply; a non-zero status is a SpamdError carrying spamd's own words."""
    if not raw:
        raise SpamdError("closed the connection without a reply")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("SPAMD/") or not status[1].isdigit():
        raise SpamdError(f"not a spamd reply: {lines[0][:80]!r}")
    code, message = int(status[1]), status[2].strip() if len(status) > 2 else ""
    if code != 0:
        raise SpamdError(f"spamd error {code}: {message}")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if not line:        # PING's reply is a status line alone, ended by one CRLF
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise SpamdError(f"bad header line in spamd reply: {line[:80]!r}")
        fields[name.strip().lower()] = value.strip()
    length = fields.get("content-length")
    if length is not None and (not length.isdigit() or int(length) != len(body)):
        raise SpamdError(f"spamd reply body is {len(body)} bytes, Content-length says {length}")
    return _Reply(code, message, fields, body)


def parse_spam_header(value: str) -> tuple[float, float, bool]:
    """``True ; 1000.0 / 5.0`` -> (1000.0, 5.0, True)."""
    flag, sep, numbers = value.partition(";")
    score, slash, threshold = numbers.partition("/")
    flag = flag.strip().lower()
    if not sep or not slash or flag not in ("true", "false", "yes", "no"):
        raise SpamdError(f"bad Spam header in spamd reply: {value[:80]!r}")
    try:
        numbers_read = float(score), float(threshold)
    except ValueError:
        raise SpamdError(f"bad score in spamd reply: {value[:80]!r}") from None
    if not all(math.isfinite(n) for n in numbers_read):    # "inf", "nan": no score at all
        raise SpamdError(f"bad score in spamd reply: {value[:80]!r}")
    return numbers_read[0], numbers_read[1], flag in ("true", "yes")
