"""The SMTP server protocol as a sans-I/O state machine: bytes in, events and replies out.

Implementation summary. ``feed()`` appends received bytes; ``next_event()`` consumes them and
returns one event at a time, ``NEED_DATA`` when the input is used up, or ``PAUSED`` while a
decision event (MAIL, RCPT, DATA start/end, AUTH) waits for ``respond()``. Replies accumulate
in an outbox that the driver writes once per read (``take_output()``), which is what turns a
pipelined group of commands into one batch of replies (RFC 2920).

The engine owns everything that is protocol: command syntax, command order, ESMTP parameter
syntax, limits on line length, recipients and errors, dot-unstuffing and the end of DATA,
BDAT chunk framing, and the defences:

* Only ``<CRLF>.<CRLF>`` ends DATA. A CR or LF that is not part of a CRLF pair, in DATA or
  in a command line, ends the session with ``521 5.5.2`` and the partial message is dropped
  (the SMTP smuggling class: CVE-2023-51764, CVE-2024-27305). Nothing after such a byte is
  ever read as a command.
* NUL is not message content without BINARYMIME (RFC 5321 §4.5.2, RFC 3030), which we do
  not offer. A message containing one is read to its end (DATA) or its LAST chunk (BDAT),
  not passed on, and refused with ``554 5.6.0``; the session stays in step (Postfix's
  ``message_reject_characters = \\0`` reads to the end too, then answers ``550 5.7.1``).
* A command line that is not UTF-8 gets ``500 5.5.2 Error: bad UTF-8 syntax``, as from
  Postfix: no undecodable byte reaches an address, a parameter or the HELO name.
* Bytes that follow DATA in the same read arrived before the 354 and break RFC 2920's rule
  that DATA ends a pipelined group: ``554 5.5.0`` and disconnect (as Postfix's
  ``smtpd_forbid_unauth_pipelining``).
* After STARTTLS's 220 every byte already received or received before the handshake is
  discarded, and the session is back to "EHLO required" (CVE-2011-0411 class).

SMTP AUTH (RFC 4954) is protocol too, so the engine runs the whole SASL exchange for PLAIN,
LOGIN and CRAM-MD5: ``334`` challenges, base64 both ways, ``*`` to cancel, a bounded line
length; only the finished credentials leave the engine, as one ``Auth`` decision event. AUTH
is advertised and accepted only when ``auth_mechanisms`` is set (the submission listeners) and,
unless ``auth_requires_tls`` is off, only under TLS. REQUIRETLS (RFC 8689) is advertised, and
its MAIL FROM parameter taken, only under TLS too (after STARTTLS, or implicit TLS). The
engine never logs anything, so SASL lines cannot reach a log from here.

What is policy (which recipients exist, who may relay, when a message is durable) belongs to
the driver, which sees it as decision events.

Work per received byte is O(1) amortised whatever the input: DATA is scanned with C-level
searches over each read, and the only bytes carried from one read to the next are a possible
start of the end marker (at most four: ``<CR><LF>.<CR>``), counted in ``buffered``. Every
other byte is passed on (or, past the size limit or after a NUL, dropped) as it arrives, so
the size limit sees it at once. A partial command or SASL line is searched again on each
read, which is bounded by the line limits.

Once closed (QUIT, a fatal protocol error, or the driver's ``close()``) the engine is final:
nothing more is written, ``respond()`` and ``close()`` do nothing.
"""

from __future__ import annotations

import base64
import binascii
import os
import time
from dataclasses import dataclass

from pymta.smtp import events as ev
from pymta.smtp.params import (
    ParamError,
    parse_address,
    parse_mail_params,
    parse_rcpt_params,
    split_path,
)
from pymta.types import Reply

CR, LF = 13, 10
_CRLF = b"\r\n"
_END = b"\r\n.\r\n"
MAX_HELO = 255        # octets: a domain name (RFC 5321 §4.5.3.1.2) or an address literal


@dataclass(frozen=True, slots=True)
class EngineConfig:
    hostname: str
    size_limit: int = 10240000
    max_line_length: int = 2048
    max_recipients: int = 1000
    max_errors: int = 20
    tls_available: bool = False
    tls_active: bool = False          # implicit TLS (port 465)
    auth_mechanisms: tuple[str, ...] = ()
    auth_requires_tls: bool = True
    sasl_line_limit: int = 12288      # RFC 4954 §4: a SASL response line may be this long
    banner: str = "ESMTP pymta"
    # RCPTs refused with 452 for exceeding max_recipients that are not counted as errors, per
    # transaction (Postfix's smtpd_recipient_overshoot_limit): a client that pipelines more
    # recipients than we take must not lose its whole transaction to the error limit.
    recipient_overshoot_limit: int = 1000


