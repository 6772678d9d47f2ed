"""Logging set-up: Postfix's log lines on stderr, optional syslog and JSON lines.

Operators read mail logs with tools written for Postfix (pflogsumm, fail2ban's ``postfix``
filters, logwatch) and grep them by queue id, so a line is a Postfix line::

    2026-12-06T16:03:07.123456+00:00 mx1 postfix/smtpd[812]: 4F3A2B: client=unknown[192.0.2.7]
    2026-12-06T16:03:07.201734+00:00 mx1 postfix/local[812]: 4F3A2B: to=<bob@example.com>, ...

The time is RFC 3339 with microseconds and the UTC offset (rsyslog's high-precision format,
which pflogsumm 1.1.5 and fail2ban read; an ISO time without the offset is skipped by
pflogsumm). The tag is ``SYSLOG_NAME/SERVICE[PID]``: ``PYMTA_SYSLOG_NAME`` (Postfix's
``syslog_name``, default ``postfix``) and the Postfix daemon that would have written the line
(:data:`SERVICES`: ``smtpd`` for the receiving side, ``cleanup`` for the pre-queue checks and
the message-id, ``qmgr`` for the queue's ``from=``/``removed`` lines, ``local``/``lmtp``/
``smtp`` for deliveries, ``bounce`` for notices, ``master`` for start and stop); a record
names its own with ``extra={"service": ...}``. ``warning:``/``error:``/``fatal:`` precede the
text as in Postfix. The container convention is stderr (the docker daemon collects it);
``PYMTA_LOG_SYSLOG=yes`` adds ``/dev/log`` with facility mail and the same tag;
``PYMTA_LOG_FORMAT=json`` (or the older ``PYMTA_LOG_JSON=yes``) turns stderr into one JSON
object per line, with the record's fields (``qid``, ``client``, ``to``, ``status`` ...) as keys.

``SYSLOG_LEVEL`` (0 emerg .. 7 debug, default 5 notice) picks the threshold. Python has no
notice level, so :data:`NOTICE` (25) sits between INFO and WARNING: log one line per message
event that log summaries count (received, sent, deferred, bounced, rejected) at NOTICE so the
default level shows it; connection lines (``connect from``, ``disconnect from``) are INFO, as
with Postfix's ``mail.info``, shown at ``SYSLOG_LEVEL=6``.

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

__all__ = ["NOTICE", "SERVICES", "RedactFilter", "escape", "notice", "python_level", "redact",
           "service_of", "setup_logging"]

SYSLOG_NAME = "postfix"     # PYMTA_SYSLOG_NAME's default, Postfix's syslog_name
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


# ------------------------------------------------------------------------------ the tag

#: Logger name (or its nearest parent) → the Postfix daemon whose lines it writes, the part
#: after ``SYSLOG_NAME/`` in the tag. pflogsumm counts ``client=`` and ``reject:`` lines only
#: from ``smtpd``, and takes ``from=<>, size=`` from any other daemon.
SERVICES = {
    "pymta": "master",                  # start, stop, workers
    "pymta.smtpd": "smtpd",
    "pymta.sasl": "smtpd",              # the authenticators, asked by smtpd
    "pymta.cleanup": "cleanup",         # message-id, the pre-queue checks
    "pymta.pipeline": "cleanup",
    "pymta.content": "cleanup",
    "pymta.dkim": "cleanup",
    "pymta.srs": "cleanup",
    "pymta.queue": "qmgr",
    "pymta.delivery": "qmgr",           # deliverylog: each record names its agent
    "pymta.delivery.local": "local",
    "pymta.delivery.maildir": "local",
    "pymta.delivery.mbox": "local",
    "pymta.delivery.lmtp": "lmtp",
    "pymta.delivery.relay": "smtp",
    "pymta.bounce": "bounce",
}
_OTHER = "pymta"                        # loggers of libraries and pymta's other modules
_service_cache: dict[str, str] = {}


def service_of(logger_name: str) -> str:
    """The daemon name for records of ``logger_name``: its own entry in :data:`SERVICES`,
    else its nearest parent's, else ``pymta``. Cached: one dict look-up per record."""
    service = _service_cache.get(logger_name)
    if service is None:
        name = logger_name
        while name not in SERVICES and "." in name:
            name = name.rpartition(".")[0]
        service = _service_cache[logger_name] = SERVICES.get(name, _OTHER)
    return service


