"""What every fuzz target shares: reading structured values out of the fuzzer's bytes, and the
checks of wire-level contracts (reply lines, header lines, addresses, xtext).

Targets are plain ``test_one_input(data: bytes) -> None`` functions that raise on a broken
contract; they import neither atheris nor libFuzzer, so the unit tests and the minimiser run
them as ordinary Python. A broken property raises :class:`Violation`, whose first argument
names the property: that name is part of the crash signature the runner de-duplicates on.
"""

from __future__ import annotations

import re
import unicodedata


class Violation(AssertionError):
    """A documented contract does not hold. ``args[0]`` is a short, stable property name."""

    def __init__(self, prop: str, detail: object = "") -> None:
        super().__init__(prop, detail)
        self.prop = prop

    def __str__(self) -> str:
        return f"{self.prop}: {self.args[1]!r}" if self.args[1] != "" else self.prop


def require(ok: object, prop: str, detail: object = "") -> None:
    """Raise :class:`Violation` ``prop`` unless ``ok``."""
    if not ok:
        raise Violation(prop, detail)


class Input:
    """Consumes the fuzzer's bytes front to back, like libFuzzer's FuzzedDataProvider.

    Every method returns a default once the bytes are used up, so every input is valid and
    a mutation anywhere only shifts what later values read (small inputs stay meaningful).
    """

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def flag(self) -> bool:
        return bool(self.byte() & 1)

    def pick(self, options: list | tuple):
        return options[self.byte() % len(options)]

    def chunk(self, max_len: int = 255) -> bytes:
        """A length byte, then that many bytes (fewer at the end of the input)."""
        n = min(self.byte(), max_len)
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def text(self, max_len: int = 255) -> str:
        """A chunk decoded as the engine decodes command arguments."""
        return self.chunk(max_len).decode("utf-8", "surrogateescape")

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out


# ------------------------------------------------------------------------- SMTP replies

MAX_REPLY_LINE = 512    # RFC 5321 §4.5.3.1.5, code and CRLF included
_REPLY_LINE = re.compile(rb"[2-5][0-9]{2}[ -][\x20-\x7e]*")


def check_reply_bytes(out: bytes, what: str = "reply") -> list[tuple[int, bool]]:
    """Check a batch of reply lines as written to the client; return (code, last) per line.

    Complete lines only (a batch never ends mid-line), ``^[2-5][0-9]{2}[ -]`` then printable
    ASCII, no CR or LF inside a line, at most 512 octets, and a multi-line reply keeps its
    code until its last (``code SP``) line.
    """
    if not out:
        return []
    require(out.endswith(b"\r\n"), f"{what}: output does not end with CRLF", out[-80:])
    lines = out[:-2].split(b"\r\n")
    parsed: list[tuple[int, bool]] = []
    pending: int | None = None
    for line in lines:
        require(b"\r" not in line and b"\n" not in line, f"{what}: bare CR or LF in a reply",
                line[:120])
        require(len(line) + 2 <= MAX_REPLY_LINE, f"{what}: reply line longer than 512",
                line[:120])
        require(_REPLY_LINE.fullmatch(line) is not None, f"{what}: malformed reply line",
                line[:120])
        code, last = int(line[:3]), line[3:4] == b" "
        require(pending is None or pending == code, f"{what}: multi-line reply changes code",
                line[:120])
        pending = None if last else code
        parsed.append((code, last))
    require(pending is None, f"{what}: multi-line reply without its last line", lines[-1][:120])
    return parsed


def check_reply(reply: object, what: str = "reply") -> None:
    """A :class:`pymta.types.Reply` renders to well-formed reply lines."""
    code = getattr(reply, "code", None)
    require(isinstance(code, int) and 200 <= code <= 599, f"{what}: bad reply code", reply)
    check_reply_bytes(reply.render(), what)  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- addresses

_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*")
_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")      # RFC 5322 atext+
_BAD_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def is_xtext(value: str) -> bool:
    """RFC 3461 §4 xtext: printable ASCII except ``+`` and ``=``, or ``+HH``."""
    return _XTEXT.fullmatch(value) is not None


def is_atom(value: str) -> bool:
    return _ATOM.fullmatch(value) is not None


def check_address(addr: str, *, utf8: bool, what: str) -> None:
    """An address the SMTP boundary accepted is safe to put anywhere downstream.

    Valid Unicode (no lone surrogates from undecodable bytes: RFC 6531 demands UTF-8), ASCII
    unless SMTPUTF8, no control characters or line/paragraph separators (C0, DEL, C1 such as
    U+0085, U+2028, U+2029 end lines in logs and headers), RFC 5321 lengths.
    """
    require(isinstance(addr, str), f"{what}: not a str", addr)
    try:
        raw = addr.encode("utf-8")
    except UnicodeEncodeError:
        raise Violation(f"{what}: accepted address is not valid UTF-8", addr) from None
    if not utf8:
        require(addr.isascii(), f"{what}: non-ASCII address without SMTPUTF8", addr)
    bad = [c for c in addr if unicodedata.category(c) in _BAD_CATEGORIES]
    require(not bad, f"{what}: control or line-separator character in an accepted address",
            addr)
    require(len(raw) <= 254, f"{what}: address longer than a 256-octet path allows", addr)
    local, at, domain = addr.rpartition("@")
    if at:
        require(len(local.encode("utf-8")) <= 64, f"{what}: local part longer than 64", addr)
        require(0 < len(domain) <= 255, f"{what}: bad domain length", addr)


# ------------------------------------------------------------------------- messages

MAX_HEADER_LINE = 998   # RFC 5322 §2.1.1, CRLF excluded


def spool_form(data: bytes) -> bytes:
    """``data`` as the spool holds messages: every line break CRLF, no bare CR or LF (the
    engine refuses those), so properties that rely on that can be checked on any input."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def check_field(field: bytes, what: str) -> None:
    """One header field as we write it: CRLF-terminated lines, continuation lines start with
    a blank, no bare CR/LF or NUL, every line at most 998 octets, valid UTF-8."""
    require(field.endswith(b"\r\n"), f"{what}: field does not end with CRLF", field[-80:])
    lines = field[:-2].split(b"\r\n")
    for i, line in enumerate(lines):
        require(b"\r" not in line and b"\n" not in line, f"{what}: bare CR or LF in a field",
                line[:200])
        require(b"\x00" not in line, f"{what}: NUL in a field", line[:200])
        require(len(line) <= MAX_HEADER_LINE, f"{what}: header line longer than 998 octets",
                len(line))
        if i:
            require(line[:1] in (b" ", b"\t") and line.strip(), f"{what}: bad continuation",
                    line[:200])
    try:
        field.decode("utf-8")
    except UnicodeDecodeError:
        raise Violation(f"{what}: field is not valid UTF-8", field[:200]) from None
