"""Fuzz target: the header fields pymta writes from what a client said -- ``Received:``,
``Received-SPF:`` and ``Authentication-Results:`` (``pymta.receiving.received``,
``pymta.pipeline.spf``, ``pymta.pipeline.authresults``).

Input layout: a flag byte (TLS, AUTH, which SPF result), then the HELO argument, the MAIL
FROM and RCPT TO arguments, the SASL user name and the SPF record's mechanism text. The
HELO, sender and recipient reach the header writers only as the real engine accepted them
(an ``Engine`` parses the commands); the SPF evaluation is replaced by a stub returning the
chosen result (no DNS), so the SPF check and the Authentication-Results modifier run their
real code on those values.

Contract checked (issue 10, defect 1; architecture: "every value we write into a header is
checked or quoted for that field's syntax"): each field is one well-formed field
(``check_field``: CRLF lines, no bare CR/LF, no NUL, lines of at most 998 octets) that
``split_fields`` reads back as exactly one field; the Authentication-Results field parses
(RFC 8601, with the ``authres`` library) to our authserv-id and exactly the one ``spf``
result the check produced, with that result value.
"""

from __future__ import annotations

import asyncio

import authres

from fuzz.harness import Input, Violation, check_field, require
from pymta.pipeline import SpooledBody, Transaction, Verdict
from pymta.pipeline import spf as spf_stage
from pymta.pipeline.authresults import AuthResultsModifier
from pymta.pipeline.headers import split_fields
from pymta.receiving.received import protocol_name, received_header
from pymta.smtp import events as ev
from pymta.smtp.engine import Engine, EngineConfig
from pymta.types import Reply

MTA = "mx.fuzz.test"
PEER = "192.0.2.7"
_LOOP = asyncio.new_event_loop()
_STUB: dict[str, tuple[str, str, str, str]] = {}


def _stub_evaluate(ip: str, sender: str, helo: str, receiver: str, *args: object,
                   ) -> tuple[str, str, str, str]:
    return _STUB["result"]


def _check_spf(txn: Transaction, body: SpooledBody) -> Verdict:
    """The SPF check with ``evaluate`` stubbed for this call only: the check calls the
    module's ``evaluate`` by name, and a stub left in place would change SPF for every
    other user of the module in the same process (the unit tests import this target)."""
    real = spf_stage.evaluate
    spf_stage.evaluate = _stub_evaluate
    try:
        return _LOOP.run_until_complete(
            spf_stage.SPFCheck(receiver=MTA, timeout=5.0).check(txn, body))
    finally:
        spf_stage.evaluate = real


def _line(inp: Input, max_len: int = 255) -> bytes:
    """A command argument: the engine would end the session at a CR or LF, so none here."""
    return inp.chunk(max_len).replace(b"\r", b"").replace(b"\n", b"")


def _envelope(inp: Input) -> tuple[str, str, str] | None:
    """(helo, sender, recipient) as the engine accepted them, or None if it refused one."""
    engine = Engine(EngineConfig(MTA))
    engine.feed(b"EHLO " + _line(inp) + b"\r\nMAIL FROM:" + _line(inp) + b"\r\nRCPT TO:"
                + _line(inp) + b"\r\n")
    helo = sender = rcpt = None
    while (event := engine.next_event()) is not ev.NEED_DATA:
        if isinstance(event, ev.Helo):
            helo = event.name
        elif isinstance(event, ev.MailFrom):
            sender = event.address
            engine.respond(Reply(250, "2.1.0", "Ok"))
        elif isinstance(event, ev.RcptTo):
            rcpt = event.address
            engine.respond(Reply(250, "2.1.5", "Ok"))
        elif isinstance(event, ev.Close):
            break
    if helo is None or sender is None or rcpt is None:
        return None
    return helo, sender, rcpt


def _one_field(field: bytes, what: str) -> None:
    check_field(field, what)
    fields = split_fields(field + b"\r\n")
    require(fields == [field], f"{what}: not read back as exactly one field",
            [f[:80] for f in fields])


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    flags = inp.byte()
    got = _envelope(inp)
    if got is None:
        return
    helo, sender, rcpt = got
    user = inp.chunk(255).decode("utf-8", "replace")
    auth_user = user if flags & 2 and user and not any(c in user for c in "\r\n\0") else None
    result = spf_stage.RESULTS[(flags >> 2) % len(spf_stage.RESULTS)]
    mechanism = inp.text(120)
    who = sender.rpartition("@")[2] if sender else helo
    _STUB["result"] = (result, "explanation",
                       f"{MTA}: domain of {who} designates {PEER} as permitted sender",
                       mechanism)

    received = received_header(helo=helo, peer_ip=PEER, hostname=MTA,
                               protocol=protocol_name(True, bool(flags & 1), bool(auth_user)),
                               qid="FUZZ1", tls_info=None, recipient=rcpt, now=1.7e9,
                               auth_user=auth_user)
    _one_field(received, "Received")

    txn = Transaction(qid="FUZZ1", sender=sender, recipients=[], peer_ip=PEER, helo=helo,
                      hostname=MTA, local_domains=frozenset({"fuzz.test"}))
    body = SpooledBody("/nonexistent", 0, head=b"Subject: x\r\n\r\n")
    verdict = _check_spf(txn, body)
    for header in verdict.headers:
        _one_field(header.encode("utf-8", "surrogateescape") + b"\r\n", "Received-SPF")
    require(verdict.auth_result, "SPF check recorded no result")
    txn.auth_results.append(verdict.auth_result)
    _LOOP.run_until_complete(AuthResultsModifier(MTA).modify(txn, body))
    require(len(txn.prepend) == 1, "Authentication-Results modifier added no single field",
            txn.prepend)
    ar = txn.prepend[0].encode("utf-8", "surrogateescape")
    _one_field(ar, "Authentication-Results")
    try:
        parsed = authres.AuthenticationResultsHeader.parse(ar.decode("utf-8").rstrip("\r\n"))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the finding
        raise Violation("Authentication-Results does not parse (RFC 8601)",
                        (ar[:300], repr(exc))) from None
    require(str(parsed.authserv_id).lower() == MTA, "Authentication-Results authserv-id "
            "is not ours", (parsed.authserv_id, ar[:300]))
    methods = [(r.method, r.result) for r in parsed.results]
    require(methods == [("spf", result)], "Authentication-Results carries other results "
            "than the one SPF result", (methods, ar[:300]))
