"""Logging set-up: Postfix-style lines on stderr, optional syslog and JSON lines.

Operators grep mail logs by queue id and pipe them to tools written for Postfix, so a line
looks like Postfix's: ``2026-11-25T17:00:00 mx1 pymta[812]: 4F3A2B: to=<bob@example.com>,
status=sent (...)``, with ``warning:``/``error:``/``fatal:`` before the text as Postfix writes.
The container convention is stderr (the docker daemon collects it); ``PYMTA_LOG_SYSLOG=yes``
adds ``/dev/log`` with facility mail, ``PYMTA_LOG_JSON=yes`` turns stderr into JSON lines for
log shippers.

``SYSLOG_LEVEL`` (0 emerg .. 7 debug, default 5 notice) picks the threshold. Python has no
notice level, so :data:`NOTICE` (25) sits between INFO and WARNING: log one line per message
event (received, sent, deferred, bounced) at NOTICE so the default level shows it.

:class:`RedactFilter` is installed on every handler as a last line of defence: whatever a
module logs by mistake, an ``AUTH PLAIN <base64>`` initial response never reaches a log.

One record is one line, whatever it quotes. Both formatters write the message through
:func:`escape`: CR, LF, every other C0 and C1 control, DEL and U+2028/U+2029 become
``\\r``, ``\\n``, ``\\t``, ``\\xNN`` or ``\\uNNNN``, so a value from a client or a message (a
DKIM ``d=`` with a folded CRLF, an address, a library's error text) can never start a line
of its own that a log reader would take for pymta's (issue 10 review). A line of printable
ASCII, nearly every line, is checked by two C-level scans and written as it is. A traceback
(``log.exception``) keeps its lines, each escaped the same way and indented by a tab, so it
never begins a line of the log either; in JSON every value is one JSON string, and the
line separators JSON leaves raw (U+2028, U+2029, C1) are written as ``\\uNNNN``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
import socket
import sys
import time
from typing import Any

from pymta.config.errors import ConfigError
from pymta.config.model import Config

__all__ = ["NOTICE", "RedactFilter", "escape", "notice", "python_level", "redact",
           "setup_logging"]

PROGRAM = "pymta"
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

# SYSLOG_LEVEL → the lowest Python level shown. emerg/alert/crit all map to CRITICAL.
_THRESHOLDS = (logging.CRITICAL, logging.CRITICAL, logging.CRITICAL, logging.ERROR,
               logging.WARNING, NOTICE, logging.INFO, logging.DEBUG)


def python_level(syslog_level: int) -> int:
    """The Python logging threshold for a SYSLOG_LEVEL value 0..7."""
    return _THRESHOLDS[max(0, min(7, syslog_level))]


def notice(logger: logging.Logger, msg: str, *args: Any, **kwargs: Any) -> None:
    """Log at NOTICE, the level of per-message events (shown at the default SYSLOG_LEVEL=5)."""
    logger.log(NOTICE, msg, *args, **kwargs)


# ------------------------------------------------------------------------------ redaction

# "AUTH PLAIN dXNlcgB1c2VyAHBhc3M=" or "AUTH LOGIN dXNlcg==": keep the mechanism, drop the
# initial response. Also catches the words inside longer text such as a repr of a command.
_AUTH_RE = re.compile(r"(\bAUTH\s+[A-Za-z0-9_-]+\s+)(\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Replace SASL initial responses in ``text`` with ``***``."""
    return _AUTH_RE.sub(r"\1***", text)


class RedactFilter(logging.Filter):
    """Rewrites a record's message so no SASL credentials reach any handler.

    It formats the message once (``msg % args``) and stores the redacted result, because the
    secret may be in the arguments rather than the format string.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string or an argument's __str__:
            # a filter must not raise into the code that logs; the handler reports it as usual
            return True
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


# ------------------------------------------------------------------------------ escaping

# what could end or split a line for some reader: C0, DEL, C1, LINE/PARAGRAPH SEPARATOR
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NAMED = {"\r": "\\r", "\n": "\\n", "\t": "\\t"}


def _escaped(m: re.Match[str]) -> str:
    c = m.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with control characters and line separators written as escapes (see the
    module docstring); printable ASCII is returned as it is."""
    if text.isascii() and text.isprintable():
        return text
    return _CONTROL.sub(_escaped, text)


