"""Issue 10, defects 1 and 9 and the ``Received :`` hop count, against a real ``pymta serve``
(``ServerProc``) on loopback, spoken to with a raw socket.

- Defect 1: whatever a client says (HELO, addresses) reaches the header fields we write only
  inside its own syntax: a HELO ``evil.test;dkim=pass;dmarc=pass`` must not become results
  of our ``Authentication-Results`` nor, ARC-sealed with our key, of the
  ``ARC-Authentication-Results`` the next hop trusts; ``Received:`` carries no raw ``;``,
  parenthesis or control from it. Checked with an RFC 8601 parser (``authres``) on what the
  next hop (an aiosmtpd recorder, the smart host) and the local mailbox received.
- Defect 9: a header section a check cannot parse (real messages from
  ``tests/corpus/malformed``, plus the hand-made cases of the issue) is accepted (``250``)
  and delivered, with SPF, DKIM verify, ARC, DMARC, ARC sealing and DKIM signing all on,
  never answered with a ``4xx``.
- ``Received :`` (blanks before the colon) counts toward ``PYMTA_MAX_RECEIVED_HEADERS``.
- The issue 10 review: a header section folded into 250,000 continuation lines, or one
  header line of a megabyte sent in small reads, costs what any megabyte costs and other
  clients are served meanwhile; a DKIM ``d=`` with a folded CRLF becomes neither a DNS query
  nor a line of the log.

Unauthenticated mail comes from 127.0.0.2 (not in ``MYNETWORKS``: every check runs, forwarded
mail is ARC-sealed); our users' mail from 127.0.0.1 (``MYNETWORKS``: DKIM-signed).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import authres
import dkim
import pytest
from aiosmtpd.controller import Controller

from pymta.pipeline.dkimkeys import DkimKey, generate_key, key_path, parse_private_key
from pymta.pipeline.dkimsign import sign_message
from tests.integration import serverproc
from tests.integration.serverproc import ServerProc, free_port, wait_until
from tests.services.dns import DNSTestServer

server_factory = serverproc.server_factory  # the fixture

CORPUS = Path(__file__).resolve().parents[1] / "corpus" / "malformed"
OUTSIDE, INSIDE = "127.0.0.2", "127.0.0.1"
AUTHSERV = "mx.example.com"
DELIVERY_TIMEOUT = 30.0


class Recorder:
    """aiosmtpd handler of the next hop: keeps every message as received."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    async def handle_DATA(self, server, session, envelope):  # aiosmtpd's name
        self.received.append(envelope.original_content)
        return "250 2.0.0 Ok: queued as PEER"


@pytest.fixture
def peer() -> Iterator[tuple[Recorder, int]]:
    port = free_port()
    recorder = Recorder()
    controller = Controller(recorder, hostname="127.0.0.1", port=port, ready_timeout=5)
    controller.start()
    try:
        yield recorder, port
    finally:
        controller.stop()


@pytest.fixture
def mta(server_factory: Callable[..., ServerProc], dns_zone: DNSTestServer,
        peer: tuple[Recorder, int]) -> Callable[..., ServerProc]:
    """``mta(**env)``: a started ``pymta serve`` that relays everything foreign to ``peer``."""

    def start(**env: str) -> ServerProc:
        settings = dict(PYMTA_DNS_RESOLVER=dns_zone.resolver_spec, PYMTA_DNS_TIMEOUT="3",
                        PYMTA_WORKERS="1", MYNETWORKS=f"{INSIDE}/32",
                        SMTP_RELAY_HOSTAUTH=f"[127.0.0.1]:{peer[1]}",
                        SMTP_TLS_SECURITY_LEVEL="none", DMARC_ENFORCE="no")
        settings.update(env)
        return server_factory(**settings).start()

    return start


# ------------------------------------------------------------------------------ raw SMTP