# Replies that do not depend on the session (built once).
R_OK = Reply(250, "2.0.0", "Ok")
R_MAIL_OK = Reply(250, "2.1.0", "Ok")
R_RCPT_OK = Reply(250, "2.1.5", "Ok")
R_DATA_GO = Reply(354, "", "End data with <CR><LF>.<CR><LF>")
R_NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
R_NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
R_NEED_RCPT = Reply(503, "5.5.1", "Error: need RCPT command")
R_NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
R_NO_VALID_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
R_UNKNOWN = Reply(500, "5.5.2", "Error: command not recognized")
R_LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
R_BARE_LF = Reply(521, "5.5.2", "Error: bare <CR> or <LF> received; closing connection")
R_PIPELINING = Reply(554, "5.5.0", "Error: SMTP protocol synchronization: "
                                   "message data sent before 354; closing connection")
R_TOO_MANY_RCPTS = Reply(452, "4.5.3", "Error: too many recipients")
R_SIZE = Reply(552, "5.3.4", "Error: message file too big")
R_BDAT_BARE = Reply(554, "5.6.0", "Error: message contains bare <CR> or <LF>")
R_NUL = Reply(554, "5.6.0", "Error: message contains a NUL character")
R_BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax")
R_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R_BAD_RCPT = Reply(501, "5.1.3", "Bad recipient address syntax")
R_UTF8_REQUIRED = Reply(553, "5.6.7", "Error: SMTPUTF8 required for non-ASCII address")
R_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
R_HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: HELO hostname")
R_EHLO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
R_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
R_EXPN = Reply(502, "5.5.1", "Error: command not implemented")
R_TLS_GO = Reply(220, "2.0.0", "Ready to start TLS")
R_TLS_NA = Reply(502, "5.5.1", "Error: STARTTLS not available")
R_TLS_AGAIN = Reply(554, "5.5.1", "Error: TLS already active")
R_AUTH_NA = Reply(502, "5.5.1", "Error: authentication not enabled")
R_AUTH_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
# REQUIRETLS (RFC 8689) outside TLS: the extension is only offered under TLS (§2, §4). Where
# STARTTLS is offered, RFC 3207 §4's answer to a command that needs TLS first; where TLS is
# not available at all, the parameter of an extension we do not offer (RFC 5321 §4.1.1.11).
R_REQUIRETLS_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
R_REQUIRETLS_NA = Reply(555, "5.5.4", "Unsupported option: REQUIRETLS needs TLS")
R_AUTH_ABORTED = Reply(501, "5.0.0", "Authentication aborted")
R_AUTH_BASE64 = Reply(501, "5.5.2", "Cannot decode response")
R_AUTH_MALFORMED = Reply(501, "5.5.2", "Error: malformed authentication response")
R_AUTH_LINE = Reply(500, "5.5.6", "Error: authentication exchange line is too long")
R_AUTH_MECH = Reply(504, "5.5.4", "Error: unsupported authentication mechanism")
R_AUTH_DONE = Reply(503, "5.5.1", "Error: already authenticated")
R_AUTH_IN_TXN = Reply(503, "5.5.1", "Error: MAIL transaction in progress")
R_AUTH_NO_INITIAL = Reply(501, "5.5.4", "Error: CRAM-MD5 takes no initial response")
R_HELP = Reply(214, "2.0.0", "See https://www.rfc-editor.org/rfc/rfc5321")
R_NOOP = Reply(250, "2.0.0", "Ok")
R_RSET = Reply(250, "2.0.0", "Ok")

_IDLE, _COMMAND, _DATA, _BDAT, _WAIT, _TLS_PENDING, _CLOSED, _SKIP_LINE, _SASL = range(9)
_REFUSED = b"\r\n"   # _take_line's "dealt with" marker (no line it returns contains CRLF)

# LOGIN's prompts, already base64 ("Username:", "Password:"), as every server sends them.
_LOGIN_USER = "VXNlcm5hbWU6"
_LOGIN_PASS = "UGFzc3dvcmQ6"


def _marker_prefix(work: bytes) -> int:
    """Length of the longest suffix of ``work`` that is a proper prefix of ``<CR><LF>.<CR><LF>``
    (0 to 4): the only bytes DATA mode must carry to the next read. A trailing CR is always
    kept, so a CRLF pair is never split between two checks."""
    last = work[-1:]
    if last == b"\r":
        return 4 if work[-4:] == b"\r\n.\r" else 1
    if last == b"\n":
        return 2 if work[-2:] == _CRLF else 0
    if last == b".":
        return 3 if work[-3:] == b"\r\n." else 0
    return 0


