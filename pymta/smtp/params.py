"""Parsing of MAIL FROM / RCPT TO arguments: the path and the ESMTP parameters.

Kept apart from the state machine because it is pure string work that is easy to test on its
own and is where most malformed input ends up. Parsing is strict about what matters for
safety (control characters, lengths, parameter values) and lenient where real clients differ
(a space after the colon, a missing pair of angle brackets, source routes).

What the SMTP boundary lets through is safe to put in a log line, an envelope or a header
field (after the quoting that field needs), because this module refuses:

* In addresses (RFC 5321, RFC 6531): any character that is not "printable" in Unicode's
  sense, i.e. every character of the categories Cc (C0, DEL, C1 such as U+0085), Cf
  (format: bidi overrides and isolates, zero-width joiners, soft hyphen), Cs (surrogates,
  which is what undecodable bytes would become), Co (private use), Cn (unassigned and
  noncharacters), Zl/Zp (U+2028, U+2029) and Zs other than the ASCII space inside a quoted
  local part. These characters end lines in logs and headers, or make two different
  addresses look alike. Refusing U+200C/U+200D also refuses the rare Persian or Indic
  address that needs them: an MTA cannot tell a legitimate joiner from a spoofing one.
* In non-ASCII domains: anything that is not a plausible IDNA2008 U-label (RFC 5890/5891):
  see :func:`_ulabel_ok`. The standard library only has IDNA2003, which maps characters
  away (``straße`` becomes ``strasse``, a soft hyphen disappears), so the check is made here
  without that codec.
* In ESMTP parameters: keywords that are not ``ALPHA/DIGIT *(ALPHA/DIGIT/"-")``, values that
  are empty or contain SP, ``=`` or controls (RFC 5321 §4.1.2 ``esmtp-value``), and any
  non-ASCII character except in ``ORCPT=utf-8;`` of an SMTPUTF8 transaction (RFC 6533).
  xtext values (ENVID, ORCPT, AUTH=) must be valid RFC 3461 xtext that decodes to printable
  ASCII; ``ORCPT=utf-8;`` values must be RFC 6533 ``utf-8-addr-xtext`` (or
  ``utf-8-addr-unitext`` under SMTPUTF8, stored in its 7-bit form) and decode to printable
  Unicode.

Undecodable bytes never reach this module from the engine (it refuses command lines that
are not UTF-8), but the functions are safe on any ``str``.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from pymta.types import Reply

MAX_PATH = 256          # RFC 5321 §4.5.3.1.3 (reverse-path and forward-path, with brackets)
MAX_LOCAL = 64          # §4.5.3.1.1
MAX_DOMAIN = 255        # §4.5.3.1.2
MAX_LABEL = 63
MAX_XTEXT = 500         # RFC 3461 §4.2: an ORCPT value may be up to 500 characters

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")
_LABEL_RE = re.compile(_LABEL)
_LITERAL_RE = re.compile(r"\[(?:IPv6:[0-9A-Fa-f:.]+|[0-9]{1,3}(?:\.[0-9]{1,3}){3})\]")
_XTEXT_RE = re.compile(r"(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f<>()\[\]\\,;:\"@]")
# RFC 5321 Quoted-string (RFC 6531 adds UTF-8 to qtextSMTP): no bare '"' or '\' inside
_QUOTED_LOCAL_RE = re.compile(r'"(?:[^"\\\x00-\x1f\x7f]|\\[\x20-\x7e])*"')
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_VALUE_RE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")           # RFC 5321 esmtp-value, ASCII
_ATOM_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")   # RFC 5322 atext (addr-type)
_DIGITS_RE = re.compile(r"[0-9]{1,20}")
# RFC 6533 §3: QCHAR is printable ASCII except "+", "=" and "\"; HEXPOINT names "\" or a
# code point outside ASCII (2-digit forms only for the xtext specials and 80-FF, no
# surrogates, no leading zeros).
_HEXPOINT = (r"(?:[01][1-9]|10|20|2B|3D|7F|5C|[89A-F][0-9A-F]|[1-9A-F][0-9A-F]{2}"
             r"|[1-9A-CE-F][0-9A-F]{3}|D[0-7][0-9A-F]{2}|[1-9A-F][0-9A-F]{4}|10[0-9A-F]{4})")
_UTF8_XTEXT_RE = re.compile(rf"(?:[!-*,-<>-\[\]-~]|\\x\{{{_HEXPOINT}\}})+", re.IGNORECASE)
_UTF8_UNITEXT_RE = re.compile(rf"(?:[!-*,-<>-\[\]-~]|[^\x00-\x7f]|\\x\{{{_HEXPOINT}\}})+",
                              re.IGNORECASE)
_EMBEDDED_RE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")
_HEXCHAR_RE = re.compile(r"\+([0-9A-F]{2})")

# Unicode categories a U-label may use (IDNA2008's PVALID letters, marks and digits, after
# lower-casing); everything else (symbols, punctuation, spaces, controls, format characters,
# unassigned code points) is DISALLOWED or CONTEXT-dependent there.
_ULABEL_CATEGORIES = frozenset({"Ll", "Lo", "Lm", "Mn", "Mc", "Nd"})


class ParamError(Exception):
    """The argument is malformed; carries the reply to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