class Session:
    """A raw SMTP session from ``source``: every reply as bytes, nothing interpreted."""

    def __init__(self, port: int, source: str, helo: bytes = b"client.example.net") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30,
                                             source_address=(source, 0))
        self.file = self.sock.makefile("rb")
        assert self.reply().startswith(b"220")
        code = self.cmd(b"EHLO " + helo)
        assert code.startswith(b"250"), code

    def reply(self) -> bytes:
        out = b""
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"closed after {out!r}")
            out += line
            if len(line) < 4 or line[3:4] != b"-":
                return out

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def send(self, sender: str, rcpts: list[str], data: bytes) -> bytes:
        """One transaction: the reply to the final dot (or the first refusal)."""
        for line in (f"MAIL FROM:<{sender}>".encode(),
                     *(f"RCPT TO:<{r}>".encode() for r in rcpts), b"DATA"):
            reply = self.cmd(line)
            if reply[:1] not in (b"2", b"3"):
                return reply
        if not data.endswith(b"\r\n"):
            data += b"\r\n"
        stuffed = data.replace(b"\r\n.", b"\r\n..")
        if stuffed.startswith(b"."):
            stuffed = b"." + stuffed
        self.sock.sendall(stuffed + b".\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
            self.reply()
        except OSError:
            pass
        self.file.close()
        self.sock.close()


def send(port: int, source: str, sender: str, rcpts: list[str], data: bytes,
         helo: bytes = b"client.example.net") -> bytes:
    session = Session(port, source, helo)
    try:
        return session.send(sender, rcpts, data)
    finally:
        session.close()


def crlf(data: bytes) -> bytes:
    return re.sub(rb"\r?\n", b"\r\n", data)


# ------------------------------------------------------------------------------ reading


def maildir(srv: ServerProc, box: str = "alice") -> list[bytes]:
    new = srv.mail_dir / box / "new"
    if not new.is_dir():
        return []
    return [(new / name).read_bytes() for name in sorted(os.listdir(new))]


def header_fields(message: bytes) -> list[tuple[str, str]]:
    """(name, raw value with folding) of the header section, LF or CRLF line ends."""
    text = message.replace(b"\r\n", b"\n").decode("utf-8", "replace")
    out: list[tuple[str, str]] = []
    for line in text.split("\n"):
        if not line:
            break
        if line[:1] in " \t" and out:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line)
        else:
            name, _, value = line.partition(":")
            out.append((name.strip(), value))
    return out


def our_results(message: bytes) -> dict[str, list[tuple[str, str, list[tuple[str, str]]]]]:
    """What an RFC 8601 parser reads in our Authentication-Results and in every
    ARC-Authentication-Results: per field, (method, result, [(property, value)])."""
    out: dict[str, list[tuple[str, str, list[tuple[str, str]]]]] = {}
    for name, value in header_fields(message):
        unfolded = value.replace("\n", "")
        if name.lower() == "arc-authentication-results":
            unfolded = unfolded.partition(";")[2]
        elif name.lower() != "authentication-results":
            continue
        parsed = authres.AuthenticationResultsHeader.parse_value(unfolded)
        if parsed.authserv_id != AUTHSERV:
            continue
        out[name.lower()] = [
            (r.method, r.result,
             [(f"{p.type}.{p.name}", p.value) for p in getattr(r, "properties", [])])
            for r in parsed.results]
    return out


def our_received(message: bytes) -> str:
    for name, value in header_fields(message):
        if name == "Received" and "(pymta)" in value:
            return value
    raise AssertionError("no Received field of ours")


def dnsfunc_from_state(srv: ServerProc, domain: str = "example.com",
                       selector: str = "default"):
    """dkimpy ``dnsfunc`` publishing the key pymta generated in its state directory."""
    path = key_path(str(srv.state_dir), domain, selector)
    key = DkimKey(domain, selector, parse_private_key(path.read_bytes(), str(path)))
    record = key.txt_value().encode()

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return record if name.decode().rstrip(".") == key.record_name.rstrip(".") else None

    return dnsfunc


# ------------------------------------------------------------------------------ defect 1

FORGED_HELO = "evil.test;dkim=pass;dmarc=pass"
CEO_MESSAGE = (b"From: CEO <ceo@paypal.com>\r\nTo: <fwd@example.com>\r\n"
               b"Subject: wire the money\r\nMessage-ID: <d1@paypal.com>\r\n\r\n"
               b"Please wire the money today.\r\n")


