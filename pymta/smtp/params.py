"""Parsing of MAIL FROM / RCPT TO arguments: the path and the ESMTP parameters.

Kept apart from the state machine because it is pure string work that is easy to test on its
own and is where most malformed input ends up. Parsing is strict about what matters for
safety (control characters, lengths, parameter values) and lenient where real clients differ
(a space after the colon, a missing pair of angle brackets, source routes).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pymta.types import Reply

MAX_PATH = 256          # RFC 5321 §4.5.3.1.3 (reverse-path and forward-path, with brackets)
MAX_LOCAL = 64          # §4.5.3.1.1
MAX_DOMAIN = 255        # §4.5.3.1.2

_DOMAIN_RE = re.compile(
    r"(?:[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
    r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?"
)
_LITERAL_RE = re.compile(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9]{1,3}(?:\.[0-9]{1,3}){3})\]")
_XTEXT_RE = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})*")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>()\[\]\\,;:\"]")


class ParamError(Exception):
    """The argument is malformed; carries the reply to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None
    auth: str | None = None


@dataclass(frozen=True, slots=True)
class RcptParams:
    notify: str | None = None
    orcpt: str | None = None


def _domain_ok(domain: str, utf8: bool) -> bool:
    if not domain or len(domain) > MAX_DOMAIN:
        return False
    if domain.startswith("["):
        return _LITERAL_RE.fullmatch(domain) is not None
    if utf8 and not domain.isascii():
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return False
    return _DOMAIN_RE.fullmatch(domain) is not None


def _local_ok(local: str) -> bool:
    if not local or len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        return False
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        inner = local[1:-1]
        return not any(ord(c) < 32 or ord(c) == 127 for c in inner)
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    return _FORBIDDEN.search(local) is None


def split_path(arg: str, keyword: str) -> tuple[str, str] | None:
    """Split ``FROM:<path> params`` into (path, params); None when the keyword is missing."""
    head = arg[: len(keyword)]
    if head.upper() != keyword:
        return None
    rest = arg[len(keyword):].lstrip(" ")
    if rest.startswith("<"):
        end = rest.find(">")
        if end < 0:
            return ("\x00", "")  # unterminated: reported as bad syntax by the caller
        return rest[: end + 1], rest[end + 1:].strip(" ")
    path, _, params = rest.partition(" ")
    return path, params.strip(" ")


def parse_address(path: str, *, utf8: bool, allow_null: bool,
                  allow_bare_postmaster: bool = False) -> str | None:
    """Return the mailbox of a path (``""`` for the null path), or None when it is malformed."""
    if len(path) > MAX_PATH:
        return None
    if path.startswith("<") and path.endswith(">"):
        path = path[1:-1]
    if path == "":
        return "" if allow_null else None
    if path.startswith("@"):          # obsolete source route: <@a,@b:user@c>
        _, colon, path = path.partition(":")
        if not colon:
            return None
    if not utf8 and not path.isascii():
        return None
    if allow_bare_postmaster and path.lower() == "postmaster":
        return path
    local, at, domain = path.rpartition("@")
    if not at or not _local_ok(local) or not _domain_ok(domain, utf8):
        return None
    return path


def _xtext_ok(value: str) -> bool:
    return len(value) <= 500 and _XTEXT_RE.fullmatch(value) is not None


def _params(text: str) -> list[tuple[str, str | None]]:
    out: list[tuple[str, str | None]] = []
    for word in text.split():
        key, eq, value = word.partition("=")
        out.append((key.upper(), value if eq else None))
    return out


_BAD_PARAM = Reply(555, "5.5.4", "Unsupported option")


def parse_mail_params(text: str, *, size_limit: int) -> MailParams:
    size: int | None = None
    body = "7BIT"
    smtputf8 = False
    ret = envid = auth = None
    seen: set[str] = set()
    for key, value in _params(text):
        if key in seen:
            raise ParamError(Reply(501, "5.5.4", f"Duplicate {key} parameter"))
        seen.add(key)
        if key == "SIZE":
            if value is None or not value.isdigit() or len(value) > 20:
                raise ParamError(Reply(501, "5.5.4", "Bad SIZE parameter"))
            size = int(value)
            if size_limit and size > size_limit:
                raise ParamError(Reply(552, "5.3.4", "Message size exceeds fixed limit"))
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise ParamError(Reply(501, "5.5.4", "Unsupported BODY parameter"))
            body = value.upper()
        elif key == "SMTPUTF8":
            if value is not None:
                raise ParamError(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
            smtputf8 = True
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise ParamError(Reply(501, "5.5.4", "Bad RET parameter"))
            ret = value.upper()
        elif key == "ENVID":
            if value is None or not _xtext_ok(value):
                raise ParamError(Reply(501, "5.5.4", "Bad ENVID parameter"))
            envid = value
        elif key == "AUTH":
            auth = value
        else:
            raise ParamError(_BAD_PARAM)
    return MailParams(size, body, smtputf8, ret, envid, auth)


_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})


def parse_rcpt_params(text: str) -> RcptParams:
    notify = orcpt = None
    seen: set[str] = set()
    for key, value in _params(text):
        if key in seen:
            raise ParamError(Reply(501, "5.5.4", f"Duplicate {key} parameter"))
        seen.add(key)
        if key == "NOTIFY":
            words = (value or "").upper().split(",")
            if words == ["NEVER"] or (words and all(w in _NOTIFY_WORDS for w in words)
                                      and len(set(words)) == len(words)):
                notify = ",".join(words)
            else:
                raise ParamError(Reply(501, "5.5.4", "Bad NOTIFY parameter"))
        elif key == "ORCPT":
            addr_type, semi, addr = (value or "").partition(";")
            if not semi or not addr_type or not addr or not _xtext_ok(addr):
                raise ParamError(Reply(501, "5.5.4", "Bad ORCPT parameter"))
            orcpt = f"{addr_type};{addr}"
        else:
            raise ParamError(_BAD_PARAM)
    return RcptParams(notify, orcpt)


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext (``+2B`` escapes)."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)