R_PARAM_SYNTAX = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
_BAD_PARAM = Reply(555, "5.5.4", "Unsupported option")


@dataclass(frozen=True, slots=True)
class MailParams:
    size: int | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    ret: str | None = None
    envid: str | None = None        # xtext as received (decodes to printable ASCII)
    auth: str | None = None         # "<>" or xtext as received (RFC 4954 §5)
    # REQUIRETLS (RFC 8689 §2): parsed here like any parameter; whether the session may use
    # it (only under TLS) is the engine's to decide, as it knows the session.
    requiretls: bool = False


@dataclass(frozen=True, slots=True)
class RcptParams:
    notify: str | None = None
    orcpt: str | None = None        # "addr-type;xtext", always 7-bit (RFC 3461, RFC 6533)


# ---------------------------------------------------------------------------- addresses


def _ulabel_ok(label: str) -> bool:
    """A non-ASCII domain label that IDNA2008 could accept as a U-label.

    Approximates RFC 5891/5892 without its tables: lower-cased (as UTS 46 maps upper case),
    the label must be NFC and unchanged by NFKC (no compatibility characters such as
    full-width letters), consist of letters, marks and digits (ASCII letters, digits and
    ``-`` too), not start with a combining mark, not start or end with ``-`` nor have
    ``--`` in positions 3-4, and its A-label (``xn--`` + Punycode) must fit 63 octets.
    Stricter than IDNA2008 in one respect: CONTEXTJ/CONTEXTO characters (ZWJ, ZWNJ, the
    Catalan middle dot) are refused.
    """
    low = label.lower()
    if not low or low[0] == "-" or low[-1] == "-" or low[2:4] == "--":
        return False
    if not unicodedata.is_normalized("NFC", low) or unicodedata.normalize("NFKC", low) != low:
        return False
    if unicodedata.category(low[0]).startswith("M"):
        return False
    for c in low:
        if c.isascii():
            if not (c.isalnum() or c == "-"):
                return False
        elif unicodedata.category(c) not in _ULABEL_CATEGORIES:
            return False
    try:
        ace = low.encode("punycode")
    except UnicodeError:
        return False
    return len(ace) + 4 <= MAX_LABEL


def _ace_length(domain: str) -> int:
    """Octets of ``domain`` in its ASCII (A-label) form."""
    total = 0
    for label in domain.split("."):
        total += len(label) if label.isascii() else 4 + len(label.lower().encode("punycode"))
    return total + domain.count(".")


def _domain_ok(domain: str, utf8: bool) -> bool:
    if not domain or len(domain) > MAX_DOMAIN:
        return False
    if domain.startswith("["):
        return _LITERAL_RE.fullmatch(domain) is not None
    if domain.isascii():
        return _DOMAIN_RE.fullmatch(domain) is not None
    if not utf8 or not domain.isprintable():
        return False
    labels = domain[:-1].split(".") if domain.endswith(".") else domain.split(".")
    for label in labels:
        if label.isascii():
            if _LABEL_RE.fullmatch(label) is None:
                return False
        elif not _ulabel_ok(label):
            return False
    return _ace_length(domain) <= MAX_DOMAIN