def test_issue10_defect1_forged_results_in_helo_reach_neither_next_hop_nor_mailbox(
        mta: Callable[..., ServerProc], peer: tuple[Recorder, int]) -> None:
    srv = mta(SRS_ENABLE="no")
    reply = send(srv.port, OUTSIDE, "", ["fwd@example.com", "alice@example.com"], CEO_MESSAGE,
                 helo=FORGED_HELO.encode())
    assert reply.startswith(b"250 2.0.0"), reply
    recorder = peer[0]
    wait_until(lambda: recorder.received and maildir(srv), DELIVERY_TIMEOUT,
               what="the next hop and the mailbox")
    # the HELO is one property value (a token, percent-encoded: lossless); no dkim=pass or
    # dmarc=pass of its own
    expected = [("spf", "none", [("smtp.helo", "evil.test%3Bdkim%3Dpass%3Bdmarc%3Dpass")]),
                ("dkim", "none", []), ("arc", "none", []),
                ("dmarc", "none", [("header.from", "paypal.com")])]
    for where, message in (("next hop", recorder.received[0]), ("mailbox", maildir(srv)[0])):
        results = our_results(message)
        assert results["authentication-results"] == expected, (where, results)
        assert results["arc-authentication-results"] == expected, (where, results)
        received = our_received(message)
        assert received.count(";") == 1, received        # only the one before the date
        assert received.startswith(" from evil.test?dkim=pass?dmarc=pass (unknown "), received
        spf = dict(header_fields(message))["Received-SPF"]
        assert spf.startswith(" none (") and 'helo="evil.test;dkim=pass;dmarc=pass";' in spf
    # the seal is valid: what it vouches for is the safe rendering above
    cv, _, why = dkim.arc_verify(crlf(recorder.received[0]), dnsfunc=dnsfunc_from_state(srv))
    assert cv == dkim.CV_Pass, why


HOSTILE_HELOS = [
    "a(b)c;dkim=pass",
    'x"y\\z(;)' + "q" * 240,                 # 249 octets of printable junk
    "[192.0.2.1]",                           # an address literal: SPF none, shown as is
    "mail.example.net.",                     # a domain (trailing dot)
]


@pytest.mark.parametrize("helo", HOSTILE_HELOS)
def test_issue10_defect1_hostile_helo_stays_inside_header_syntax(
        mta: Callable[..., ServerProc], helo: str) -> None:
    srv = mta()
    message = (b"From: <sender@example.net>\r\nTo: <alice@example.com>\r\nSubject: helo\r\n\r\n"
               b"Hello.\r\n")
    reply = send(srv.port, OUTSIDE, "", ["alice@example.com"], message, helo=helo.encode())
    assert reply.startswith(b"250 2.0.0"), reply
    (stored,) = wait_until(lambda: maildir(srv), DELIVERY_TIMEOUT, what="the mailbox")
    header = stored.split(b"\n\n", 1)[0]
    assert all(len(line) <= 998 for line in header.split(b"\n"))
    received = our_received(stored)
    word = received.split()[1]
    assert not set(word) & set(";()\"\\"), received
    assert received.count(";") == 1 and received.rstrip().endswith("+0000"), received
    if helo in ("[192.0.2.1]", "mail.example.net."):
        assert word == helo
    results = our_results(stored)["authentication-results"]
    assert [(m, r) for m, r, _ in results] == [("spf", "none"), ("dkim", "none"),
                                                ("arc", "none"), ("dmarc", "none")], results
    assert results[0][2][0][0] == "smtp.helo"


# ------------------------------------------------------------------------------ defect 9