# JSON strings may hold these raw (json.dumps escapes only C0), line readers may not
_JSON_RAW = re.compile("[\x7f-\x9f\u2028\u2029]")


def _json_escaped(m: re.Match[str]) -> str:
    return f"\\u{ord(m.group()):04x}"


# ------------------------------------------------------------------------------ formatters

_PREFIX = {logging.CRITICAL: "fatal: ", logging.ERROR: "error: ", logging.WARNING: "warning: "}


def _prefix(levelno: int) -> str:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING):
        if levelno >= level:
            return _PREFIX[level]
    return ""


class PostfixFormatter(logging.Formatter):
    """``TIME HOST pymta[PID]: [warning: ]message`` — without time and host for syslog,
    which adds its own."""

    def __init__(self, host: str, with_time_and_host: bool = True) -> None:
        super().__init__()
        self.host = host
        self.with_time_and_host = with_time_and_host

    def format(self, record: logging.LogRecord) -> str:
        text = (f"{PROGRAM}[{record.process}]: {_prefix(record.levelno)}"
                f"{escape(record.getMessage())}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            trace = "".join(f"\n\t{escape(line)}" for line in record.exc_text.split("\n"))
            text = f"{text}{trace}"
        if not self.with_time_and_host:
            return text
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
        return f"{stamp} {self.host} {text}"


_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", NOTICE: "notice",
                logging.WARNING: "warning", logging.ERROR: "error", logging.CRITICAL: "crit"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed with ``extra={...}`` become keys, so a caller
    can attach ``qid`` or ``client`` for a log shipper to index."""

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}" + time.strftime("%z", time.localtime(record.created)),
            "host": self.host,
            "program": PROGRAM,
            "pid": record.process,
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry:
                entry[key] = value if isinstance(value, str | int | float | bool | None) \
                    else str(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False)
        return line if line.isascii() else _JSON_RAW.sub(_json_escaped, line)


class _MailSysLogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler that knows NOTICE (the stdlib would send it as warning)."""

    def mapPriority(self, levelName: str) -> str:  # the stdlib's name
        return {"NOTICE": "notice", "CRITICAL": "crit"}.get(levelName,
                                                              super().mapPriority(levelName))


# ------------------------------------------------------------------------------ set-up

_MARK = "_pymta_handler"


def setup_logging(config: Config, stream: Any = None) -> None:
    """Install pymta's handlers on the root logger (so library warnings, e.g. from asyncio,
    are formatted the same way) and set the level from ``SYSLOG_LEVEL``.

    Calling it again replaces only the handlers it installed before, so it is safe to call
    from both the CLI and the server, and it leaves test harness handlers alone.
    Raises ConfigError when syslog is requested but ``/dev/log`` cannot be opened.
    """
    host = config.hostname.partition(".")[0] or socket.gethostname()
    handlers: list[logging.Handler] = []
    err = logging.StreamHandler(stream if stream is not None else sys.stderr)
    err.setFormatter(JsonFormatter(host) if config.log_json else PostfixFormatter(host))
    handlers.append(err)
    if config.log_syslog:
        try:
            syslog = _MailSysLogHandler(address="/dev/log",
                                        facility=logging.handlers.SysLogHandler.LOG_MAIL)
        except OSError as exc:
            raise ConfigError(
                f"PYMTA_LOG_SYSLOG: cannot open /dev/log: {exc.strerror or exc}: 'yes'") from None
        syslog.setFormatter(PostfixFormatter(host, with_time_and_host=False))
        handlers.append(syslog)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _MARK, False)]:
        root.removeHandler(old)
        old.close()
    for handler in handlers:
        setattr(handler, _MARK, True)
        handler.addFilter(RedactFilter())
        root.addHandler(handler)
    root.setLevel(python_level(config.syslog_level))
