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
* Bytes that follow DATA in the same read arrived before the 354 and break RFC 2920's rule
  that DATA ends a pipelined group: ``554 5.5.0`` and disconnect (as Postfix's
  ``smtpd_forbid_unauth_pipelining``).
* After STARTTLS's 220 every byte already received or received before the handshake is
  discarded, and the session is back to "EHLO required" (CVE-2011-0411 class).

SMTP AUTH (RFC 4954) is protocol too, so the engine runs the whole SASL exchange for PLAIN,
LOGIN and CRAM-MD5: ``334`` challenges, base64 both ways, ``*`` to cancel, a bounded line
length; only the finished credentials leave the engine, as one ``Auth`` decision event. AUTH
is advertised and accepted only when ``auth_mechanisms`` is set (the submission listeners) and,
unless ``auth_requires_tls`` is off, only under TLS. The engine never logs anything, so SASL
lines cannot reach a log from here.

What is policy (which recipients exist, who may relay, when a message is durable) belongs to
the driver, which sees it as decision events.
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
R_BAD_SENDER = Reply(501, "5.1.7", "Bad sender address syntax")
R_BAD_RCPT = Reply(501, "5.1.3", "Bad recipient address syntax")
R_UTF8_REQUIRED = Reply(553, "5.6.7", "Error: SMTPUTF8 required for non-ASCII address")
R_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
R_VRFY = Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")
R_EXPN = Reply(502, "5.5.1", "Error: command not implemented")
R_TLS_GO = Reply(220, "2.0.0", "Ready to start TLS")
R_TLS_NA = Reply(502, "5.5.1", "Error: STARTTLS not available")
R_TLS_AGAIN = Reply(554, "5.5.1", "Error: TLS already active")
R_AUTH_NA = Reply(502, "5.5.1", "Error: authentication not enabled")
R_AUTH_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
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

# LOGIN's prompts, already base64 ("Username:", "Password:"), as every server sends them.
_LOGIN_USER = "VXNlcm5hbWU6"
_LOGIN_PASS = "UGFzc3dvcmQ6"


def _cram_challenge(hostname: str) -> str:
    """A fresh RFC 2195 challenge: ``<random.timestamp@hostname>``."""
    return f"<{int.from_bytes(os.urandom(8), 'big')}.{int(time.time())}@{hostname}>"