def _local_ok(local: str) -> bool:
    if not local or len(local.encode("utf-8", "surrogateescape")) > MAX_LOCAL:
        return False
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        # qtextSMTP / quoted-pairSMTP: ASCII space is the only separator allowed
        return (_QUOTED_LOCAL_RE.fullmatch(local) is not None
                and local[1:-1].replace(" ", "").isprintable())
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    return _FORBIDDEN.search(local) is None and local.isprintable()


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
    """Return the mailbox of a path (``""`` for the null path), or None when it is malformed.

    ``utf8`` (the transaction has SMTPUTF8) allows UTF-8 local parts and IDNA domains; a
    non-ASCII path without it is None too (the caller answers ``553 5.6.7`` then).
    """
    if len(path) > MAX_PATH or (not path.isascii()
                                and len(path.encode("utf-8", "surrogateescape")) > MAX_PATH):
        return None                   # RFC 6531 §3.3: the limits are in octets
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


# ---------------------------------------------------------------------------- xtext


def xtext_decode(value: str) -> str:
    """Decode RFC 3461 xtext (``+2B`` escapes)."""
    return _HEXCHAR_RE.sub(lambda m: chr(int(m.group(1), 16)), value)


def _printable_ascii(text: str) -> bool:
    """Printable ASCII, space included: what a decoded xtext value may contain."""
    return text.isascii() and text.isprintable()


def _xtext_ok(value: str) -> bool:
    """Valid xtext (RFC 3461 §4) of at most 500 characters that decodes to printable ASCII
    (no ``+0D+0A``, no NUL, no 8-bit octets)."""
    return (len(value) <= MAX_XTEXT and _XTEXT_RE.fullmatch(value) is not None
            and _printable_ascii(xtext_decode(value)))


def _utf8_addr(value: str, utf8: bool) -> str | None:
    """An RFC 6533 ``utf-8-addr-xtext`` (or, under SMTPUTF8, ``utf-8-addr-unitext``) value
    in its 7-bit form, or None when it is malformed or decodes to something unprintable."""
    pattern = _UTF8_UNITEXT_RE if utf8 else _UTF8_XTEXT_RE
    if pattern.fullmatch(value) is None:
        return None
    decoded = _EMBEDDED_RE.sub(lambda m: chr(int(m.group(1), 16)), value)
    if not decoded.replace(" ", "").isprintable():
        return None
    if value.isascii():
        return value
    return "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in value)


# ---------------------------------------------------------------------------- parameters


def _params(text: str, utf8_ok: frozenset[str] = frozenset()) -> list[tuple[str, str | None]]:
    """``keyword[=value]`` words separated by spaces (RFC 5321 §4.1.2), syntax checked.

    Only ASCII SP separates parameters (a tab or U+0085 is part of a value, which is then
    refused), so no other server can split the same text differently. Values are checked
    against ``esmtp-value``; a non-ASCII value is allowed only for keywords in ``utf8_ok``.
    """
    out: list[tuple[str, str | None]] = []
    if not text:
        return out
    for word in text.split(" "):
        if not word:
            continue
        key, eq, value = word.partition("=")
        if _KEYWORD_RE.fullmatch(key) is None:
            raise ParamError(R_PARAM_SYNTAX)
        key = key.upper()
        if not eq:
            out.append((key, None))
            continue
        if value.isascii():
            if _VALUE_RE.fullmatch(value) is None:
                raise ParamError(R_PARAM_SYNTAX)
        elif key not in utf8_ok or "=" in value or not value.isprintable():
            raise ParamError(R_PARAM_SYNTAX)
        out.append((key, value))
    return out


