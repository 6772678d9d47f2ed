"""Property tests of the sans-I/O SMTP engine (issue 10): random byte streams cut at random
points, with hypothesis.

Streams are built from pieces a client or an attacker sends: valid commands (HELO/EHLO,
MAIL and RCPT with and without parameters, DATA, BDAT with its chunk, RSET, NOOP, VRFY,
STARTTLS, AUTH and SASL lines, QUIT), message text made of line ends, bare CR and LF, NUL,
dots, end markers and long lines, over-long command lines, and random bytes. A
deterministic driver answers every decision from the event's content (so two runs that see
the same events answer the same way), "completes" STARTTLS at once, and checks:

* no exception, and ``next_event`` always ends with NEED_DATA;
* every reply line is well-formed: ``ddd[ -]text CRLF``, code 2xx-5xx, the enhanced code
  (where present) of the same class, printable ASCII, at most 512 octets, a multi-line reply
  keeps its code, output always ends at a line end;
* state invariants: ``buffered`` never exceeds what was fed, is at most 4 in DATA and bounded
  by the line limits otherwise; ``closed`` never goes back; after the Close event no output
  and no event but Close; message sizes are never negative, accepted messages are CRLF-only,
  without NUL, within the size limit, and exactly the bytes of their chunks; never more
  recipients accepted than ``max_recipients``;
* cutting does not matter: the stream fed one *flight* at a time (a flight ends after a
  ``DATA`` or ``STARTTLS`` command, where RFC 2920 makes a client wait for our reply) and
  the same stream cut into random pieces give the same events (message chunks joined per
  message) and the same output. A stream whose flight carried text after ``DATA`` (a
  pipelining violation, refused on purpose) is checked for the other properties only.

Runs in a few seconds by default. Longer runs (e.g. before a release, or after changing the
engine):

    HYPOTHESIS_PROFILE=engine-long .venv/bin/python -m pytest \
        tests/unit/test_engine_properties.py -q
    HYPOTHESIS_PROFILE=engine-soak .venv/bin/python -m pytest \
        tests/unit/test_engine_properties.py -q

(``engine-long``: 20x the examples, about a minute; ``engine-soak``: 200x, tens of minutes.)
"""

from __future__ import annotations

import base64
import os
import re
import zlib
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.types import Reply

