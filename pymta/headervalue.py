"""Values we write into header fields, checked or quoted for that field's syntax.

Every string that comes from outside (the HELO name, envelope addresses, the SASL user name,
the tags of a DKIM signature, a library's error text) reaches a header field we write only
through one of these helpers, so no client can add a field, a result or a comment of its own
(issue 10, defect 1: ``EHLO evil.test;dkim=pass`` became a ``dkim=pass`` in our
Authentication-Results and, ARC-sealed, in the next hop's). Each helper returns text that is
one syntactic unit of its field and never contains CR, LF or other controls:

- :func:`is_domain`, :func:`is_fqdn`, :func:`is_address_literal`: RFC 5321 syntax checks
  (SPF checks a HELO only when it is a domain, RFC 7208 §2.3 and §4.3).
- :func:`pvalue`: an RFC 8601 ``pvalue`` (``smtp.helo=``, ``header.d=``, ``header.s=``,
  ``header.from=``): a domain, ``local@domain`` or a token as it is, anything else a token
  with every other character percent-encoded (``evil.test;dkim=pass`` is written
  ``evil.test%3Bdkim%3Dpass``): lossless, and never a quoted-string, because the ``authres``
  parser drops a quoted-string property that another property follows.
- :func:`quote_value`: an RFC 8601 / RFC 2045 ``value`` (``reason=``, and ``header.b=``,
  which we always write last): a token, else a quoted-string.
- :func:`kv_value`: a ``Received-SPF`` key-value (RFC 7208 §9.1): dot-atom or quoted-string.
- :func:`comment_text`: text for inside ``( )``.
- :func:`trace_helo` and :func:`trace_mailbox`: the ``from`` and ``for`` parts of
  ``Received:`` (RFC 5321 §4.4).
- :func:`angle_address`: an envelope address as ``<...>`` in an address list (the
  quarantine's ``X-Envelope-From``/``-To``/``-To-Blocked``).

Quoted strings here never contain ``"``, ``\\`` or ``@`` (each becomes ``?``): dkimpy builds
the ``ARC-Authentication-Results`` we seal by parsing our Authentication-Results with the
``authres`` package and printing it again, and that printer writes any value containing
``@`` without quotes and doubles quoted-pairs. Values without those three characters come out
of that round trip exactly as they went in. Non-ASCII and control characters also become
``?`` (these fields are ASCII, RFC 8601 parsers read ASCII only); every echoed value is cut
to :data:`MAX_ECHO` characters, so a field stays far below RFC 5322's 998-octet line limit.

The common case (a plain ASCII domain or address) costs one precompiled regular expression
match; nothing loops over characters unless the text needs cleaning.
"""

from __future__ import annotations

import ipaddress
import re

#: Longest client-supplied text echoed into one header value (a domain is at most 253).
MAX_ECHO = 255

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
# RFC 5321 Domain (LDH labels; "_" tolerated as real host names have it), the top label not
# all digits (RFC 7208 §7.1 ``toplabel``: "1.2.3.4" is an address, not a domain name).
_DOMAIN = re.compile(rf"(?=.{{1,253}}\Z)(?:{_LABEL}\.)*(?=[A-Za-z0-9_-]*[A-Za-z_-])"
                     rf"{_LABEL}", re.ASCII)