HANDMADE: dict[str, bytes] = {
    "Received-space-colon": (b"Received : from a.example by b.example; Mon, 1 Jan 2024 10:00:00"
                             b" +0000\r\nFrom: <sender@example.net>\r\nTo: <fwd@example.com>\r\n"
                             b"Subject: obsolete received\r\n\r\nHello.\r\n"),
    "Subject-space-colon": (b"From: <sender@example.net>\r\nTo: <fwd@example.com>\r\n"
                            b"Subject\t : obsolete subject\r\n\r\nHello.\r\n"),
    "first-line-not-a-field": (b"This is not a header field\r\nFrom: <sender@example.net>\r\n"
                               b"Subject: x\r\n\r\nHello.\r\n"),
    "no-empty-line": (b"From: <sender@example.net>\r\nTo: <fwd@example.com>\r\nSubject: x\r\n"
                      b"counter to RFC 5322 there is no separating line here\r\nHello.\r\n"),
    "no-From": b"To: <fwd@example.com>\r\nSubject: no from\r\n\r\nHello.\r\n",
    "forged-ARC-i=50": (b"ARC-Seal: i=50; cv=none; a=rsa-sha256; d=evil.test; s=x; b=AAAA\r\n"
                        b"From: <sender@example.net>\r\nTo: <fwd@example.com>\r\n"
                        b"Subject: arc i=50\r\n\r\nHello.\r\n"),
}
CORPUS_FILES = sorted(p.name for p in CORPUS.glob("*.eml"))


def _accepted_and_delivered(srv: ServerProc, recorder: Recorder,
                            messages: dict[str, bytes]) -> None:
    """Each message inbound (checks, ARC seal of the forwarded copy) and from our user
    (DKIM signing): 250 every time, and every copy delivered, content intact."""
    refused = []
    for name, data in messages.items():
        data = crlf(data)
        reply = send(srv.port, OUTSIDE, "sender@example.net",
                     ["fwd@example.com", "alice@example.com"], data)
        if not reply.startswith(b"250 2.0.0"):
            refused.append((name, "inbound", reply))
        reply = send(srv.port, INSIDE, "bob@example.com",
                     ["alice@example.com", "someone@remote.test"], data)
        if not reply.startswith(b"250 2.0.0"):
            refused.append((name, "our user", reply))
    assert refused == [], refused
    count = 2 * len(messages)
    wait_until(lambda: len(maildir(srv)) >= count and len(recorder.received) >= count,
               DELIVERY_TIMEOUT, what=f"{count} deliveries each to alice and the next hop")
    delivered = [m.replace(b"\r\n", b"\n") for m in maildir(srv)]
    relayed = [m.replace(b"\r\n", b"\n") for m in recorder.received]
    for name, data in messages.items():
        original = crlf(data).replace(b"\r\n", b"\n")
        original += b"" if original.endswith(b"\n") else b"\n"   # the client ends the line
        assert sum(m.endswith(original) for m in delivered) == 2, name
        assert sum(m.endswith(original) for m in relayed) == 2, name
    assert "Traceback" not in srv.stderr


def test_issue10_defect9_real_malformed_corpus_is_accepted_and_delivered(
        mta: Callable[..., ServerProc], peer: tuple[Recorder, int]) -> None:
    assert len(CORPUS_FILES) >= 15, CORPUS_FILES
    # one sample carries a real .jpg.exe in a zip: quarantined by the default banned-files
    # check (test_issue12_real_malware_sample_is_quarantined); this test is about headers
    srv = mta(PYMTA_BANNED_CHECK="no")
    _accepted_and_delivered(srv, peer[0],
                            {name: (CORPUS / name).read_bytes() for name in CORPUS_FILES})


def test_issue10_defect9_unparseable_header_sections_are_accepted_and_delivered(
        mta: Callable[..., ServerProc], peer: tuple[Recorder, int]) -> None:
    srv = mta()
    _accepted_and_delivered(srv, peer[0], HANDMADE)
    log = srv.stderr
    assert "failed: MessageFormatError" not in log and "arc-seal failed" not in log


def test_issue10_defect9_obsolete_received_above_a_signature_keeps_dkim_pass(
        mta: Callable[..., ServerProc], dns_zone: DNSTestServer) -> None:
    key = DkimKey("example.net", "obs1", generate_key("rsa", 2048))
    dns_zone.add(key.zone_line().replace("( ", "").replace(" )", ""))
    plain = (b"From: <sender@example.net>\r\nTo: <alice@example.com>\r\nSubject: signed\r\n"
             b"Message-ID: <obs1@example.net>\r\n\r\nSigned text.\r\n")
    relayed = (b"Received : from relay.example.org by gw.example.net; Mon, 1 Jan 2024 10:00:00"
               b" +0000\r\n" + sign_message(plain, key) + plain)
    srv = mta()
    reply = send(srv.port, OUTSIDE, "sender@example.net", ["alice@example.com"], relayed)
    assert reply.startswith(b"250 2.0.0"), reply
    (stored,) = wait_until(lambda: maildir(srv), DELIVERY_TIMEOUT, what="the mailbox")
    results = our_results(stored)["authentication-results"]
    dkim_results = [(r, dict(props).get("header.d")) for m, r, props in results if m == "dkim"]
    assert dkim_results == [("pass", "example.net")], results