class _Clock:
    """RFC 3339 time stamps, ``2026-12-06T16:03:07.123456+01:00``: the date, time and offset
    are formatted once per second, only the microseconds per record."""

    __slots__ = ("_second", "_head", "_offset")

    def __init__(self) -> None:
        self._second = -1
        self._head = ""
        self._offset = ""

    def stamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            local = time.localtime(second)
            offset = time.strftime("%z", local) or "+0000"
            self._head = time.strftime("%Y-%m-%dT%H:%M:%S", local)
            self._offset = f"{offset[:3]}:{offset[3:]}"
            self._second = second
        return f"{self._head}.{int((created - second) * 1e6):06d}{self._offset}"


# ------------------------------------------------------------------------------ formatters

_PREFIX = {logging.CRITICAL: "fatal: ", logging.ERROR: "error: ", logging.WARNING: "warning: "}


def _prefix(levelno: int) -> str:
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING):
        if levelno >= level:
            return _PREFIX[level]
    return ""


class PostfixFormatter(logging.Formatter):
    """``TIME HOST NAME/SERVICE[PID]: [warning: ]message`` — without time and host for
    syslog, which adds its own."""

    def __init__(self, host: str, with_time_and_host: bool = True,
                 syslog_name: str = SYSLOG_NAME) -> None:
        super().__init__()
        self.host = host
        self.with_time_and_host = with_time_and_host
        self.syslog_name = syslog_name
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        service = getattr(record, "service", None) or service_of(record.name)
        text = (f"{self.syslog_name}/{service}[{record.process}]: {_prefix(record.levelno)}"
                f"{escape(record.getMessage())}")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            trace = "".join(f"\n\t{escape(line)}" for line in record.exc_text.split("\n"))
            text = f"{text}{trace}"
        if not self.with_time_and_host:
            return text
        return f"{self._clock.stamp(record.created)} {self.host} {text}"


_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName"}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", NOTICE: "notice",
                logging.WARNING: "warning", logging.ERROR: "error", logging.CRITICAL: "crit"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields passed with ``extra={...}`` become keys, so a caller
    can attach ``qid`` or ``client`` for a log shipper to index; a dict passed that way
    (deliverylog's ``mta_event``) gives its own keys. ``program`` is the Postfix tag
    without the pid (``postfix/smtpd``), ``message`` the text of the Postfix line."""

    def __init__(self, host: str, syslog_name: str = SYSLOG_NAME) -> None:
        super().__init__()
        self.host = host
        self.syslog_name = syslog_name
        self._clock = _Clock()

    def format(self, record: logging.LogRecord) -> str:
        service = getattr(record, "service", None) or service_of(record.name)
        entry: dict[str, Any] = {
            "time": self._clock.stamp(record.created),
            "host": self.host,
            "program": f"{self.syslog_name}/{service}",
            "pid": record.process,
            "level": _LEVEL_NAMES.get(record.levelno, record.levelname.lower()),
            "logger": record.name,
            "message": escape(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key in _STANDARD_ATTRS or key == "service":
                continue
            if isinstance(value, dict):
                for inner, item in value.items():
                    entry.setdefault(str(inner), _json_value(item))
            elif key not in entry:
                entry[key] = _json_value(value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = json.dumps(entry, ensure_ascii=False)
        return line if line.isascii() else _JSON_RAW.sub(_json_escaped, line)


def _json_value(value: Any) -> Any:
    return value if isinstance(value, str | int | float | bool | None) else str(value)


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
    name = config.syslog_name
    json_lines = config.log_format == "json" or (not config.log_format and config.log_json)
    err.setFormatter(JsonFormatter(host, name) if json_lines
                     else PostfixFormatter(host, syslog_name=name))
    handlers.append(err)
    if config.log_syslog:
        try:
            syslog = _MailSysLogHandler(address="/dev/log",
                                        facility=logging.handlers.SysLogHandler.LOG_MAIL)
        except OSError as exc:
            raise ConfigError(
                f"PYMTA_LOG_SYSLOG: cannot open /dev/log: {exc.strerror or exc}: 'yes'") from None
        syslog.setFormatter(PostfixFormatter(host, with_time_and_host=False, syslog_name=name))
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
