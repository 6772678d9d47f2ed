"""Fuzz target: Delivery Status Notifications built from a stored message
(``pymta.queue.dsn.build_dsn``) whose envelope came through the SMTP boundary.

Input layout: a flag byte (SMTPUTF8, RET=HDRS, which notice, a tiny size limit), the sender,
one or two recipients with ORCPT and ENVID parameter text, a remote reply and host, then the
stored message. Addresses and parameters only enter the envelope when the engine's own
parsers (``pymta.smtp.params``) accept them, as in the real queue; the remote reply is any
text a remote server could send.

Contract checked: ``build_dsn`` never raises; the DSN's own header section is exactly the
nine fields it writes, each once (nothing a client or a remote server said can add a field);
every line that is not part of the returned original ends in CRLF, has no bare CR/LF and is at
most 998 octets; the stdlib parser sees ``multipart/report`` with the notification, a
delivery-status part with one block per recipient, and the original part when one is
returned. A full original comes back byte for byte, and only in a failure notice without
RET=HDRS within the size limit; otherwise only its header section does (issue 10, defect 3:
success and delay notices never reflect the body).
"""

from __future__ import annotations

import atexit
import email
import os
import re
import tempfile
from email.policy import compat32

from fuzz.harness import MAX_HEADER_LINE, Input, require, spool_form
from pymta.pipeline.headers import field_name, split_fields
from pymta.queue.dsn import DsnEntry, build_dsn
from pymta.smtp.params import ParamError, parse_address, parse_mail_params, parse_rcpt_params
from pymta.types import Envelope, Recipient, Reply

MTA = "mx.fuzz.test"
KINDS = ("failed", "delivered", "delayed")
FIELDS = ["from", "to", "subject", "date", "message-id", "auto-submitted", "mime-version",
          "content-type", "content-transfer-encoding"]
STATUS = {"failed": "5.1.1", "delivered": "2.0.0", "delayed": "4.4.1"}

_fd, _BODY = tempfile.mkstemp(prefix="pymta-fuzz-dsn-", dir="/dev/shm"
                              if os.path.isdir("/dev/shm") else None)
os.close(_fd)
atexit.register(lambda: os.path.exists(_BODY) and os.unlink(_BODY))


def _addr(text: str, utf8: bool, default: str, null: bool = False) -> str:
    addr = parse_address(text, utf8=utf8, allow_null=null)
    return default if addr is None else addr


def _recipient(inp: Input, utf8: bool, n: int) -> Recipient:
    address = _addr(inp.text(80), utf8, f"rcpt{n}@example.com")
    original = _addr(inp.text(80), utf8, address)
    try:
        params = parse_rcpt_params(inp.text(120))
    except ParamError:
        params = None
    return Recipient(address=address, original=original, local=inp.flag(),
                     notify=params.notify if params else None,
                     orcpt=params.orcpt if params else None, last_attempt=1.7e9 * inp.flag())


def test_one_input(data: bytes) -> None:
    inp = Input(data)
    flags = inp.byte()
    utf8, hdrs, tiny = bool(flags & 1), bool(flags & 2), bool(flags & 4)
    kind = KINDS[(flags >> 3) % 3]
    sender = _addr(inp.text(80), utf8, "sender@example.net", null=True)
    try:
        mparams = parse_mail_params(inp.text(120), size_limit=0)
    except ParamError:
        mparams = None
    rcpts = [_recipient(inp, utf8, n) for n in range(1 + (flags >> 5) % 2)]
    remote = inp.text(200)
    host = inp.text(64) or None
    diag = Reply(550 if kind == "failed" else 250, inp.pick(("5.1.1", "2.0.0", "", "4.4.1")),
                 remote) if remote else None
    original = inp.rest()
    if flags & 0x80:
        original = spool_form(original)
    with open(_BODY, "wb") as f:
        f.write(original)
    envelope = Envelope(sender=sender, recipients=rcpts, received_at=1.7e9, next_attempt=0.0,
                        smtputf8=utf8, body_type=mparams.body if mparams else "7BIT",
                        ret="HDRS" if hdrs else (mparams.ret if mparams else None),
                        envid=mparams.envid if mparams else None)
    entries = [DsnEntry(r, kind, STATUS[kind], diag, host) for r in rcpts]  # type: ignore[arg-type]
    dsn = build_dsn(reporting_mta=MTA, qid="FUZZ1", envelope=envelope, entries=entries,
                    body_path=_BODY, now=1.7e9 + 60, action_kind=kind,
                    size_limit=40 if tiny else 50000)

    end = dsn.find(b"\r\n\r\n")
    require(end > 0, "DSN without a header section")
    fields = split_fields(dsn[:end + 2])
    require(b"".join(fields) == dsn[:end + 2], "DSN header section is not all fields",
            dsn[:end + 2][-200:])
    require(sorted(field_name(f) for f in fields) == sorted(FIELDS),
            "DSN header fields are not the nine it writes", [f[:60] for f in fields])

    msg = email.message_from_bytes(dsn, policy=compat32)
    require(msg.get_content_type() == "multipart/report", "DSN is not multipart/report",
            msg.get_content_type())
    parts = msg.get_payload()
    require(isinstance(parts, list) and len(parts) in (2, 3), "DSN does not have 2-3 parts",
            len(parts) if isinstance(parts, list) else parts)
    boundary = msg.get_boundary().encode("utf-8", "surrogateescape")
    segments = dsn.split(b"\r\n--" + boundary + b"\r\n")
    require(len(segments) in (3, 4), "DSN delimiters do not match its parts", len(segments))
    report = segments[2]
    blocks = [b for b in report.split(b"\r\n\r\n")[1:] if b.strip()]
    require(len(blocks) == 1 + len(rcpts), "delivery-status blocks do not match the recipients",
            report[:300])

    ours = dsn
    if len(parts) == 3:
        start = dsn.rfind(b"--" + boundary + b"\r\n")
        close = dsn.rfind(b"\r\n--" + boundary + b"--")
        head_end = dsn.find(b"\r\n\r\n", start) + 4
        returned = dsn[head_end:close]
        kept = returned.rstrip(b"\r\n")
        if kind == "failed" and not hdrs and len(original) <= (40 if tiny else 50000):
            require(kept == original.rstrip(b"\r\n"),
                    "the returned original is not byte for byte", returned[:200])
        else:   # RET=HDRS, too large, or a success/delay notice: the header section only
            require(original.startswith(kept), "returned headers are not the original's",
                    returned[:200])
            blank = re.search(rb"\r?\n\r?\n", original)
            require(blank is None or len(kept) <= blank.start(),
                    "a headers-only notice returned the body", returned[-200:])
        ours = dsn[:head_end] + dsn[close:]
    lines = ours.split(b"\r\n")
    require(lines[-1] == b"", "DSN does not end with CRLF", lines[-1][-80:])
    for line in lines:
        require(b"\r" not in line and b"\n" not in line, "bare CR or LF in a DSN line",
                line[:200])
        require(len(line) <= MAX_HEADER_LINE, "DSN line longer than 998 octets", line[:200])
