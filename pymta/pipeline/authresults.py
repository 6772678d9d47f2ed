"""The ``Authentication-Results:`` header field (RFC 8601): what our checks concluded, under
our authserv-id, for the MUAs and filters behind us.

Implementation summary. A Modifier that runs after every check: it renders
``txn.auth_results`` (the ``auth_result`` fragments the checks recorded, in pipeline order:
spf, dkim, dmarc, arc; ``none`` when there are none) as
``Authentication-Results: <authserv-id>; spf=...; dkim=...; dmarc=...`` above the message.
The authserv-id is ``PYMTA_AUTHSERV_ID``, by default the host name. Mail from trusted clients
(authenticated, ``MYNETWORKS``) gets the field only when a check recorded something.

Incoming fields that claim *our* authserv-id are forgeries (or our own from an earlier pass,
now stale) and are removed first (RFC 8601 §5): ``txn.drop_header`` makes the stages after
this one see the message without them and has the queue's intake rewrite the spool file's
header section before the commit. Fields of other authserv-ids are kept. This must run before DKIM
signing and ARC sealing (ARC copies our results into ``ARC-Authentication-Results``).

The fragments are written by the checks, which put client-supplied values in only through
:mod:`pymta.headervalue`; as a last guard (a check of a third party), a fragment with a
control or non-ASCII character has each of them replaced by ``?`` so it stays on its line.
"""

from __future__ import annotations

import re

from pymta.headervalue import quote_value
from pymta.pipeline import SpooledBody, Transaction
from pymta.pipeline.headers import field_name, field_value, fold, split_fields

_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")

# Any field ``claims_ours`` matches has this name, in some ASCII letter case (``field_name``
# decodes ASCII only), so a header section without these bytes has none to drop.
_FIELD = b"authentication-results"


def _skip_cfws(text: str, i: int) -> int:
    """Index after any blanks and (nested) comments starting at ``i``."""
    depth = 0
    while i < len(text):
        c = text[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
        elif c == "(":
            depth = 1
        elif c not in " \t\r\n":
            break
        i += 1
    return i


def authserv_id(value: str) -> str:
    """The authserv-id of an Authentication-Results value (lower-case), ``""`` if none."""
    i = _skip_cfws(value, 0)
    if i < len(value) and value[i] == '"':
        out = []
        i += 1
        while i < len(value) and value[i] != '"':
            if value[i] == "\\" and i + 1 < len(value):
                i += 1
            out.append(value[i])
            i += 1
        return "".join(out).strip().lower()
    end = i
    while end < len(value) and value[end] not in ' \t\r\n;()"':
        end += 1
    return value[i:end].lower().rstrip(".")


class AuthResultsModifier:
    """Adds our Authentication-Results and removes forged ones (see the module docstring)."""

    name = "authresults"

    def __init__(self, authserv_id: str) -> None:
        self.authserv_id = authserv_id
        self._ours = authserv_id.lower().rstrip(".")

    def claims_ours(self, field: bytes) -> bool:
        """Is ``field`` an Authentication-Results field under our authserv-id?"""
        return (field_name(field) == "authentication-results"
                and authserv_id(field_value(field)) == self._ours)

    async def modify(self, txn: Transaction, body: SpooledBody) -> None:
        header = body.header_bytes()
        # Most messages carry no such field: one search instead of parsing every field.
        if (_FIELD in header.lower()
                and any(self.claims_ours(f) for f in split_fields(header))):
            txn.drop_header(self.claims_ours)
        if txn.trusted and not txn.auth_results:
            return
        fragments = [f if f.isascii() and f.isprintable() else _UNPRINTABLE.sub("?", f)
                     for f in txn.auth_results or ["none"]]
        txn.add_header(fold("Authentication-Results",
                            [quote_value(self.authserv_id), *fragments]))
