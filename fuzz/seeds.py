"""The seed corpus, written out by ``python -m fuzz seeds`` into ``fuzz/corpus/<target>/``.

Seeds are small valid inputs in each target's input layout (see the target docstrings),
taken from the protocol-defence tests (smuggling endings, pipelining, BDAT, AUTH, STARTTLS),
from ordinary and malformed messages, and from real envelope records. Kept as code so that a
change of a target's input layout changes its seeds in the same commit; the files are in
git so that libFuzzer reads them directly.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

from pymta.queue.codec import encode
from pymta.types import Envelope, RcptState, Recipient

CORPUS = Path(__file__).resolve().parent / "corpus"


def ch(data: bytes) -> bytes:
    """A length-prefixed chunk, as ``Input.chunk`` reads it."""
    assert len(data) < 256
    return bytes([len(data)]) + data


# ------------------------------------------------------------------------------- messages

MSG = (b"Received: from a.example.net (a.example.net [192.0.2.1])\r\n"
       b"\tby mx.example.com (Postfix) with ESMTP id 4AbCd; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
       b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.net; s=sel1;\r\n"
       b"\th=from:to:subject; bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=; b=AbCdEf\r\n"
       b"Authentication-Results: mx.fuzz.test; spf=pass smtp.mailfrom=example.net\r\n"
       b"Authentication-Results: other.example; dkim=pass header.d=example.net\r\n"
       b"From: Alice <alice@example.net>\r\n"
       b"To: bob@example.com\r\n"
       b"Subject: hello\r\n"
       b"\r\n"
       b"Hi Bob,\r\n.. a dotted line\r\nbye\r\n")

MALFORMED = [
    b"Received : from x\r\nSubject : obsolete syntax\r\n\r\nbody\r\n",
    b"This first line is not a header field\r\nSubject: x\r\n\r\nbody\r\n",
    b"Subject: no blank line\r\nbody starts here without one\r\n",
    b" continuation first\r\nReceived: a\r\n\r\n",
    b"From: \"quoted, comma\" <a@b.example>, c@d.example\r\nFrom: x\r\n\r\n",
    b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.net; s=arc; b=xyz\r\n"
    b"ARC-Message-Signature: i=1; a=rsa-sha256; d=example.net; s=arc; h=from; bh=x; b=y\r\n"
    b"ARC-Authentication-Results: i=1; mx.example.net; spf=pass\r\n\r\nx\r\n",
    b"DKIM-Signature: v=1; a=rsa-sha256; d=; s\r\n\r\n",
    b"Authentication-Results: (comment) \"MX.FUZZ.TEST\" ; none\r\n\r\n",
    b"Subject: bare\nlf\rcr\r\n\r\n",
]

MIME = [
    b"From: a@b.example\r\nSubject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe, caf\xc3\xa9 =\r\n.\r\n",
    b"From: a@b.example\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"XX\"\r\n\r\npreamble\r\n--XX\r\n"
    b"Content-Type: text/plain; charset=latin-1\r\n\r\nt\xe9st\r\n--XX\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
    b"AAEC\xff\r\n--XX\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\n\xe4\r\n"
    b"--XX--\r\nepilogue\r\n",
    b"Subject: no mime\r\n\r\n" + b"\xe9" * 120 + b" \t\r\n",
    b"Content-Type: multipart/alternative; boundary=b\r\n\r\n--b\r\n\r\n\xff\r\n--b",
    # found in CI: a last "From " header line is the body's first line to a reader
    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nX: y\r\nFrom \xe9\r\n\r\nz\r\n--b--",
    # found by the long run: an empty line written after ignored "From " lines
    b"Content-Type: message/rfc822\r\nFrom \r\nFrom \xe9--\r\nz\r\n-",
    # a multipart/digest part without Content-Type is message/rfc822
    b"Content-Type: multipart/digest; boundary=b\r\n\r\n--b\r\n\r\nSubject: i\r\n\r\n\xe9\r\n--b--",
]


# ------------------------------------------------------------------------------- engine

def _engine(flags: int, stream: bytes, policy: int = 255, seed: int = 0,
            limits: bytes = b"\x40\x40\x40") -> bytes:
    return bytes([flags]) + limits + bytes([policy, seed]) + stream


SMUGGLED = (b"MAIL FROM:<attacker@evil.test>\r\nRCPT TO:<postmaster@example.com>\r\nDATA\r\n"
            b"From: <ceo@example.com>\r\nSubject: smuggled\r\n\r\nSMUGGLED-PAYLOAD\r\n.\r\n")
OPEN = b"EHLO client.example.net\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<alice@example.com>\r\n"
ENDINGS = [b"\n.\n", b"\r.\r", b"\r.\n", b"\n.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n",
           b"\r\n.\r", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]


def engine_seeds() -> list[bytes]:
    plain = base64.b64encode(b"\0user\0secret")
    seeds = [
        _engine(0, OPEN + b"DATA\r\n" + MSG + b".\r\nQUIT\r\n"),
        _engine(0x40, OPEN + b"DATA\r\n" + MSG + b".\r\nQUIT\r\n", seed=3),
        _engine(0, b"HELO c\r\nMAIL FROM:<>\r\nRCPT TO:<postmaster>\r\nRSET\r\nNOOP\r\n"
                   b"VRFY x\r\nEXPN y\r\nHELP\r\nBOGUS\r\nQUIT\r\n"),
        _engine(0, b"EHLO c\r\nMAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME RET=HDRS "
                   b"ENVID=abc+2B SMTPUTF8\r\nRCPT TO:<r\xc3\xa9@x.test> NOTIFY=SUCCESS,FAILURE "
                   b"ORCPT=rfc822;r+40x.test\r\nDATA\r\n\xc3\xa9\r\n.\r\n"),
        _engine(0, OPEN + b"BDAT 12\r\nSubject: x\r\nBDAT 6 LAST\r\n\r\nhi\r\nQUIT\r\n"),
        _engine(0, OPEN + b"BDAT 3 LAST\r\na\rb"),
        _engine(0x40, b"EHLO c\r\n" + b"RCPT TO:<x@y.test>\r\n" * 30),
        _engine(0x40, b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<x@y.test>\r\n" * 8
                + b"DATA\r\n" + b"x" * 300 + b"\r\n.\r\n"),
        _engine(0x3f, b"EHLO c\r\nAUTH PLAIN " + plain + b"\r\nMAIL FROM:<a@b.test>\r\n"),
        _engine(0x3f, b"EHLO c\r\nAUTH LOGIN\r\n" + base64.b64encode(b"user") + b"\r\n"
                + base64.b64encode(b"pw") + b"\r\nAUTH PLAIN\r\n*\r\n"),
        _engine(0x3f, b"EHLO c\r\nAUTH CRAM-MD5\r\n"
                + base64.b64encode(b"user " + b"0" * 32) + b"\r\nAUTH PLAIN =\r\n"),
        _engine(0x01, b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<early@x.test>\r\n"
                      b"EHLO c\r\nMAIL FROM:<a@b.test>\r\n", seed=1),
        _engine(0, b"EHLO c\r\n" + b"x" * 3000 + b"\r\nNOOP\r\n"),
        _engine(0, OPEN + b"DATA\r\n" + b"x" + b"\r\n" * 600 + b".\r\n"),
        _engine(0, OPEN + b"DATA\r\nSubject: x\r\n\r\nearly data\r\n.\r\n", seed=2),
    ]
    for ending in ENDINGS:
        seeds.append(_engine(0, OPEN + b"DATA\r\n" + b"Subject: outer\r\n\r\nouter body"
                             + ending + SMUGGLED))
    for line in (b"NOOP\nMAIL FROM:<attacker@evil.test>\r\n",
                 b"NOOP\rMAIL FROM:<attacker@evil.test>\r\n", b"\nMAIL FROM:<a@b.test>\r\n"):
        seeds.append(_engine(0, b"EHLO c\r\n" + line))
    return seeds


# ------------------------------------------------------------------------------- others

def params_seeds() -> list[bytes]:
    args = [b"FROM:<a@b.example> SIZE=1000 BODY=8BITMIME", b"FROM:<> RET=FULL ENVID=x+2By",
            b"FROM: <@r1,@r2:user@c.example> AUTH=<>", b"FROM:<\"q u\"@[192.0.2.1]> SMTPUTF8",
            b"TO:<postmaster> NOTIFY=NEVER", b"TO:<b@[IPv6:::1]> NOTIFY=DELAY,SUCCESS "
            b"ORCPT=rfc822;b+40c", b"TO:<r\xc3\xa9@\xc3\xa9x.test>", b"FROM:<\xff\xfe@x.test>",
            b"TO:<a..b@x> SIZE=1 SIZE=2", b"FROM:a@b.example BODY=binarymime",
            b"TO:<x@y> ORCPT=\xff\xfe;x", b"FROM:<x@y> X=1 X=2"]
    return [bytes([flags]) + arg for flags in (0, 3, 7) for arg in args]


def headers_seeds() -> list[bytes]:
    return [bytes([i & 1, i]) + m for i, m in enumerate([MSG, *MALFORMED, *MIME])]


def trace_seeds() -> list[bytes]:
    return [bytes([flags]) + ch(helo) + ch(mail) + ch(rcpt) + ch(user) + ch(mech)
            for flags, helo, mail, rcpt, user, mech in [
                (0, b"client.example.net", b"<a@sender.test>", b"<alice@example.com>", b"",
                 b"ip4:192.0.2.0/24"),
                (4, b"evil.test;dkim=pass;dmarc=pass", b"<>", b"<alice@example.com>", b"", b""),
                (7, b"[192.0.2.7]", b"<a@b.test>", b"<c@d.test>", b"us(er)", b"-all"),
                (8, b"x" * 250, b"<>", b"<p@q.test>", b"", b"a;b"),
                (2, b"h\"(", b"<\"odd;\"@b.test>", b"<postmaster>", b"me@x", b"\"\\"),
            ]]


def mime_seeds() -> list[bytes]:
    return [ch(b"a@b.example") + m for m in MIME] + [ch(b"\xc3\xa9@x.test") + MSG]


# A PE header (MZ ... PE\0\0) as a banned-files walk sniffs it, and a zip listing a
# double extension, both built here (no executable in the repository).
_PE = b"MZ" + b"\x00" * 58 + b"\x40\x00\x00\x00" + b"PE\x00\x00" + b"\x00" * 60
_ZIP = base64.b64decode(
    "UEsDBBQAAAAAAAAAIQAAAAAAAAAAAAAAAAAPAAAAaW52b2ljZS5wZGYuZXhlUEsBAhQAFAAAAAAAAAAhAAAAAAAAAAA"
    "AAAAAAA8AAAAAAAAAAAAAAAAAAAAAAGludm9pY2UucGRmLmV4ZVBLBQYAAAAAAQABAD0AAAAtAAAAAAA=")


def content_seeds() -> list[bytes]:
    b64 = base64.encodebytes
    parts = [
        MSG,
        b"Subject: plain\r\n\r\n" + _PE + b"\r\n",
        b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + b64(_PE),
        b"Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
        b"MZ=00=00\r\n=\r\n",
        b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
        b"Content-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/zip; "
        b"name=\"a.zip\"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64(_ZIP)
        + b"--b\r\nContent-Disposition: attachment; filename=\"invoice.pdf.exe\"\r\n\r\nx\r\n"
        b"--b--\r\n",
        b"Subject: a\r\nSubject: b\r\nFrom: \xe9\r\nX-Long: " + b"y" * 1100 + b"\r\n\r\nz\r\n",
    ]
    return [bytes([flags]) + p for p in parts for flags in (0, 1, 2)] + [
        bytes([0]) + m for m in MIME + MALFORMED]


def dsn_seeds() -> list[bytes]:
    out = []
    rcpt = ch(b"<b@x.test>") + ch(b"<orig@x.test>") + ch(b"ORCPT=rfc822;o+40x.test") + b"\x01\x01"
    second = ch(b"<c@y.test>") + ch(b"") + ch(b"NOTIFY=SUCCESS") + b"\x00\x00"
    for flags in (0, 1, 2, 4, 8, 16, 0x20, 0x80):
        out.append(bytes([flags]) + ch(b"<a@sender.test>") + ch(b"RET=FULL ENVID=q+2Bq")
                   + rcpt + (second if flags & 0x20 else b"")
                   + ch(b"Mailbox full\nsecond line") + ch(b"mx.remote.test") + b"\x00" + MSG)
    return out


def codec_seeds() -> list[bytes]:
    rcpt = Recipient(address="bob@example.com", original="bob@example.com", local=False,
                     mailbox="bob/", notify="SUCCESS", orcpt="rfc822;bob@example.com",
                     state=RcptState.PENDING, attempts=2, last_reply="451 4.3.0 later",
                     last_attempt=1.7e9, next_hop="mx.example.com")
    env = Envelope(sender="a@b.example", recipients=[rcpt], received_at=1.7e9,
                   next_attempt=1.7e9 + 300, client_ip="192.0.2.1", helo="c.example",
                   auth_user="u", body_type="8BITMIME", smtputf8=True, ret="HDRS", envid="x",
                   size=1234, held=True, prepend="X-A: b\r\n", extra={"k": "v"})
    full = encode(env)
    huge = (b'{"v":1,"sender":"","recipients":[],"received_at":1' + b"0" * 400
            + b',"next_attempt":0}')
    return [full, encode(Envelope(sender="", recipients=[], received_at=0, next_attempt=0)),
            full[:len(full) // 2], full.replace(b'"v":1', b'"v":2'), b"[]", b"{}",
            huge, b"[" * 4000]      # float overflow and deep nesting: CodecError, not a crash


SEEDS = {
    "engine": engine_seeds, "params": params_seeds, "headers": headers_seeds,
    "trace": trace_seeds, "mime": mime_seeds, "dsn": dsn_seeds, "codec": codec_seeds,
    "content": content_seeds,
}


def write_all() -> dict[str, int]:
    """(Re)write every target's seed files; returns the number per target."""
    counts = {}
    for name, make in SEEDS.items():
        folder = CORPUS / name
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("seed-*"):
            old.unlink()
        seeds = make()
        for seed in seeds:
            digest = hashlib.sha1(seed).hexdigest()[:12]
            (folder / f"seed-{digest}").write_bytes(seed)
        counts[name] = len(seeds)
    return counts
