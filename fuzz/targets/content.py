"""Fuzz target: the content filter's inspections of a hostile message (``pymta.content.banned``,
``pymta.content.badheader``) and the text the filter makes of their findings
(``pymta.content.filter``).

Input: one flags byte (bit 0: the message came with SMTPUTF8; bit 1: a tiny ``max_bytes``
bound, so the "too complex" path runs), then the message (in spool form: CRLF lines).

Contract checked:
* ``BannedFiles.inspect`` and ``BadHeader.inspect`` never raise on any octets;
* the banned-files walk finds the same as a walk that takes every line one at a time (the
  block decoding of single-part bodies is an optimisation, never a change of verdict);
* findings are bounded (``max_findings``; one too-complex finding per reason);
* every text the filter derives from the findings, the reply a REJECT sends
  (``554 5.7.0 Reject, id=... - BANNED: ...``) and the ``X-Amavis-Alert`` values, is one line
  of printable ASCII, short enough for a reply line and a header field.
"""

from __future__ import annotations

import io

from fuzz.harness import Input, check_reply, require, spool_form
from pymta.content import banned
from pymta.content.badheader import BadHeader
from pymta.content.filter import ContentCheck, ContentPolicy, ContentReport
from pymta.pipeline import Transaction
from pymta.types import Recipient

_RULES = banned.BannedFiles()
_SMALL = banned.BannedFiles(max_bytes=2048, max_parts=8, max_depth=3)
_HEADERS = BadHeader(max_header_bytes=64 * 1024)
_REJECT_ALL = ContentPolicy(destinies={"virus": "reject", "banned": "reject", "spam": "reject",
                                       "bad-header": "reject"})


class _LineWalk(banned._Walk):
    """The walk as it was before block decoding: only a base64 zip is taken in blocks."""

    def bulk(self) -> bool:
        leaf = self.leaf
        return (self.mode == banned._BODY and leaf is not None and leaf.archive is not None
                and leaf.cte == "base64")


def _line_by_line(rules: banned.BannedFiles, message: bytes) -> list[banned.BannedItem]:
    walk = _LineWalk(rules)
    walk.run(io.BytesIO(message))
    return walk.found


def _txn() -> Transaction:
    return Transaction(qid="FUZZ1", sender="a@b.test",
                       recipients=[Recipient("c@example.com", "c@example.com")],
                       peer_ip="192.0.2.1", helo="h", hostname="mx.example.com",
                       local_domains=frozenset({"example.com"}))


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    flags = inp.byte()
    message = spool_form(inp.rest())
    rules = _SMALL if flags & 2 else _RULES
    found = rules.inspect(io.BytesIO(message))
    require(found == _line_by_line(rules, message),
            "block decoding changed the banned-files findings", found[:3])
    reasons = [f.reason for f in found if f.kind == banned.TOO_COMPLEX]
    require(len(reasons) == len(set(reasons)), "a too-complex reason reported twice", reasons)
    headers = _HEADERS.inspect(io.BytesIO(message), smtputf8=bool(flags & 1))
    require(len(headers) <= _HEADERS.max_findings, "more bad-header findings than the bound",
            len(headers))
    report = ContentReport(tag=True, banned=tuple(found), bad_header=tuple(headers))
    for _kind, text in report.found(_REJECT_ALL):
        require(text.isascii() and text.isprintable() and len(text) < 400,
                "a finding's text is not one short printable ASCII line", text[:200])
    verdict = ContentCheck(policy=_REJECT_ALL)._decide(_txn(), report)
    if verdict.reply is not None:
        check_reply(verdict.reply, "content filter reply")