def _cram_challenge(hostname: str) -> str:
    """A fresh RFC 2195 challenge: ``<random.timestamp@hostname>``."""
    return f"<{int.from_bytes(os.urandom(8), 'big')}.{int(time.time())}@{hostname}>"


class Engine:
    """One SMTP server session's protocol state. Not thread-safe; one per connection."""

    __slots__ = (
        "cfg", "_buf", "_out", "_events", "_state", "_waiting", "_helo", "_extended",
        "_tls", "_has_mail", "_mail_utf8", "_rcpts", "_errors", "_tail", "_first_chunk",
        "_size", "_over", "_bdat_left", "_bdat_last", "_bdat_discard", "_bdat_reply",
        "_bdat_open", "_bdat_cr", "_bdat_bare", "closed", "auth_user", "_sasl", "_nul",
        "_overshoot", "_skip_cr", "stats", "where", "_counting",
    )

    def __init__(self, cfg: EngineConfig) -> None:
        self.cfg = cfg
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._events: list[ev.Event] = []
        self._state = _COMMAND
        self._waiting: object | None = None
        self._helo = ""
        self._extended = False
        self._tls = cfg.tls_active
        self._errors = 0
        self.closed = False
        self.auth_user: str | None = None
        self._sasl: list[str] | None = None   # [mechanism, step data...] during an exchange
        self._skip_cr = False                  # skipping a long line that ended in CR so far
        self._bdat_reply: Reply | None = None  # the answer to each chunk of a refused BDAT
        # Postfix's per-session command counts (``disconnect from ... ehlo=1 rcpt=0/1 ...``):
        # lower-case verb → [successes, total], in order of first use; ``where`` is the
        # last command's verb (``lost connection after RCPT``), CONNECT before the first.
        self.stats: dict[str, list[int]] = {}
        self.where = "CONNECT"
        self._counting: list[int] | None = None   # the command awaiting its final reply
        self._reset_txn()

    # ------------------------------------------------------------------ driver interface

    def greeting(self) -> None:
        if not self.closed:
            self._out.append(f"220 {self.cfg.hostname} {self.cfg.banner}\r\n".encode())

    def feed(self, data: bytes) -> None:
        if self._state in (_TLS_PENDING, _CLOSED):
            return  # plaintext behind STARTTLS, or anything after we decided to close
        self._buf += data

    @property
    def buffered(self) -> int:
        """Received bytes the engine holds and has not passed on: the input not yet
        processed plus the few bytes of a possible end-of-data marker carried between
        reads. The driver pauses reading above a threshold of this."""
        return len(self._buf) + len(self._tail)

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def helo(self) -> str:
        return self._helo

    @property
    def in_transaction(self) -> bool:
        """A mail transaction has begun (MAIL accepted) and has not ended: a server that
        drains before stopping lets it finish, and refuses any new one."""
        return self._has_mail or self._state in (_DATA, _BDAT)

    def take_output(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """The transport is now TLS: forget everything said before (RFC 3207 §4.2)."""
        if self.closed:
            return
        self._buf.clear()
        self._tls = True
        self._helo = ""
        self._extended = False
        self._reset_txn()
        self._state = _COMMAND

    def close(self, reply: Reply | None, reason: str) -> None:
        """Driver-initiated close (idle timeout, shutdown): send ``reply`` and stop.

        Final: a pending decision is dropped (its later ``respond()`` writes nothing), and on
        an engine that is already closed this does nothing, so no reply ever follows the
        last one (a ``421`` then a ``250`` made clients send a message twice)."""
        if self.closed:
            return
        if reply is not None:
            self._out.append(reply.render())
        self._enter_closed(reason)

    def respond(self, reply: Reply) -> None:
        """Answer the pending decision event. After a close it does nothing: the decision
        was dropped with the session, and nothing may follow the closing reply."""
        if self.closed:
            self._waiting = None
            return
        pending = self._waiting
        if pending is None:
            raise RuntimeError("no decision is pending")
        self._waiting = None
        self._state = _COMMAND
        ok = reply.code < 400
        match pending:
            case ev.MailFrom():
                if ok:
                    self._has_mail = True
                    # A refused BDAT of an earlier transaction must not poison this one.
                    self._bdat_discard = False
                    self._bdat_reply = None
                    self._mail_utf8 = pending.params.smtputf8
                self._reply(reply)
            case ev.RcptTo():
                if ok:
                    self._rcpts += 1
                self._reply(reply)
            case ev.DataStart(bdat=True):
                self._answer_bdat(reply, ok)
            case ev.DataStart():
                self._answer_data(reply, ok)
            case ev.DataEnd():
                self._reply(reply)
                self._reset_txn()
                self.where = "END-OF-MESSAGE"
            case ev.Auth():
                if ok and self.auth_user is None:
                    self.auth_user = pending.username
                self._reply(reply)
        if self._state == _COMMAND and self._errors >= self.cfg.max_errors:
            self._too_many_errors()

    def _answer_bdat(self, reply: Reply, ok: bool) -> None:
        """The first BDAT's decision: chunks are taken either way (RFC 3030 has no go-ahead
        reply); refused, they are read and discarded, each answered with ``reply``."""
        self._state = _BDAT
        if ok:
            self._bdat_open = True
        else:
            self._bdat_discard = True
            self._bdat_reply = reply
            self._reset_txn_keep_bdat()
            self._events.append(ev.Reset())

    def _answer_data(self, reply: Reply, ok: bool) -> None:
        """DATA's decision: the 354 and the message text, or the refusal ending the
        transaction."""
        if not ok:
            self._reply(reply)
            self._reset_txn()
            self._events.append(ev.Reset())
            return
        self._state = _DATA
        self._tail = b""
        self._first_chunk = True
        self._size = 0
        self._over = False
        self._nul = False
        self._reply(reply)
        if self._buf:  # message text arrived before the 354
            self._reply(R_PIPELINING)
            self._events.append(ev.Reset())
            self._enter_closed("pipelining violation")

    def next_event(self) -> ev.Event | ev._Sentinel:
        while True:
            if self._events:
                return self._events.pop(0)
            state = self._state
            if state == _WAIT:
                return ev.PAUSED
            if state in (_CLOSED, _TLS_PENDING):
                return ev.NEED_DATA
            if state == _COMMAND:
                progressed = self._command_step()
            elif state == _DATA:
                progressed = self._data_step()
            elif state == _BDAT:
                progressed = self._bdat_step()
            elif state == _SASL:
                progressed = self._sasl_step()
            else:  # _SKIP_LINE
                progressed = self._skip_step()
            if not progressed and not self._events:
                return ev.NEED_DATA

    # ------------------------------------------------------------------ helpers

    def _reset_txn(self) -> None:
        self._has_mail = False
        self._mail_utf8 = False
        self._rcpts = 0
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_discard = False
        self._bdat_reply = None
        self._bdat_open = False
        self._bdat_cr = False
        self._bdat_bare = False
        self._size = 0
        self._over = False
        self._nul = False
        self._overshoot = 0
        self._tail = b""
        self._first_chunk = True

    def _reset_txn_keep_bdat(self) -> None:
        left, last, reply = self._bdat_left, self._bdat_last, self._bdat_reply
        self._reset_txn()
        self._bdat_left, self._bdat_last, self._bdat_reply = left, last, reply
        self._bdat_discard = True

    @property
    def data_bytes(self) -> int:
        """Message bytes received in the current DATA/BDAT so far."""
        return self._size

    def _reply(self, reply: Reply, *, counted: bool = True) -> None:
        entry = self._counting
        if entry is not None and reply.code not in (334, 354):     # a command's final reply
            # counted even when the client is gone: a message queued after its client left
            # is "data=1" in the disconnect line, as its log says it was queued
            if reply.code < 400:
                entry[0] += 1
            self._counting = None
        if self.closed:
            return
        self._out.append(reply.render())
        if counted and reply.code >= 400:
            self._errors += 1

    def _too_many_errors(self) -> None:
        self._out.append(Reply(421, "4.7.0", f"{self.cfg.hostname} Error: too many errors; "
                                             "closing connection").render())
        self._enter_closed("too many errors")

    def _enter_closed(self, reason: str) -> None:
        self._state = _CLOSED
        self._buf.clear()
        self._tail = b""
        self._waiting = None
        self.closed = True
        self._events.append(ev.Close(reason))

    def _decide(self, event: ev.Event) -> None:
        self._waiting = event
        self._state = _WAIT
        self._events.append(event)

    # ------------------------------------------------------------------ command mode

    def _command_step(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        nl = buf.find(b"\n", 0, self.cfg.max_line_length)
        if nl > 0 and buf[nl - 1] == CR and buf.find(b"\r", 0, nl - 1) < 0:
            line = bytes(buf[: nl - 1])       # the common case, inline: a good line
            del buf[: nl + 1]
        else:
            taken = self._take_line(self.cfg.max_line_length, R_LINE_TOO_LONG)
            if taken is None:
                return False
            if taken is _REFUSED:
                return True
            line = taken
        self._dispatch(line)
        if self._state == _COMMAND:
            self._check_errors()
        return True

    def _take_line(self, limit: int, too_long: Reply) -> bytes | None:
        """Take one CRLF-terminated line of at most ``limit`` octets (CRLF included) from the
        buffer and return it without its CRLF; None while it is incomplete.

        ``_REFUSED`` when the line was dealt with here: a bare CR or LF (``521``, closed), or
        ``limit`` octets without a line end (``too_long``; the rest of the line is skipped,
        still checked for bare CR/LF). Only the first ``limit`` octets are ever searched,
        and which of the two comes first depends on the bytes alone, never on how the
        stream was cut into reads.
        """
        buf = self._buf
        nl = buf.find(b"\n", 0, limit)
        if nl < 0:
            if len(buf) < limit:
                return None
            if buf.find(b"\r", 0, limit - 1) >= 0:     # a CR not followed by LF
                self._bare_in_line()
                return _REFUSED
            self._skip_cr = buf[limit - 1] == CR
            del buf[:limit]
            self._sasl = None
            self._state = _SKIP_LINE
            self._reply(too_long)
            self._check_errors()
            return _REFUSED
        if nl == 0 or buf[nl - 1] != CR or buf.find(b"\r", 0, nl - 1) >= 0:
            self._bare_in_line()
            return _REFUSED
        line = bytes(buf[: nl - 1])
        del buf[: nl + 1]
        return line

    def _bare_in_line(self) -> None:
        where = "SASL response" if self._state == _SASL else "command"
        self._sasl = None
        self._reply(R_BARE_LF)
        self._enter_closed(f"bare CR or LF in {where}")

    def _skip_step(self) -> bool:
        buf = self._buf
        if not buf:
            return False
        nl = buf.find(b"\n")
        end = len(buf) if nl < 0 else nl + 1
        seg = (b"\r" if self._skip_cr else b"") + bytes(buf[:end])
        if nl >= 0:
            bare = not seg.endswith(_CRLF) or seg.count(b"\r") != 1
        else:
            bare = b"\r" in (seg[:-1] if seg.endswith(b"\r") else seg)
        if bare:
            self._reply(R_BARE_LF)
            self._enter_closed("bare CR or LF in command")
            return True
        del buf[:end]
        if nl < 0:
            self._skip_cr = seg.endswith(b"\r")
            return False
        self._skip_cr = False
        self._state = _COMMAND
        return True

    def _check_errors(self) -> None:
        if self._errors >= self.cfg.max_errors and self._state != _CLOSED:
            self._too_many_errors()

    def _dispatch(self, line: bytes) -> None:
        sp = line.find(b" ")
        if sp < 0:
            verb, arg = line.upper(), ""
        else:
            verb = line[:sp].upper()
        handler = _HANDLERS.get(verb)
        name = verb.decode("ascii").lower() if handler is not None else "unknown"
        entry = self.stats.get(name)
        if entry is None:
            entry = self.stats[name] = [0, 0]
        entry[1] += 1
        self._counting = entry
        self.where = name.upper()
        if sp >= 0:
            try:
                arg = line[sp + 1:].decode("utf-8")
            except UnicodeDecodeError:
                # RFC 6531 wants UTF-8; Postfix answers exactly this to any command line
                # that is not. Nothing undecodable reaches an address, parameter or name.
                self._reply(R_BAD_UTF8)
                return
        if handler is None:
            self._reply(R_UNKNOWN)
            return
        handler(self, arg)

    def _cmd_ehlo(self, arg: str) -> None:
        self._helo_common(arg, True)

    def _cmd_helo(self, arg: str) -> None:
        self._helo_common(arg, False)

    def _helo_common(self, arg: str, extended: bool) -> None:
        # Postfix takes any name by default (its header code quotes it), and so do we, but
        # not controls, separators, format characters (isprintable() refuses all of them),
        # spaces or more than a domain's 255 octets: the name goes into logs and headers.
        name = arg.strip(" ")
        if (not name or " " in name or not name.isprintable()
                or len(name.encode("utf-8")) > MAX_HELO):
            self._reply(R_EHLO_SYNTAX if extended else R_HELO_SYNTAX)
            return
        self._helo = name
        self._extended = extended
        self._reset_txn()
        self._events.append(ev.Helo(name, extended))
        if self._counting is not None:      # its 250 is written below, not by _reply
            self._counting[0] += 1
            self._counting = None
        host = self.cfg.hostname
        if not extended:
            self._out.append(f"250 {host}\r\n".encode())
            return
        lines = [host, "PIPELINING"]
        if self.cfg.size_limit:
            lines.append(f"SIZE {self.cfg.size_limit}")
        if self.cfg.tls_available and not self._tls:
            lines.append("STARTTLS")
        if self.cfg.auth_mechanisms and (self._tls or not self.cfg.auth_requires_tls):
            lines.append("AUTH " + " ".join(self.cfg.auth_mechanisms))
        if self._tls:
            # RFC 8689: only meaningful on a TLS-protected session (after STARTTLS, or
            # implicit TLS); Exim's server offers it only there too
            lines.append("REQUIRETLS")
        lines += ["ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8", "CHUNKING"]
        last = len(lines) - 1
        self._out.append("".join(
            f"250{' ' if i == last else '-'}{text}\r\n" for i, text in enumerate(lines)
        ).encode())

    def _cmd_mail(self, arg: str) -> None:
        if not self._helo:
            self._reply(R_NEED_HELO)
            return
        if self._has_mail:
            self._reply(R_NESTED_MAIL)
            return
        parts = split_path(arg, "FROM:")
        if parts is None:
            self._reply(Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
            return
        path, ptext = parts
        try:
            params = parse_mail_params(ptext, size_limit=self.cfg.size_limit)
        except ParamError as exc:
            self._reply(exc.reply)
            return
        if params.requiretls and not self._tls:
            self._reply(R_REQUIRETLS_TLS if self.cfg.tls_available else R_REQUIRETLS_NA)
            return
        address = parse_address(path, utf8=params.smtputf8, allow_null=True)
        if address is None:
            self._reply(R_UTF8_REQUIRED if not path.isascii() and not params.smtputf8
                        else R_BAD_SENDER)
            return
        self._decide(ev.MailFrom(address, params))

    def _cmd_rcpt(self, arg: str) -> None:
        if not self._has_mail:
            self._reply(R_NEED_MAIL if self._helo else R_NEED_HELO)
            return
        parts = split_path(arg, "TO:")
        if parts is None:
            self._reply(Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
            return
        if self._rcpts >= self.cfg.max_recipients:
            # Postfix's smtpd_recipient_overshoot_limit: the first so many of these are not
            # errors, so a pipelined batch longer than our limit keeps its transaction.
            self._overshoot += 1
            self._reply(R_TOO_MANY_RCPTS,
                        counted=self._overshoot > self.cfg.recipient_overshoot_limit)
            return
        path, ptext = parts
        try:
            params = parse_rcpt_params(ptext, utf8=self._mail_utf8)
        except ParamError as exc:
            self._reply(exc.reply)
            return
        address = parse_address(path, utf8=self._mail_utf8, allow_null=False,
                                allow_bare_postmaster=True)
        if address is None:
            self._reply(R_UTF8_REQUIRED if not path.isascii() and not self._mail_utf8
                        else R_BAD_RCPT)
            return
        self._decide(ev.RcptTo(address, params))

    def _cmd_data(self, arg: str) -> None:
        if arg:
            self._reply(Reply(501, "5.5.4", "Syntax: DATA"))
        elif not self._has_mail:
            self._reply(R_NEED_MAIL if self._helo else R_NEED_HELO)
        elif not self._rcpts:
            self._reply(R_NO_VALID_RCPT)
        elif self._bdat_open:
            self._reply(Reply(503, "5.5.1", "Error: DATA after BDAT"))
        else:
            self._decide(ev.DataStart(False))

    def _cmd_bdat(self, arg: str) -> None:
        words = [w for w in arg.split(" ") if w]
        if not words or len(words) > 2 or not words[0].isascii() or not words[0].isdigit() \
                or len(words[0]) > 18 or (len(words) == 2 and words[1].upper() != "LAST"):
            # Without a valid size we cannot know where the chunk ends: stop here rather
            # than read message bytes as commands.
            self._reply(Reply(501, "5.5.4", "Syntax: BDAT size [LAST]; closing connection"))
            self._enter_closed("bad BDAT syntax")
            return
        self._bdat_left = int(words[0])
        self._bdat_last = len(words) == 2
        if not self._has_mail or not self._rcpts or self._bdat_discard:
            if not self._bdat_discard:
                self._bdat_reply = (R_NEED_MAIL if not self._has_mail else R_NO_VALID_RCPT)
            self._bdat_discard = True
            self._state = _BDAT
            return
        if not self._bdat_open:
            self._decide(ev.DataStart(True))
            return
        self._state = _BDAT

    def _cmd_rset(self, arg: str) -> None:
        self._reset_txn()
        self._events.append(ev.Reset())
        self._reply(R_RSET)

    def _cmd_noop(self, arg: str) -> None:
        self._reply(R_NOOP)

    def _cmd_quit(self, arg: str) -> None:
        self._reply(Reply(221, "2.0.0", "Bye"))
        self._enter_closed("QUIT")

    def _cmd_vrfy(self, arg: str) -> None:
        self._reply(R_VRFY if arg else Reply(501, "5.5.4", "Syntax: VRFY address"))

    def _cmd_expn(self, arg: str) -> None:
        self._reply(R_EXPN)

    def _cmd_help(self, arg: str) -> None:
        self._reply(R_HELP)

    def _cmd_starttls(self, arg: str) -> None:
        if arg:
            self._reply(Reply(501, "5.5.4", "Syntax: STARTTLS"))
        elif self._tls:
            self._reply(R_TLS_AGAIN)
        elif not self.cfg.tls_available:
            self._reply(R_TLS_NA)
        elif not self._helo:
            self._reply(R_NEED_HELO)
        else:
            self._reply(R_TLS_GO)
            self._buf.clear()
            self._state = _TLS_PENDING
            self._events.append(ev.StartTLS())

    def _cmd_auth(self, arg: str) -> None:
        if not self.cfg.auth_mechanisms:
            self._reply(R_AUTH_NA)
        elif self.cfg.auth_requires_tls and not self._tls:
            self._reply(R_AUTH_TLS)
        elif not self._helo:
            self._reply(R_NEED_HELO)
        elif self._has_mail:
            self._reply(R_AUTH_IN_TXN)
        elif self.auth_user is not None:
            self._reply(R_AUTH_DONE)
        else:
            mech, _, initial = arg.strip(" ").partition(" ")
            mech = mech.upper()
            initial = initial.strip(" ")
            if not mech or not mech.isascii():
                self._reply(Reply(501, "5.5.4", "Syntax: AUTH mechanism"))
            elif mech not in self.cfg.auth_mechanisms:
                self._reply(R_AUTH_MECH)
            elif mech == "CRAM-MD5":
                if initial:
                    self._reply(R_AUTH_NO_INITIAL)
                    return
                challenge = _cram_challenge(self.cfg.hostname)
                self._sasl_ask(["CRAM-MD5", challenge],
                               base64.b64encode(challenge.encode()).decode())
            elif not initial:
                if mech == "PLAIN":
                    self._sasl_ask(["PLAIN"], "")
                else:
                    self._sasl_ask(["LOGIN"], _LOGIN_USER)
            else:
                # RFC 4954 §4: "=" is an empty initial response.
                self._sasl = [mech]
                self._sasl_response(b"" if initial == "=" else initial.encode("ascii",
                                                                                "replace"))

    # ------------------------------------------------------------------ SASL exchange

    def _sasl_ask(self, state: list[str], challenge: str) -> None:
        self._sasl = state
        self._state = _SASL
        if not self.closed:
            self._out.append(f"334 {challenge}\r\n".encode())

    def _sasl_end(self, reply: Reply | None = None) -> None:
        self._sasl = None
        self._state = _COMMAND
        if reply is not None:
            self._reply(reply)

    def _sasl_step(self) -> bool:
        line = self._take_line(self.cfg.sasl_line_limit, R_AUTH_LINE)
        if line is None:
            return False
        if line is not _REFUSED:
            self._sasl_response(line)
            if self._state == _COMMAND:
                self._check_errors()
        return True

    def _sasl_response(self, line: bytes) -> None:
        """One client response (base64, or ``*``) for the exchange in ``self._sasl``."""
        state = self._sasl
        assert state is not None
        if line.strip() == b"*":
            self._sasl_end(R_AUTH_ABORTED)
            return
        try:
            data = binascii.a2b_base64(line, strict_mode=True) if line else b""
            text = data.decode("utf-8")
        except (binascii.Error, ValueError):
            self._sasl_end(R_AUTH_BASE64)
            return
        mech = state[0]
        if mech == "PLAIN":
            parts = text.split("\0")
            if len(parts) != 3 or not parts[1]:
                self._sasl_end(R_AUTH_MALFORMED)
                return
            self._sasl_finish(ev.Auth("PLAIN", parts[1], parts[2], authzid=parts[0]))
        elif mech == "LOGIN":
            if len(state) == 1:
                if not text or "\0" in text:
                    self._sasl_end(R_AUTH_MALFORMED)
                    return
                self._sasl_ask(["LOGIN", text], _LOGIN_PASS)
            else:
                self._sasl_finish(ev.Auth("LOGIN", state[1], text))
        else:  # CRAM-MD5: "username hexdigest"
            user, _, digest = text.rpartition(" ")
            if not user or len(digest) != 32 or "\0" in user:
                self._sasl_end(R_AUTH_MALFORMED)
                return
            self._sasl_finish(ev.Auth("CRAM-MD5", user, digest.lower(), challenge=state[1]))

    def _sasl_finish(self, event: ev.Auth) -> None:
        self._sasl = None
        self._decide(event)

    # ------------------------------------------------------------------ DATA mode

    def _data_step(self) -> bool:
        """Consume everything buffered in DATA mode: O(1) work per byte.

        ``work`` is the carried tail (at most the four bytes ``<CR><LF>.<CR>`` that may begin
        the end marker) plus this read; before the first line a virtual ``<CR><LF>`` (the one
        that ended the DATA command) stands in front, so a dot on the first line is a line
        start too. Everything up to the end marker, or up to the longest suffix that could
        still begin one, is checked for bare CR/LF and NUL with C-level counts, unstuffed
        and passed on; the suffix is all that is kept.
        """
        if not self._buf:
            return False
        lead = _CRLF if self._first_chunk else b""
        tail = self._tail
        work = (lead + tail if tail else lead) + self._buf
        self._buf = bytearray()
        end = work.find(_END)
        if end >= 0:
            cut = end + 2
            rest: bytes | None = work[end + 5:]
            self._tail = b""
        else:
            cut = len(work) - _marker_prefix(work)
            if cut <= len(lead):      # nothing but a possible start of the marker so far
                self._tail = work[len(lead):]
                return False
            rest = None
            self._tail = work[cut:]
        pairs = work.count(_CRLF, 0, cut)
        if work.count(b"\r", 0, cut) != pairs or work.count(b"\n", 0, cut) != pairs:
            self._reply(R_BARE_LF)
            self._enter_closed("bare CR or LF in message data")
            return True
        if self._first_chunk:
            # the virtual CRLF goes, and a stuffed dot on the first line with it
            self._first_chunk = False
            start = 3 if work[2:3] == b"." else 2
        else:
            start = 0
        if not self._nul and work.find(b"\0", start, cut) >= 0:
            self._nul = True
        body = work[start:cut].replace(b"\r\n.", _CRLF)
        if body:
            # Facts about the whole message, whatever the reads: its size, whether it has a
            # NUL. Once either refuses it, nothing more is passed on.
            self._size += len(body)
            if self.cfg.size_limit and self._size > self.cfg.size_limit:
                self._over = True
            if not self._over and not self._nul:
                self._events.append(ev.DataChunk(body))
        if rest is not None:
            self._buf = bytearray(rest)
            error = R_SIZE if self._over else (R_NUL if self._nul else None)
            self._decide(ev.DataEnd(error, self._size))
        return True

    # ------------------------------------------------------------------ BDAT mode

    def _bdat_step(self) -> bool:
        if self._bdat_left:
            if not self._buf:
                return False
            n = min(self._bdat_left, len(self._buf))
            chunk = bytes(self._buf[:n])
            del self._buf[:n]
            self._bdat_left -= n
            if not self._bdat_discard:
                # As in DATA: size, bare CR/LF and NUL are facts about the whole message,
                # refused after the LAST chunk; nothing is passed on once one is known.
                self._bdat_check(chunk)
                if not self._nul and b"\0" in chunk:
                    self._nul = True
                self._size += n
                if self.cfg.size_limit and self._size > self.cfg.size_limit:
                    self._over = True
                if not (self._over or self._nul or self._bdat_bare):
                    self._events.append(ev.DataChunk(chunk))
            if self._bdat_left:
                return True
        # chunk complete
        self._state = _COMMAND
        if self._bdat_discard:
            reply = self._bdat_reply or R_NEED_MAIL
            self._reply(reply)
            if self._bdat_last:
                self._reset_txn()
            return True
        if self._bdat_last:
            if self._bdat_cr:
                self._bdat_bare = True
            error = (R_SIZE if self._over else R_BDAT_BARE if self._bdat_bare
                     else R_NUL if self._nul else None)
            self._decide(ev.DataEnd(error, self._size))
        else:
            self._reply(Reply(250, "2.0.0", f"Ok: {self._size} octets received"))
        return True

    def _bdat_check(self, chunk: bytes) -> None:
        if self._bdat_bare or not chunk:
            return
        if self._bdat_cr:
            if chunk[0] != LF:
                self._bdat_bare = True
                return
            chunk = chunk[1:]
        self._bdat_cr = chunk.endswith(b"\r")
        if self._bdat_cr:
            chunk = chunk[:-1]
        pairs = chunk.count(_CRLF)
        if chunk.count(b"\r") != pairs or chunk.count(b"\n") != pairs:
            self._bdat_bare = True


_HANDLERS = {
    b"EHLO": Engine._cmd_ehlo,
    b"HELO": Engine._cmd_helo,
    b"MAIL": Engine._cmd_mail,
    b"RCPT": Engine._cmd_rcpt,
    b"DATA": Engine._cmd_data,
    b"BDAT": Engine._cmd_bdat,
    b"RSET": Engine._cmd_rset,
    b"NOOP": Engine._cmd_noop,
    b"QUIT": Engine._cmd_quit,
    b"VRFY": Engine._cmd_vrfy,
    b"EXPN": Engine._cmd_expn,
    b"HELP": Engine._cmd_help,
    b"STARTTLS": Engine._cmd_starttls,
    b"AUTH": Engine._cmd_auth,
}