_SCALE = {"engine-long": 20, "engine-soak": 200}.get(os.environ.get("HYPOTHESIS_PROFILE", ""), 1)
PROPERTY = settings(
    max_examples=150 * _SCALE, deadline=None, database=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

REPLY_LINE = re.compile(rb"([2-5][0-9]{2})([ -])([\x20-\x7e]*)")
ENHANCED = re.compile(rb"([245])\.[0-9]{1,3}\.[0-9]{1,3}")
MAX_LINE = 512
CR, LF = b"\r", b"\n"

# ---------------------------------------------------------------------------- strategies


def _b64(text: bytes) -> bytes:
    return base64.b64encode(text)


COMMANDS = [
    b"EHLO client.test\r\n", b"HELO client.test\r\n", b"EHLO b\xc3\xbccher.test\r\n",
    b"MAIL FROM:<a@sender.test>\r\n", b"MAIL FROM:<>\r\n", b"MAIL FROM:<a@sender.test> SIZE=50\r\n",
    b"MAIL FROM:<j\xc3\xb6rg@b\xc3\xbccher.test> SMTPUTF8\r\n",
    b"MAIL FROM:<a@sender.test> RET=HDRS ENVID=x+2By AUTH=<>\r\n", b"MAIL FROM:<bad\r\n",
    b"RCPT TO:<x@example.test>\r\n", b"RCPT TO:<postmaster>\r\n", b"RCPT TO:<refuse@x.test>\r\n",
    b"RCPT TO:<y@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;y@example.test\r\n",
    b"RCPT TO:<z@example.test> ORCPT=utf-8;z\\x{E9}@x.test\r\n",
    b"RCPT TO:<j\xc3\xb6rg@example.test> ORCPT=utf-8;j\xc3\xb6rg@x.test\r\n",
    b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"HELP\r\n", b"EXPN x\r\n",
    b"STARTTLS\r\n", b"QUIT\r\n", b"AUTH PLAIN\r\n", b"AUTH LOGIN\r\n",
    b"AUTH PLAIN " + _b64(b"\0alice\0pw") + b"\r\n", _b64(b"\0bob\0pw") + b"\r\n",
    _b64(b"bob") + b"\r\n", b"*\r\n", b"BDAT 0 LAST\r\n", b"XYZZY\r\n",
    b"MAIL FROM:<\xff\xfe@x.test> SMTPUTF8\r\n", b"RCPT TO:<a\xe2\x80\xa8b@x.test>\r\n",
]
TEXT_TOKENS = [
    b"Subject: x\r\n", b"\r\n", b"line of text", b".", b"..", b"\r\n.", b"\r\n..", b".\r\n",
    b"\r\n.\r\n", b"\r", b"\n", b"\x00", b"\r\n\x00.\r\n", b"\n.\n", b"\r.\r\n", b"MAIL FROM:<m@x>",
    b"\xff\xfe", b"x" * 120, b"\r\n" * 8,
]


@st.composite
def bdat(draw: st.DrawFn) -> bytes:
    body = draw(st.binary(max_size=40) | st.lists(st.sampled_from(TEXT_TOKENS), max_size=8)
                .map(b"".join))
    size = len(body) if draw(st.booleans()) else draw(st.integers(0, 60))
    last = b" LAST" if draw(st.booleans()) else b""
    return b"BDAT %d%s\r\n" % (size, last) + body


def long_line(n: int) -> bytes:
    return b"NOOP " + b"a" * n + b"\r\n"


SEGMENT = st.one_of(
    st.sampled_from(COMMANDS),
    st.lists(st.sampled_from(TEXT_TOKENS), min_size=1, max_size=12).map(b"".join),
    st.lists(st.sampled_from(TEXT_TOKENS), max_size=12).map(lambda t: b"".join(t) + b"\r\n.\r\n"),
    bdat(),
    st.integers(20, 300).map(long_line),
    st.binary(min_size=1, max_size=24),
)
# A message's worth of text after a DATA command, ending (mostly) with the end marker.
MESSAGE = st.lists(st.sampled_from(TEXT_TOKENS), max_size=20).map(
    lambda t: b"".join(t) + b"\r\n.\r\n")

SYNC = (b"DATA\r\n", b"STARTTLS\r\n")


@st.composite
def flights(draw: st.DrawFn) -> list[bytes]:
    """The client's stream as flights: each ends where a client must wait for our reply."""
    out: list[bytes] = []
    current = b"EHLO client.test\r\n" if draw(st.integers(0, 3)) else b""
    for _ in range(draw(st.integers(1, 14))):
        seg = draw(SEGMENT)
        if draw(st.integers(0, 3)) == 0:      # steer towards complete transactions
            seg = b"MAIL FROM:<a@s.test>\r\nRCPT TO:<x@example.test>\r\nDATA\r\n"
        current += seg
        if seg.endswith(SYNC):
            out.append(current)
            current = b""
            if seg.endswith(b"DATA\r\n") and draw(st.integers(0, 4)):
                out.append(draw(MESSAGE))
    if current:
        out.append(current)
    return out


@st.composite
def configs(draw: st.DrawFn) -> EngineConfig:
    small = draw(st.booleans())
    return EngineConfig(
        "mx.test",
        size_limit=draw(st.sampled_from([0, 16, 100, 10240000])) if small else 10240000,
        max_line_length=draw(st.integers(24, 120)) if small else 2048,
        max_recipients=draw(st.integers(1, 4)) if small else 1000,
        max_errors=draw(st.integers(2, 30)) if small else 20,
        recipient_overshoot_limit=draw(st.integers(0, 3)) if small else 1000,
        tls_available=draw(st.booleans()),
        tls_active=draw(st.booleans()),
        auth_mechanisms=("PLAIN", "LOGIN") if draw(st.booleans()) else (),
        auth_requires_tls=draw(st.booleans()),
        sasl_line_limit=draw(st.integers(16, 200)) if small else 12288,
    )


# ---------------------------------------------------------------------------- the driver


def _choice(event: object, salt: int) -> int:
    return zlib.crc32(repr(event).encode("utf-8", "surrogatepass")) ^ salt


@dataclass
class Run:
    """Plays the server: feeds pieces, answers decisions deterministically, checks."""

    cfg: EngineConfig
    salt: int
    engine: Engine = field(init=False)
    events: list[tuple] = field(default_factory=list)
    output: bytearray = field(default_factory=bytearray)
    chunks: list[bytes] = field(default_factory=list)
    finished: bool = False       # Close seen: no more output, no events but Close
    in_message: bool = False     # between an accepted DataStart and its DataEnd
    bdat: bool = False
    rcpts: int = 0
    starttls: bool = False       # a STARTTLS was answered in the current flight
    pipelining_violation: bool = False

    def __post_init__(self) -> None:
        self.engine = Engine(self.cfg)
        self.engine.greeting()
        self._flush()

    def _flush(self) -> None:
        out = self.engine.take_output()
        if self.finished:
            assert out == b"", out
        check_replies(out)
        self.output += out
        if b"554 5.5.0" in out:
            self.pipelining_violation = True

    def feed(self, piece: bytes) -> None:
        engine = self.engine
        before = engine.buffered
        engine.feed(piece)
        assert engine.buffered <= before + len(piece)
        self.pump()

    def pump(self) -> None:
        engine, cfg = self.engine, self.cfg
        for _ in range(100_000):
            was_closed = engine.closed
            event = engine.next_event()
            assert event is not ev.PAUSED, "PAUSED although every decision was answered"
            if event is ev.NEED_DATA:
                break
            assert not self.finished or isinstance(event, ev.Close), event
            self.on_event(event)
            assert engine.closed or not was_closed, "closed went back to False"
        else:
            raise AssertionError("next_event never returned NEED_DATA")
        self._flush()
        # What is held between reads: the bytes of a possible end marker in DATA, at most a
        # partial command or SASL line otherwise (longer ones are skipped, not kept).
        if engine.closed:
            assert engine.buffered == 0
        elif self.in_message and not self.bdat:
            assert engine.buffered <= 4, engine.buffered
        else:
            assert engine.buffered <= max(cfg.max_line_length, cfg.sasl_line_limit)

    def on_event(self, event: object) -> None:
        engine = self.engine
        if isinstance(event, ev.DataChunk):
            assert self.in_message and event.data
            self.chunks.append(event.data)
            self.events.append(("chunk", event.data))
            return
        self.events.append(("event", repr(event)))
        if isinstance(event, ev.MailFrom):
            ok = _choice(event, self.salt) % 4 != 0 and "refuse" not in event.address
            self.rcpts = 0
            engine.respond(Reply(250, "2.1.0", "Ok") if ok else Reply(550, "5.7.1", "no"))
        elif isinstance(event, ev.RcptTo):
            ok = _choice(event, self.salt) % 5 != 0 and "refuse" not in event.address
            if ok:
                self.rcpts += 1
                assert self.rcpts <= self.cfg.max_recipients
            engine.respond(Reply(250, "2.1.5", "Ok") if ok else Reply(450, "4.2.0", "later"))
        elif isinstance(event, ev.DataStart):
            ok = _choice(event, self.salt) % 6 != 0
            self.in_message, self.chunks, self.bdat = ok, [], event.bdat
            if ok:
                engine.respond(Reply(250, "2.0.0", "Ok") if event.bdat
                               else Reply(354, "", "End data with <CR><LF>.<CR><LF>"))
            else:
                engine.respond(Reply(451, "4.3.0", "Error: queue file write error"))
        elif isinstance(event, ev.DataEnd):
            assert self.in_message and event.size >= 0
            message = b"".join(self.chunks)
            self.in_message, self.chunks = False, []
            if event.error is None:
                assert event.size == len(message)
                assert not self.cfg.size_limit or len(message) <= self.cfg.size_limit
                pairs = message.count(b"\r\n")
                assert message.count(CR) == pairs and message.count(LF) == pairs, message
                assert b"\x00" not in message
                ok = _choice(event, self.salt) % 5 != 0
                engine.respond(Reply(250, "2.0.0", "Ok: queued as X") if ok
                               else Reply(451, "4.3.0", "Error: local error"))
            else:
                assert event.error.code >= 500
                engine.respond(event.error)
        elif isinstance(event, ev.Auth):
            ok = _choice(event, self.salt) % 2 == 0
            engine.respond(Reply(235, "2.7.0", "Authentication successful") if ok
                           else Reply(535, "5.7.8", "Error: authentication failed"))
        elif isinstance(event, ev.StartTLS):
            self._flush()
            engine.tls_established()
            self.starttls = True
        elif isinstance(event, ev.Reset | ev.Helo):
            self.in_message, self.chunks, self.rcpts = False, [], 0
        elif isinstance(event, ev.Close):
            assert engine.closed
            self._flush()
            self.finished = True
            self.in_message = False


def check_replies(out: bytes) -> None:
    if not out:
        return
    assert out.endswith(b"\r\n"), out[-80:]
    pending = None
    for line in out[:-2].split(b"\r\n"):
        assert CR not in line and LF not in line, line
        assert len(line) + 2 <= MAX_LINE, line[:80]
        m = REPLY_LINE.fullmatch(line)
        assert m, line[:120]
        code, sep, text = m.groups()
        assert pending in (None, code), line
        pending = code if sep == b"-" else None
        first = text.split(b" ", 1)[0]
        if first[:1].isdigit() and b"." in first:
            enh = ENHANCED.fullmatch(first)
            assert enh and enh.group(1) == code[:1], line
    assert pending is None, out[-120:]


def normalized(run: Run) -> list[tuple]:
    """Events with each message's chunks joined; chunks of refused messages dropped (where
    a refused message was cut decides how much of it was passed on before the refusal)."""
    out: list[tuple] = []
    pending: list[bytes] = []
    for kind, value in run.events:
        if kind == "chunk":
            pending.append(value)
            continue
        if value.startswith("DataEnd(error=None"):
            out.append(("message", b"".join(pending)))
        pending = []
        out.append((kind, value))
    return out


# ---------------------------------------------------------------------------- properties


def run_flights(cfg: EngineConfig, salt: int, stream: list[bytes],
                cuts: list[int] | None) -> Run:
    """Feed each flight whole (``cuts`` None) or cut at the given offsets; the rest of a
    flight after a STARTTLS is not sent (the client waits for the 220 and the handshake)."""
    run = Run(cfg, salt)
    for flight in stream:
        run.starttls = False
        for piece in [flight] if cuts is None else _cut(flight, cuts):
            if run.starttls:
                break
            run.feed(piece)
    return run


@PROPERTY
@given(configs(), st.integers(0, 2**32 - 1), flights(),
       st.lists(st.integers(0, 10_000), max_size=40))
def test_engine_on_random_streams_cut_anywhere_keeps_its_contract(cfg, salt, stream, cuts):
    """Any bytes, cut anywhere (flights ignored): no exception, well-formed replies, every
    invariant the driver checks."""
    run = Run(cfg, salt)
    for piece in _cut(b"".join(stream), cuts):
        run.feed(piece)
    assert run.engine.closed or not run.finished


@PROPERTY
@given(configs(), st.integers(0, 2**32 - 1), flights(),
       st.lists(st.integers(0, 10_000), min_size=1, max_size=40))
def test_same_flights_in_one_piece_or_many_give_the_same_events_and_output(
        cfg, salt, stream, cuts):
    whole = run_flights(cfg, salt, stream, None)
    if whole.pipelining_violation:
        return                # text sent before the 354: refused, depending on the cut
    cut = run_flights(cfg, salt, stream, cuts)
    assert normalized(cut) == normalized(whole)
    assert bytes(cut.output) == bytes(whole.output)
    assert cut.engine.closed == whole.engine.closed


@PROPERTY
@given(st.lists(st.sampled_from(TEXT_TOKENS), max_size=60),
       st.lists(st.integers(0, 100_000), max_size=60), st.sampled_from([0, 100, 10240000]))
def test_message_text_cut_anywhere_gives_the_same_message_or_refusal(tokens, cuts, limit):
    """DATA alone, many more cuts: the message (or the refusal) does not depend on them, an
    accepted message is CRLF-only, without NUL, within the limit and of the size announced,
    and in DATA at most the 4 bytes of a possible end marker are held between reads."""
    text = b"".join(tokens) + b"\r\n.\r\nNOOP\r\n"
    results = []
    for points in (None, cuts, range(len(text))):
        e = Engine(EngineConfig("mx.test", size_limit=limit))
        e.feed(b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n")
        _drain(e)
        e.feed(b"DATA\r\n")
        _drain(e)
        e.take_output()
        pieces = [text] if points is None else _cut(text, points)
        chunks, ends, out = [], [], b""
        for piece in pieces:
            e.feed(piece)
            got = _drain(e)
            chunks += [x.data for x in got if isinstance(x, ev.DataChunk)]
            ends += [x for x in got if isinstance(x, ev.DataEnd)]
            out += e.take_output()
            if not ends and not e.closed:
                assert e.buffered <= 4
        message = b"".join(chunks)
        if ends and ends[0].error is None:
            pairs = message.count(b"\r\n")
            assert message.count(CR) == pairs and message.count(LF) == pairs
            assert b"\x00" not in message and ends[0].size == len(message)
            assert not limit or len(message) <= limit
        results.append((message if ends and ends[0].error is None else None,
                        [(x.error, x.size) for x in ends], out, e.closed))
    assert results[0] == results[1] == results[2]


def _cut(data: bytes, points) -> list[bytes]:
    """``data`` cut at ``points`` (taken modulo its length), without empty pieces."""
    pts = sorted({p % (len(data) + 1) for p in points})
    return [data[a:b] for a, b in zip([0, *pts], [*pts, len(data)], strict=True) if data[a:b]]


def _drain(e: Engine) -> list:
    got = []
    while True:
        event = e.next_event()
        if event is ev.NEED_DATA:
            return got
        got.append(event)
        if isinstance(event, ev.MailFrom | ev.RcptTo):
            e.respond(Reply(250, "2.0.0", "Ok"))
        elif isinstance(event, ev.DataStart):
            e.respond(Reply(354, "", "go ahead"))
        elif isinstance(event, ev.DataEnd):
            e.respond(event.error or Reply(250, "2.0.0", "Ok: queued as X"))