_TOKEN = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+")             # RFC 2045 token
_TOKEN_CHAR = re.compile(r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")             # RFC 5322 dot-atom
_SIMPLE_ADDR = re.compile(rf"({_ATEXT}+(?:\.{_ATEXT}+)*)?@([^@]+)")
_QUOTED_LOCAL = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
# what may stand in a quoted-string we write (see the module docstring), and in a comment
_UNSAFE_QUOTED = re.compile(r'[^\x20\x21\x23-\x3f\x41-\x5b\x5d-\x7e]')
_UNSAFE_COMMENT = re.compile(r"[^\x20-\x27\x2a-\x3a\x3c-\x5b\x5d-\x7e]")  # no ( ) \ ;
_UNSAFE_KV = re.compile(r"[^\x20-\x7e]")
_NOT_ATEXT_OR_DOT = re.compile(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]")


def is_domain(text: str) -> bool:
    """RFC 5321 ``Domain`` (no trailing dot, at most 253 characters, labels of at most 63)."""
    return _DOMAIN.fullmatch(text) is not None


def is_fqdn(text: str) -> bool:
    """A domain of at least two labels: what SPF evaluates (RFC 7208 §4.3, "multi-label")."""
    return "." in text and _DOMAIN.fullmatch(text) is not None


def is_address_literal(text: str) -> bool:
    """RFC 5321 ``address-literal``: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``."""
    if len(text) < 3 or text[0] != "[" or text[-1] != "]":
        return False
    inner = text[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        return False
    return True


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


def quoted(text: str, limit: int = MAX_ECHO) -> str:
    """A quoted-string holding ``text`` with ``"``, ``\\``, ``@``, controls and non-ASCII
    replaced by ``?`` (no quoted-pairs: see the module docstring)."""
    return '"' + _UNSAFE_QUOTED.sub("?", _cut(text, limit)) + '"'


def quote_value(text: str, limit: int = MAX_ECHO) -> str:
    """An RFC 8601 ``value``: the RFC 2045 token as it is, else :func:`quoted`."""
    if len(text) <= limit and _TOKEN.fullmatch(text):
        return text
    return quoted(text, limit)


def pvalue(text: str, limit: int = MAX_ECHO) -> str:
    """An RFC 8601 ``pvalue`` (§2.3): a domain name, ``[local-part] "@" domain`` with a
    dot-atom local part, or an RFC 2045 token as it is (what ``header.d``, ``header.s``,
    ``smtp.helo`` and ``header.from`` carry when they are well-formed); anything else a
    token with each other character (and ``%``) percent-encoded as UTF-8, cut to ``limit``
    with ``...``. Empty text is ``""`` (a quoted-string; callers write a property only for a
    non-empty value)."""
    if len(text) <= limit:
        if _DOMAIN.fullmatch(text) or _TOKEN.fullmatch(text):
            return text
        m = _SIMPLE_ADDR.fullmatch(text)
        if m is not None and _DOMAIN.fullmatch(m.group(2)):
            return text
    if not text:
        return '""'
    out: list[str] = []
    size = 0
    for c in text:
        piece = c if c != "%" and _TOKEN_CHAR.fullmatch(c) else "".join(
            f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        if size + len(piece) > limit - 3:
            out.append("...")
            break
        out.append(piece)
        size += len(piece)
    return "".join(out)


def kv_value(text: str, limit: int = MAX_ECHO) -> str:
    """A ``Received-SPF`` key-value-pair value (RFC 7208 §9.1): a dot-atom as it is, else a
    quoted-string with quoted-pairs; controls and non-ASCII become ``?``."""
    if len(text) <= limit and _DOT_ATOM.fullmatch(text):
        return text
    clean = _UNSAFE_KV.sub("?", _cut(text, limit))
    return '"' + clean.replace("\\", "\\\\").replace('"', '\\"') + '"'


def comment_text(text: str, limit: int = MAX_ECHO) -> str:
    """Text that is safe inside a comment: ``(``, ``)``, ``\\``, ``;``, controls and non-ASCII
    become ``?`` (``;`` too, for readers that split trace fields at the first one)."""
    text = _cut(text, limit)
    if _UNSAFE_COMMENT.search(text) is None:
        return text
    return _UNSAFE_COMMENT.sub("?", text)


def trace_helo(helo: str) -> str:
    """The ``from`` word of our ``Received:`` field for a HELO/EHLO argument.

    A domain or an address literal is shown as it is (Postfix's ``from HELO (host [ip])``).
    Anything else is shown as Postfix shows it too, but cleaned: every character that is not
    allowed in an RFC 5322 dot-atom (``;``, parentheses, quotes, spaces, controls, non-ASCII)
    becomes ``?`` and the text is cut to :data:`MAX_ECHO` characters, so the word cannot end
    the clause, open a comment or pass the line length limit. Empty: ``unknown``."""
    if not helo:
        return "unknown"
    if len(helo) <= MAX_ECHO and (_DOMAIN.fullmatch(helo.rstrip(".")) is not None
                                  or is_address_literal(helo)):
        return helo
    return _NOT_ATEXT_OR_DOT.sub("?", helo[:MAX_ECHO])


def trace_mailbox(address: str) -> str | None:
    """``address`` as the RFC 5321 ``Mailbox`` of a ``for <...>`` clause, or None when it is
    not one we can write safely (the clause is then left out, as for several recipients).

    The local part must be a dot-atom or a well-formed quoted-string without ``;``
    (printable UTF-8 allowed in a dot-atom: such an address only exists in an SMTPUTF8
    transaction), the domain a domain name (an IDN in its A-label form) or an address
    literal. A ``;`` is legal inside quotes, but readers split a trace field at the first
    one to find its date (RFC 5321 §4.4), so ``for <"a;b"@x>`` is left out (issue 10
    review)."""
    local, at, domain = address.rpartition("@")
    if not at or not local or len(address) > 256 or ";" in address:
        return None
    if not _domain_ok(domain.rstrip(".")):
        return None
    if _DOT_ATOM.fullmatch(local) or _QUOTED_LOCAL.fullmatch(local):
        return address
    if local.isascii() or not local.isprintable():
        return None
    # an RFC 6531 local part: atext plus UTF-8, dots between atoms
    if _NON_ATEXT_ASCII.search(local) or local[0] == "." or local[-1] == "." or ".." in local:
        return None
    return address


def angle_address(address: str) -> str:
    """``<address>`` for an address list: as it is when :func:`trace_mailbox` takes it, else
    with every character that is not atext, ``.`` or printable non-ASCII (an SMTPUTF8 address)
    replaced by ``?`` in its local part (and in its domain when that is not a domain): no
    RFC 5322 special (``,`` ``:`` ``"`` ``<`` ...) and no control is left to end the address,
    the list or the field early. ``<>`` for the null sender."""
    if not address:
        return "<>"
    safe = trace_mailbox(address)
    if safe is not None:
        return f"<{safe}>"
    local, at, domain = address[:256].rpartition("@")
    if not at:
        return f"<{_replaced(domain)}>"
    if trace_mailbox(f"x@{domain}") is None:
        domain = _replaced(domain)
    return f"<{_replaced(local)}@{domain}>"


_ATEXT_DOT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                       "!#$%&'*+/=?^_`{|}~.-")


def _replaced(text: str) -> str:
    return "".join(c if (c.isprintable() and not c.isascii()) or c in _ATEXT_DOT else "?"
                   for c in text)


def _domain_ok(domain: str) -> bool:
    if _DOMAIN.fullmatch(domain) or is_address_literal(domain):
        return True
    if domain.isascii() or not domain.isprintable():
        return False
    try:
        return _DOMAIN.fullmatch(domain.encode("idna").decode("ascii")) is not None
    except UnicodeError:
        return False


# ASCII characters that are not atext and not "." (RFC 5322 §3.2.3), controls and space
_NON_ATEXT_ASCII = re.compile(r"[\x00-\x20\x22\x28\x29\x2c\x3a-\x3c\x3e\x40\x5b-\x5d\x7f]")