# ------------------------------------------------------------------------------ hop count


@pytest.mark.parametrize("field", [b"Received :", b"RECEIVED\t:", b"received  :"])
def test_issue10_received_with_blanks_before_the_colon_counts_as_a_hop(
        mta: Callable[..., ServerProc], field: bytes) -> None:
    # no DKIM/ARC stages: this is about the count, not about defect 9's parse errors
    srv = mta(PYMTA_MAX_RECEIVED_HEADERS="3", PYMTA_DKIM_VERIFY="no", PYMTA_ARC="no",
              PYMTA_DKIM_SIGN="no")

    def message(hops: int) -> bytes:
        trace = b"".join(field + b" from hop%d.example.net by relay; Mon, 1 Jan 2024 10:00:00"
                         b" +0000\r\n" % i for i in range(hops))
        return trace + b"From: <sender@example.net>\r\nSubject: loop\r\n\r\nHello.\r\n"

    looping = send(srv.port, OUTSIDE, "sender@example.net", ["alice@example.com"], message(4))
    assert looping.startswith(b"554 5.4.6"), looping
    fine = send(srv.port, OUTSIDE, "sender@example.net", ["alice@example.com"], message(3))
    assert fine.startswith(b"250 2.0.0"), fine


# ------------------------------------------------------------------------------ trace field


def test_issue10_leading_blank_cannot_extend_our_received_field(
        mta: Callable[..., ServerProc]) -> None:
    """A message whose first line starts with a blank would continue *our* ``Received:``
    field (``by trusted.example (Authenticated sender: ceo)``); an empty line goes first, as
    in Postfix's smtpd, so that line is body text."""
    srv = mta()
    data = (b" by trusted.example (Authenticated sender: ceo)\r\n"
            b"From: <sender@example.net>\r\nSubject: trace\r\n\r\nHello.\r\n")
    reply = send(srv.port, OUTSIDE, "sender@example.net", ["alice@example.com"], data)
    assert reply.startswith(b"250 2.0.0"), reply
    (stored,) = wait_until(lambda: maildir(srv), DELIVERY_TIMEOUT, what="the mailbox")
    received = our_received(stored)
    assert "trusted.example" not in received and "ceo" not in received, received
    assert stored.replace(b"\r\n", b"\n").endswith(b"\n\n" + data.replace(b"\r\n", b"\n")), stored


# ------------------------------------------------------------------------------ issue 10 review


def server_cpu(srv: ServerProc) -> float:
    """CPU seconds (user + system) of the server process and its children so far."""
    total = 0.0
    pids = [srv.pid]
    children = Path(f"/proc/{srv.pid}/task/{srv.pid}/children")
    if children.exists():
        pids += [int(c) for c in children.read_text().split()]
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def open_data(srv: ServerProc) -> Session:
    session = Session(srv.port, OUTSIDE)
    for line in (b"MAIL FROM:<sender@example.net>", b"RCPT TO:<alice@example.com>", b"DATA"):
        reply = session.cmd(line)
        assert reply[:1] in (b"2", b"3"), reply
    return session


