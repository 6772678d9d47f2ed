"""Fuzz target: the sans-I/O SMTP engine (``pymta.smtp.engine``), driven as the server does.

Input layout: four bytes of configuration (TLS, AUTH mechanisms, small or default limits),
one byte that biases the decision policy, one byte that seeds the PRNG choosing read sizes
and decisions, then the client's byte stream. The stream is fed in pieces; every decision
event is answered (accept, or a 4xx/5xx refusal) and, now and then, the driver closes the
session with ``421`` while a decision is pending and answers it afterwards, as the server's
idle timer can. STARTTLS is followed by a handshake that succeeds or fails.

Contract checked (module docstrings of ``engine`` and ``events``):
* no exception from any driver call;
* every batch of output is complete, well-formed reply lines (``check_reply_bytes``);
* ``closed`` never goes back to False; after the Close event (or the driver's ``close``)
  nothing more is written and no event but NEED_DATA comes out;
* DataChunk only inside an accepted DATA/BDAT; a DataEnd without error carries exactly the
  bytes of its chunks, within SIZE, CRLF-only, without NUL (no BINARYMIME is offered);
* accepted MAIL/RCPT addresses and parameters are safe (``check_address``, xtext);
* never more accepted recipients than ``max_recipients``;
* bytes kept between reads stay bounded by the line limits (work per byte O(1)).
"""

from __future__ import annotations

import random

from fuzz.harness import Input, Violation, check_address, check_reply_bytes, is_xtext, require
from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.types import Reply

HOSTNAME = "mx.fuzz.test"
MECHS = ("PLAIN", "LOGIN", "CRAM-MD5")
R_CLOSE = Reply(421, "4.4.2", f"{HOSTNAME} Error: timeout exceeded")
REFUSE_ENVELOPE = (Reply(451, "4.3.0", "try later"), Reply(550, "5.1.1", "no such user"),
                   Reply(554, "5.7.1", "Relay access denied"))
REFUSE_DATA = (Reply(451, "4.3.0", "local error"), Reply(554, "5.7.1", "rejected"),
               Reply(452, "4.3.1", "Insufficient system storage"))
AUTH_REPLIES = (Reply(535, "5.7.8", "Authentication failed"),
                Reply(454, "4.7.0", "Temporary authentication failure"))
SIZES = (1, 1, 2, 3, 5, 7, 16, 64, 512, 4096, 1 << 20)
SLACK = 1024    # what an engine may keep beyond one line (the end-of-data window and so on)


def make_config(inp: Input) -> EngineConfig:
    flags, a, b, c = inp.byte(), inp.byte(), inp.byte(), inp.byte()
    mechs = tuple(m for i, m in enumerate(MECHS) if flags & (8 << i))
    base = dict(hostname=HOSTNAME, tls_available=bool(flags & 1), tls_active=bool(flags & 2),
                auth_requires_tls=bool(flags & 4), auth_mechanisms=mechs)
    if flags & 0x40:     # small limits, so short inputs reach them
        return EngineConfig(**base, max_line_length=24 + a * 2, size_limit=b * 8,
                            max_recipients=1 + c % 5, max_errors=1 + (c >> 3) % 24,
                            sasl_line_limit=32 + a * 4)
    return EngineConfig(**base)