class Engine:
    """One SMTP server session's protocol state. Not thread-safe; one per connection."""

    __slots__ = (
        "cfg", "_buf", "_out", "_events", "_state", "_waiting", "_helo", "_extended",
        "_tls", "_has_mail", "_mail_utf8", "_rcpts", "_errors", "_tail", "_first_chunk",
        "_size", "_over", "_bdat_left", "_bdat_last", "_bdat_discard", "_bdat_reply",
        "_bdat_open", "_bdat_cr", "_bdat_bare", "closed", "auth_user", "_sasl",
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
        self._reset_txn()

    # ------------------------------------------------------------------ driver interface

    def greeting(self) -> None:
        self._out.append(f"220 {self.cfg.hostname} {self.cfg.banner}\r\n".encode())

    def feed(self, data: bytes) -> None:
        if self._state in (_TLS_PENDING, _CLOSED):
            return  # plaintext behind STARTTLS, or anything after we decided to close
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def helo(self) -> str:
        return self._helo

    def take_output(self) -> bytes:
        if not self._out:
            return b""
        out = b"".join(self._out)
        self._out.clear()
        return out

    def tls_established(self) -> None:
        """The transport is now TLS: forget everything said before (RFC 3207 §4.2)."""
        self._buf.clear()
        self._tls = True
        self._helo = ""
        self._extended = False
        self._reset_txn()
        self._state = _COMMAND

    def close(self, reply: Reply | None, reason: str) -> None:
        """Driver-initiated close (idle timeout, shutdown): send ``reply`` and stop."""
        if reply is not None:
            self._out.append(reply.render())
        self._enter_closed(reason)

    def respond(self, reply: Reply) -> None:
        """Answer the pending decision event."""
        pending = self._waiting
        if pending is None:
            raise RuntimeError("no decision is pending")
        self._waiting = None
        self._state = _COMMAND
        ok = reply.code < 400
        if isinstance(pending, ev.MailFrom):
            if ok:
                self._has_mail = True
                # A refused BDAT of an earlier transaction must not poison this one.
                self._bdat_discard = False
                self._bdat_reply = None
                self._mail_utf8 = pending.params.smtputf8
            self._reply(reply)
        elif isinstance(pending, ev.RcptTo):
            if ok:
                self._rcpts += 1
            self._reply(reply)
        elif isinstance(pending, ev.DataStart):
            if pending.bdat:
                self._state = _BDAT
                if ok:
                    self._bdat_open = True
                else:
                    self._bdat_discard = True
                    self._bdat_reply = reply
                    self._reset_txn_keep_bdat()
                    self._events.append(ev.Reset())
            elif ok:
                self._state = _DATA
                self._tail = _CRLF
                self._first_chunk = True
                self._size = 0
                self._over = False
                self._reply(reply)
                if self._buf:  # message text arrived before the 354
                    self._reply(R_PIPELINING)
                    self._events.append(ev.Reset())
                    self._enter_closed("pipelining violation")
            else:
                self._reply(reply)
                self._reset_txn()
                self._events.append(ev.Reset())
        elif isinstance(pending, ev.DataEnd):
            self._reply(reply)
            self._reset_txn()
        elif isinstance(pending, ev.Auth):
            if ok and self.auth_user is None:
                self.auth_user = pending.username
            self._reply(reply)
        if self._state == _COMMAND and self._errors >= self.cfg.max_errors:
            self._too_many_errors()

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
        self._tail = _CRLF
        self._first_chunk = True

    def _reset_txn_keep_bdat(self) -> None:
        left, last, reply = self._bdat_left, self._bdat_last, self._bdat_reply
        self._reset_txn()
        self._bdat_left, self._bdat_last, self._bdat_reply = left, last, reply
        self._bdat_discard = True

    def _reply(self, reply: Reply) -> None:
        self._out.append(reply.render())
        if reply.code >= 400:
            self._errors += 1

    def _too_many_errors(self) -> None:
        self._out.append(Reply(421, "4.7.0", f"{self.cfg.hostname} Error: too many errors; "
                                             "closing connection").render())
        self._enter_closed("too many errors")

    def _enter_closed(self, reason: str) -> None:
        self._state = _CLOSED
        self._buf.clear()
        self.closed = True
        self._events.append(ev.Close(reason))

    def _decide(self, event: ev.Event) -> None:
        self._waiting = event
        self._state = _WAIT
        self._events.append(event)

    # ------------------------------------------------------------------ command mode

    def _command_step(self) -> bool:
        buf = self._buf
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > self.cfg.max_line_length:
                self._reply(R_LINE_TOO_LONG)
                buf.clear()
                self._state = _SKIP_LINE
                self._check_errors()
                return True
            return False
        if nl == 0 or buf[nl - 1] != CR or buf.find(b"\r", 0, nl - 1) >= 0:
            self._reply(R_BARE_LF)
            self._enter_closed("bare CR or LF in command")
            return True
        if nl + 1 > self.cfg.max_line_length:
            del buf[: nl + 1]
            self._reply(R_LINE_TOO_LONG)
            self._check_errors()
            return True
        line = bytes(buf[: nl - 1])
        del buf[: nl + 1]
        self._dispatch(line)
        if self._state == _COMMAND:
            self._check_errors()
        return True

    def _skip_step(self) -> bool:
        nl = self._buf.find(b"\n")
        if nl < 0:
            self._buf.clear()
            return False
        del self._buf[: nl + 1]
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
            arg = line[sp + 1:].decode("utf-8", "surrogateescape")
        handler = _HANDLERS.get(verb)
        if handler is None:
            self._reply(R_UNKNOWN)
            return
        handler(self, arg)

    def _cmd_ehlo(self, arg: str) -> None:
        self._helo_common(arg, True)

    def _cmd_helo(self, arg: str) -> None:
        self._helo_common(arg, False)

    def _helo_common(self, arg: str, extended: bool) -> None:
        name = arg.strip()
        if not name or " " in name or not name.isprintable():
            self._reply(Reply(501, "5.5.4", "Syntax: EHLO hostname" if extended
                              else "Syntax: HELO hostname"))
            return
        self._helo = name
        self._extended = extended
        self._reset_txn()
        self._events.append(ev.Helo(name, extended))
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
            self._reply(R_TOO_MANY_RCPTS)
            return
        path, ptext = parts
        try:
            params = parse_rcpt_params(ptext)
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
        words = arg.split()
        if not words or len(words) > 2 or not words[0].isdigit() or len(words[0]) > 18 or (
                len(words) == 2 and words[1].upper() != "LAST"):
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
            mech, _, initial = arg.strip().partition(" ")
            mech = mech.upper()
            initial = initial.strip()
            if not mech:
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
        self._out.append(f"334 {challenge}\r\n".encode())

    def _sasl_end(self, reply: Reply | None = None) -> None:
        self._sasl = None
        self._state = _COMMAND
        if reply is not None:
            self._reply(reply)

    def _sasl_step(self) -> bool:
        buf = self._buf
        nl = buf.find(b"\n")
        limit = self.cfg.sasl_line_limit
        if nl < 0:
            if len(buf) > limit:
                buf.clear()
                self._sasl_end(R_AUTH_LINE)
                self._state = _SKIP_LINE
                self._check_errors()
                return True
            return False
        if nl == 0 or buf[nl - 1] != CR or buf.find(b"\r", 0, nl - 1) >= 0:
            self._sasl = None
            self._reply(R_BARE_LF)
            self._enter_closed("bare CR or LF in SASL response")
            return True
        line = bytes(buf[: nl - 1])
        del buf[: nl + 1]
        if nl + 1 > limit:
            self._sasl_end(R_AUTH_LINE)
        else:
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
        if not self._buf:
            return False
        work = self._tail + self._buf
        self._buf = bytearray()
        end = work.find(b"\r\n.\r\n")
        if end >= 0:
            body = bytes(work[: end + 2])
            rest = work[end + 5:]
            self._tail = b""
        else:
            cut = len(work) - 4
            # never split a line ending from the dot that may follow it
            while cut > 0 and work[cut - 1] in (CR, LF):
                cut -= 1
            if cut <= 0:
                self._tail = bytes(work)
                return False
            body = bytes(work[:cut])
            self._tail = bytes(work[cut:])
            rest = None
        pairs = body.count(_CRLF)
        if body.count(b"\r") != pairs or body.count(b"\n") != pairs:
            self._reply(R_BARE_LF)
            self._enter_closed("bare CR or LF in message data")
            return True
        body = body.replace(b"\r\n.", _CRLF)
        if self._first_chunk:
            body = body[2:]
            self._first_chunk = False
        if body and not self._over:
            self._size += len(body)
            if self.cfg.size_limit and self._size > self.cfg.size_limit:
                self._over = True
            else:
                self._events.append(ev.DataChunk(body))
        if rest is not None:
            self._buf = bytearray(rest)
            self._decide(ev.DataEnd(R_SIZE if self._over else None, self._size))
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
                self._bdat_check(chunk)
                if not self._over:
                    self._size += n
                    if self.cfg.size_limit and self._size > self.cfg.size_limit:
                        self._over = True
                    elif chunk:
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
            error = R_SIZE if self._over else (R_BDAT_BARE if self._bdat_bare else None)
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