def test_issue10_review_folded_header_does_not_stall_other_clients(
        mta: Callable[..., ServerProc]) -> None:
    """``X-A: a`` and 250,000 lines `` b`` (1 MB, under the default header size limit),
    below a DKIM signature, every check on: the field splitter grew the field by ``+=``
    (quadratic, on the event loop, once per stage) and dkimpy's parser did the same in its
    thread. Before: the end of data was answered after 8.8 s and another client waited
    8.5 s for its greeting."""
    srv = mta()
    signature = (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.net;"
                 b" s=sel; h=from:subject; bh=AAAA; b=AAAA\r\n")
    data = (signature + b"From: <sender@example.net>\r\nX-A: a\r\n" + b" b\r\n" * 250_000
            + b"Subject: folded\r\n\r\nHello.\r\n.\r\n")
    session = open_data(srv)
    waited: list[float] = []

    def greeting() -> None:
        time.sleep(0.3)
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=60) as other:
            assert other.makefile("rb").readline().startswith(b"220")
        waited.append(time.monotonic() - start)

    try:
        session.sock.sendall(data)
        start = time.monotonic()
        other = threading.Thread(target=greeting)
        other.start()
        reply = session.reply()
        took = time.monotonic() - start
        other.join(60)
    finally:
        session.close()
    print(f"end of data answered after {took:.2f}s, greeting after {waited}s")
    assert reply.startswith(b"250 2.0.0"), reply
    assert took < 5.0, f"end of data answered after {took:.1f}s"
    assert waited and waited[0] < 1.0, f"another client waited {waited}s for its greeting"
    (stored,) = wait_until(lambda: maildir(srv), DELIVERY_TIMEOUT, what="the mailbox")
    assert stored.replace(b"\r\n", b"\n").split(b"\n").count(b" b") == 250_000


def test_issue10_review_long_header_line_costs_what_body_lines_cost(
        mta: Callable[..., ServerProc]) -> None:
    """``Subject:`` and a megabyte of ``x`` in 32-byte segments: the header scanner kept the
    unfinished line and prepended it to every read (before: 1.5 s of server CPU without a
    pause between segments, 3.6 s with one, against 0.4 s / 0.7 s for the same bytes as
    body lines)."""
    srv = mta()

    def cpu_for(head: bytes, unit: bytes) -> float:
        session = open_data(srv)
        session.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            session.sock.sendall(head)
            before = server_cpu(srv)
            for _ in range(1_000_000 // len(unit)):
                session.sock.sendall(unit)
                time.sleep(0)               # a syscall: the server reads ~one segment a time
            session.sock.sendall(b"\r\n\r\nbody\r\n.\r\n")
            reply = session.reply()
            used = server_cpu(srv) - before
        finally:
            session.close()
        assert reply.startswith(b"250 2.0.0"), reply
        return used

    body_lines = cpu_for(b"Subject: x\r\n\r\n", b"y" * 30 + b"\r\n")
    header_line = cpu_for(b"Subject: ", b"x" * 32)
    print(f"server CPU: body lines {body_lines:.2f}s, one header line {header_line:.2f}s")
    assert header_line < 1.5 * body_lines + 0.3, (
        f"one header line: {header_line:.2f}s of CPU, body lines: {body_lines:.2f}s")


def test_issue10_review_dkim_values_cannot_forge_log_lines(
        mta: Callable[..., ServerProc]) -> None:
    """dkimpy keeps the folding CRLF of a tag: ``d=evil.test<CRLF> <a log line>`` was looked
    up in DNS and put a line of the sender's choosing into the log (twice: the failed key
    lookup and the DKIM summary). Now the signature is ``neutral`` before any lookup, and
    no value can start a line of the log."""
    srv = mta()
    forged = (b"2026-12-06T09:00:00.000000+00:00 mx postfix/local[1]: 1ABCDEF: "
              b"to=<ceo@example.com>, relay=local, status=sent (forged)")
    data = (b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; s=sel;\r\n"
            b" d=evil.test\r\n " + forged + b"\r\n ;\r\n h=from; bh=AAAA; b=BBBB\r\n"
            b"From: <x@evil.test>\r\nSubject: t\r\n\r\nhi\r\n")
    reply = send(srv.port, OUTSIDE, "sender@example.net", ["alice@example.com"], data)
    assert reply.startswith(b"250 2.0.0"), reply
    qid = reply.split()[-1].decode()
    summary = wait_until(lambda: [line for line in srv.stderr.splitlines()
                                  if f"{qid}: dkim:" in line], 10, what="the DKIM log line")
    assert len(summary) == 1 and "neutral (d=evil.test%0D%0A" in summary[0], summary
    assert "d= value is not a domain name" in summary[0]
    assert not [line for line in srv.stderr.splitlines() if "postfix/local[1]:" in line[:60]]
    assert "evil.test" not in "".join(line for line in srv.stderr.splitlines()
                                      if "DKIM key lookup" in line)
