"""Helpers shared by the real-client integration tests (real sockets, real mailboxes)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import mailbox
import os
import re
import smtplib
import socket
import socketserver
import ssl
import threading
from collections.abc import Sequence
from typing import Any, Self

from pymta.app import MTA
from pymta.types import Outcome, OutcomeKind, QueuedMessage, Recipient, Reply
from tests.conftest import wait_for

QUEUED_RE = re.compile(r"queued as ([0-9A-Za-z]+)")


class ThreadedPeer:
    """A next hop on 127.0.0.1 that speaks raw SMTP on blocking sockets, one thread per
    connection, independent of the event loop of the server under test. A subclass writes
    ``_session(rfile, wfile)``; a client that goes away mid-session ends it quietly."""

    def __init__(self, port: int = 0) -> None:
        peer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                with contextlib.suppress(OSError):
                    peer._session(self.rfile, self.wfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", port), Handler)
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> Self:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _session(self, rfile: Any, wfile: Any) -> None:
        raise NotImplementedError


def client_tls_context() -> ssl.SSLContext:
    """What an opportunistic SMTP client uses: encrypt, but do not verify the certificate."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


@functools.cache
def client_name(ip: str = "127.0.0.1") -> str:
    """What ``Received:`` and the log lines call a client at ``ip`` (IPv4) by default
    (``PYMTA_PEERNAME_LOOKUP=yes``, no ``PYMTA_DNS_RESOLVER``): the host resolver's name for
    it (``localhost`` for 127.0.0.1 from /etc/hosts on most machines) when that name
    resolves back to ``ip``, else ``unknown``. Asked of the host here, not of pymta."""
    try:
        name = socket.getnameinfo((ip, 0), socket.NI_NAMEREQD)[0]
        infos = socket.getaddrinfo(name, None, family=socket.AF_INET, type=socket.SOCK_STREAM)
    except OSError:
        return "unknown"
    confirmed = any(info[4][0] == ip for info in infos)
    return name.lower().rstrip(".") if confirmed else "unknown"


def smtp_address(mta: MTA) -> tuple[str, int]:
    return mta.addresses["smtp"][0]


def queued_id(reply_text: str | bytes) -> str:
    """The queue id from a ``250 2.0.0 Ok: queued as <qid>`` reply."""
    text = reply_text.decode() if isinstance(reply_text, bytes) else reply_text
    m = QUEUED_RE.search(text)
    assert m, f"no queue id in reply {text!r}"
    return m.group(1)


# ---------------------------------------------------------------------- mailboxes


def maildir_bytes(mail_dir: str, box: str) -> list[bytes]:
    """Every message of a maildir, raw, in delivery order (stdlib ``mailbox.Maildir``)."""
    path = os.path.join(mail_dir, box)
    if not all(os.path.isdir(os.path.join(path, sub)) for sub in ("tmp", "new", "cur")):
        return []
    md = mailbox.Maildir(path, factory=None, create=False)
    try:
        return [md.get_bytes(key) for key in sorted(md.keys(), key=_maildir_order)]
    finally:
        md.close()


def _maildir_order(key: str) -> tuple[int, ...]:
    """Delivery order from a ``<sec>.M<usec>P<pid>Q<n>.<host>`` unique name."""
    m = re.match(r"(\d+)\.M(\d+)P(\d+)Q(\d+)", key)
    return tuple(int(g) for g in m.groups()) if m else (0,)


def mbox_bytes(mail_dir: str, box: str) -> list[bytes]:
    """Every message of an mbox file, raw, without the ``From `` separator line."""
    path = os.path.join(mail_dir, box)
    if not os.path.exists(path):
        return []
    mb = mailbox.mbox(path, create=False)
    try:
        return [mb.get_bytes(key) for key in mb.iterkeys()]
    finally:
        mb.close()


def mbox_from_lines(mail_dir: str, box: str) -> list[str]:
    mb = mailbox.mbox(os.path.join(mail_dir, box), create=False)
    try:
        return [mb.get_message(k).get_from() for k in mb.iterkeys()]
    finally:
        mb.close()


async def wait_maildir(mail_dir: str, box: str, count: int = 1,
                       timeout: float = 10.0) -> list[bytes]:
    return await wait_for(lambda: (len(m := maildir_bytes(mail_dir, box)) >= count) and m,
                          timeout=timeout)


async def wait_mbox(mail_dir: str, box: str, count: int = 1,
                    timeout: float = 10.0) -> list[bytes]:
    return await wait_for(lambda: (len(m := mbox_bytes(mail_dir, box)) >= count) and m,
                          timeout=timeout)