class Driver:
    """Plays the server's part and checks every step."""

    def __init__(self, cfg: EngineConfig, policy: int, rng: random.Random) -> None:
        self.cfg = cfg
        self.engine = Engine(cfg)
        self.accept = 0.5 + policy / 512          # probability of accepting a decision
        self.rng = rng
        self.finished = False                     # Close seen or driver closed: no more output
        self.gone = False                         # the transport is closed (failed TLS)
        self.in_data = False
        self.bdat = False
        self.chunks: list[bytes] = []
        self.rcpts = 0
        self.utf8 = False

    # ------------------------------------------------------------------ output

    def flush(self) -> None:
        out = self.engine.take_output()
        if self.finished:
            require(out == b"", "output after close", out[:200])
        check_reply_bytes(out, "engine")

    def _close_now(self) -> None:
        self.flush()
        self.engine.close(R_CLOSE, "idle timeout")
        require(self.engine.closed, "close() left the engine open")
        self.flush()
        self.finished = True

    # ------------------------------------------------------------------ decisions

    def _ok(self) -> bool:
        return self.rng.random() < self.accept

    def decide(self, event: object) -> None:
        # The server answers after an await; the idle timer may have closed us meanwhile.
        if not self.finished and self.rng.random() < 1 / 48:
            self._close_now()
        if isinstance(event, ev.MailFrom):
            self.utf8 = event.params.smtputf8
            check_address(event.address, utf8=self.utf8, what="MAIL FROM")
            if event.params.envid is not None:
                require(is_xtext(event.params.envid), "ENVID is not xtext", event.params.envid)
            reply = Reply(250, "2.1.0", "Ok") if self._ok() else self.rng.choice(REFUSE_ENVELOPE)
            self.rcpts = 0
        elif isinstance(event, ev.RcptTo):
            check_address(event.address, utf8=self.utf8, what="RCPT TO")
            orcpt = event.params.orcpt
            if orcpt is not None:
                kind, _, addr = orcpt.partition(";")
                require(kind.isascii() and kind.isprintable() and is_xtext(addr),
                        "ORCPT is not addr-type;xtext", orcpt)
            ok = self._ok()
            reply = Reply(250, "2.1.5", "Ok") if ok else self.rng.choice(REFUSE_ENVELOPE)
            if ok:
                self.rcpts += 1
                require(self.rcpts <= self.cfg.max_recipients,
                        "more recipients accepted than max_recipients", self.rcpts)
        elif isinstance(event, ev.DataStart):
            ok = self._ok()
            if ok:
                reply = Reply(250, "2.0.0", "Ok") if event.bdat else Reply(354, "", "go ahead")
            else:
                reply = self.rng.choice(REFUSE_DATA)
            self.in_data, self.bdat, self.chunks = ok, event.bdat, []
        elif isinstance(event, ev.DataEnd):
            self._data_end(event)
            if event.error is not None:
                reply = event.error
            else:
                reply = (Reply(250, "2.0.0", "Ok: queued as FUZZ") if self._ok()
                         else self.rng.choice(REFUSE_DATA))
        else:
            assert isinstance(event, ev.Auth)
            require(event.username and "\0" not in event.username, "AUTH: bad user name",
                    event.username)
            reply = (Reply(235, "2.7.0", "Authentication successful") if self._ok()
                     else self.rng.choice(AUTH_REPLIES))
        self.engine.respond(reply)
        if isinstance(event, ev.Auth) and reply.code == 235 and not self.finished:
            require(self.engine.auth_user == event.username, "235 did not set auth_user")

    def _data_end(self, event: ev.DataEnd) -> None:
        require(self.in_data, "DataEnd without an accepted DataStart")
        self.in_data = False
        if event.error is not None:
            require(event.error.code >= 400, "DataEnd error is not a refusal", event.error)
            return
        message = b"".join(self.chunks)
        require(event.size == len(message), "DataEnd size differs from the chunks' bytes",
                (event.size, len(message)))
        if self.cfg.size_limit:
            require(len(message) <= self.cfg.size_limit, "message over SIZE accepted",
                    len(message))
        pairs = message.count(b"\r\n")
        require(message.count(b"\r") == pairs and message.count(b"\n") == pairs,
                "bare CR or LF in an accepted message", message[:200])
        require(b"\x00" not in message, "NUL in an accepted message (no BINARYMIME)",
                message[:200])

    # ------------------------------------------------------------------ events

    def pump(self) -> None:
        """Take events until the engine needs data, as the server's session task does."""
        engine = self.engine
        for _ in range(1_000_000):
            was_closed = engine.closed
            event = engine.next_event()
            if event is ev.NEED_DATA:
                break
            require(event is not ev.PAUSED, "PAUSED although every decision was answered")
            require(not self.finished or isinstance(event, ev.Reset | ev.Close),
                    "event after close", event)
            if isinstance(event, ev.DataChunk):
                require(self.in_data, "DataChunk outside DATA/BDAT", event.data[:80])
                require(event.data, "empty DataChunk")
                self.chunks.append(event.data)
            elif isinstance(event, ev.MailFrom | ev.RcptTo | ev.DataStart | ev.DataEnd | ev.Auth):
                self.decide(event)
            elif isinstance(event, ev.Reset | ev.Helo):
                self.in_data = False
                self.rcpts = 0
            elif isinstance(event, ev.StartTLS):
                self.flush()
                if self.rng.random() < 0.8:
                    engine.tls_established()
                    require(engine.tls, "tls_established did not set tls")
                else:        # the handshake failed: the server drops the connection
                    self.gone = True
                    return
            elif isinstance(event, ev.Close):
                require(engine.closed, "Close event but closed is False")
                self.flush()
                self.finished = True
            require(not was_closed or engine.closed, "closed went back to False")
        else:
            raise Violation("next_event never returned NEED_DATA")
        self.flush()
        if not engine.closed:
            kept = engine.buffered + len(getattr(engine, "_tail", b""))
            bound = max(self.cfg.max_line_length, self.cfg.sasl_line_limit) + SLACK
            require(kept <= bound, "bytes kept between reads exceed the line limits",
                    (kept, bound))


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    cfg = make_config(inp)
    policy = inp.byte()
    rng = random.Random(inp.byte())
    stream = inp.rest()
    driver = Driver(cfg, policy, rng)
    driver.engine.greeting()
    driver.flush()
    pos = 0
    while pos < len(stream) and not driver.gone:
        n = rng.choice(SIZES)
        piece, pos = stream[pos:pos + n], pos + n
        driver.engine.feed(piece)
        driver.pump()