def _size_param(value: str | None, size_limit: int) -> int:
    """SIZE's declared message size (RFC 1870), refused at once when over ``size_limit``
    (0: no limit) so the client sends no body."""
    if value is None or _DIGITS_RE.fullmatch(value) is None:
        raise ParamError(Reply(501, "5.5.4", "Bad SIZE parameter"))
    size = int(value)
    if size_limit and size > size_limit:
        raise ParamError(Reply(552, "5.3.4", "Message size exceeds fixed limit"))
    return size


# MAIL FROM parameters that take no value: SMTPUTF8 (RFC 6531 §3.4), REQUIRETLS (RFC 8689 §2)
_FLAGS = frozenset({"SMTPUTF8", "REQUIRETLS"})


def parse_mail_params(text: str, *, size_limit: int) -> MailParams:
    size: int | None = None
    body = "7BIT"
    flags: set[str] = set()
    ret = envid = auth = None
    seen: set[str] = set()
    for key, value in _params(text):
        if key in seen:
            raise ParamError(Reply(501, "5.5.4", f"Duplicate {key} parameter"))
        seen.add(key)
        if key == "SIZE":
            size = _size_param(value, size_limit)
        elif key == "BODY":
            if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                raise ParamError(Reply(501, "5.5.4", "Unsupported BODY parameter"))
            body = value.upper()
        elif key in _FLAGS:
            if value is not None:
                raise ParamError(Reply(501, "5.5.4", f"{key} takes no value"))
            flags.add(key)
        elif key == "RET":
            if value is None or value.upper() not in ("FULL", "HDRS"):
                raise ParamError(Reply(501, "5.5.4", "Bad RET parameter"))
            ret = value.upper()
        elif key == "ENVID":
            if value is None or not _xtext_ok(value):
                raise ParamError(Reply(501, "5.5.4", "Bad ENVID parameter"))
            envid = value
        elif key == "AUTH":
            # RFC 4954 §5: "<>" or the xtext of an addr-spec; the session decides whether
            # to trust it, the engine only makes sure it is safe to carry.
            if value is None or (value != "<>" and not _xtext_ok(value)):
                raise ParamError(Reply(501, "5.5.4", "Bad AUTH parameter"))
            auth = value
        else:
            raise ParamError(_BAD_PARAM)
    return MailParams(size, body, "SMTPUTF8" in flags, ret, envid, auth,
                      "REQUIRETLS" in flags)


_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
_UTF8_PARAMS = frozenset({"ORCPT"})
_NO_PARAMS: frozenset[str] = frozenset()


def parse_orcpt(value: str, *, utf8: bool = False) -> str | None:
    """``addr-type;value`` of RFC 3461 §4.2 in its stored form, or None when malformed.

    ``addr-type`` is an atom (``rfc822``, ``utf-8``, or any other registered type). For
    ``utf-8`` (RFC 6533) the value is ``utf-8-addr-xtext``, or ``utf-8-addr-unitext`` when
    the transaction has SMTPUTF8; it is stored in the 7-bit form, so what is queued can be
    relayed to any next hop. Every other type carries RFC 3461 xtext decoding to printable
    ASCII.
    """
    addr_type, semi, addr = value.partition(";")
    if not semi or not addr or len(value) > MAX_XTEXT or _ATOM_RE.fullmatch(addr_type) is None:
        return None
    if addr_type.lower() == "utf-8":
        seven_bit = _utf8_addr(addr, utf8)
        if seven_bit is None or len(addr_type) + 1 + len(seven_bit) > MAX_XTEXT:
            return None
        return f"{addr_type};{seven_bit}"
    if not _xtext_ok(addr):
        return None
    return f"{addr_type};{addr}"


def parse_rcpt_params(text: str, *, utf8: bool = False) -> RcptParams:
    """RCPT TO parameters; ``utf8`` is whether the transaction's MAIL had SMTPUTF8."""
    notify = orcpt = None
    seen: set[str] = set()
    for key, value in _params(text, _UTF8_PARAMS if utf8 else _NO_PARAMS):
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
            orcpt = parse_orcpt(value or "", utf8=utf8)
            if orcpt is None:
                raise ParamError(Reply(501, "5.5.4", "Bad ORCPT parameter"))
        else:
            raise ParamError(_BAD_PARAM)
    return RcptParams(notify, orcpt)