async def wait_queue_empty(mta: MTA, timeout: float = 10.0) -> None:
    await wait_for(lambda: not mta.store.ids(), timeout=timeout)


# Fields pymta puts above the client's message: local delivery's, the pipeline's, ours.
ADDED_FIELDS = (b"Return-Path", b"Delivered-To", b"Authentication-Results", b"Received-SPF",
                b"DKIM-Signature", b"ARC-Seal", b"ARC-Message-Signature",
                b"ARC-Authentication-Results", b"Received")


def split_delivered(stored: bytes) -> tuple[list[bytes], bytes]:
    """Split a delivered (LF) message into the header lines local delivery and the server
    prepended (Return-Path, Delivered-To, the pipeline's trace fields such as
    Authentication-Results, then our Received with its continuation lines) and the rest.
    """
    lines = stored.split(b"\n")
    added: list[bytes] = []
    i = 0
    while i < len(lines) and lines[i].split(b":", 1)[0] in ADDED_FIELDS:
        field = lines[i]
        i += 1
        while i < len(lines) and lines[i][:1] in (b"\t", b" "):
            field += b"\n" + lines[i]
            i += 1
        added.append(field)
        if field.startswith(b"Received:"):
            break  # only our own Received; the client's headers follow
    return added, b"\n".join(lines[i:])


def lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# ---------------------------------------------------------------------- smtplib (blocking)


def smtplib_send(host: str, port: int, sender: str, rcpts: Sequence[str], data: bytes, *,
                 helo: str = "client.example.net", starttls: bool = False,
                 use_helo: bool = False, mail_options: Sequence[str] = (),
                 rcpt_options: Sequence[str] = ()) -> dict[str, object]:
    """One transaction with ``smtplib``; run it in a thread (the server shares our loop).

    Returns the DATA reply and, under TLS, the negotiated version and cipher as seen by the
    client, so tests can compare them with the ``Received:`` header.
    """
    out: dict[str, object] = {}
    with smtplib.SMTP(host, port, local_hostname=helo, timeout=10) as smtp:
        if use_helo:
            code, _ = smtp.helo()
            assert code == 250
        else:
            smtp.ehlo()
        if starttls:
            assert smtp.has_extn("starttls")
            code, _ = smtp.starttls(context=client_tls_context())
            assert code == 220
            smtp.ehlo()
            sock = smtp.sock
            assert isinstance(sock, ssl.SSLSocket)
            out["tls_version"] = sock.version()
            out["tls_cipher"] = sock.cipher()
        code, resp = smtp.mail(sender, list(mail_options))
        assert code == 250, resp
        for r in rcpts:
            code, resp = smtp.rcpt(r, list(rcpt_options))
            assert code == 250, (r, code, resp)
        code, resp = smtp.data(data)
        out["data_reply"] = (code, resp.decode())
    return out


# ---------------------------------------------------------------------- delivery agents


class ScriptedAgent:
    """A DeliveryAgent answering fixed outcomes for some recipients and delegating the rest
    to a real agent (normally ``LocalDeliveryAgent``). ``calls`` counts attempts per address.
    """

    def __init__(self, real: object, script: dict[str, tuple[OutcomeKind, Reply]]) -> None:
        self.real = real
        self.script = {k.lower(): v for k, v in script.items()}
        self.calls: dict[str, int] = {}

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        rest: list[Recipient] = []
        for r in rcpts:
            key = r.address.lower()
            self.calls[key] = self.calls.get(key, 0) + 1
            if key in self.script:
                kind, reply = self.script[key]
                outcomes.append(Outcome(r.address, kind, reply, "local"))
            else:
                rest.append(r)
        if rest:
            outcomes += await self.real.deliver(msg, rest)  # type: ignore[attr-defined]
        return outcomes


class OneAgentRouter:
    """A Router sending every recipient to one agent."""

    def __init__(self, agent: object) -> None:
        self.agent = agent

    def route(self, rcpt: Recipient) -> tuple[str, object]:
        return "local", self.agent


async def run_subprocess(*argv: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """Run a client program without blocking the event loop the server runs in."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def our_received(stored: bytes) -> str:
    """Our ``Received:`` field of a delivered message, unfolded to one line."""
    added, _ = split_delivered(stored)
    fields = [f for f in added if f.startswith(b"Received:")]
    assert fields, f"no Received header in {stored[:300]!r}"
    return re.sub(r"\n[ \t]+", " ", fields[0].decode())
