"""REQUIRETLS (RFC 8689) and ``TLS-Required: No`` as a client sees them, issue 15.

Real clients (smtplib, aiosmtplib) against the server: REQUIRETLS is offered only once the
session is TLS-protected (after STARTTLS on 25 and 587, from the start on 465), refused with
``530 5.7.0`` in cleartext; a message sent with it, or with a ``TLS-Required: No`` header
field, is queued with its flag, which ``pymta queue`` shows and which a restart of the server
(the queue read again) keeps, in either queue store.

Local mail goes to an LMTP port nothing listens on (``VIRTUAL_TRANSPORT``), so each message
stays in the queue, deferred, for as long as the test looks at it.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
import ssl
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import serverproc
from serverproc import ServerProc, free_port, make_message, queued_id, wait_until

from pymta.app import MTA
from pymta.tls import ensure_selfsigned
from tests.conftest import make_config, wait_for
from tests.integration._auth import CaptureRouter, auth_config
from tests.integration._support import client_tls_context

server_factory = serverproc.server_factory_each_store  # the fixture, once per queue store

SENDER = "sender@client.test"
RCPT = "alice@example.com"
PASSWORD = "passwd1"


def tls_server(factory: Any, name: str) -> ServerProc:
    """A ``pymta serve`` with STARTTLS (its self-signed pair) whose local mail is deferred."""
    srv: ServerProc = factory(name, SMTPD_USE_TLS="yes",
                              VIRTUAL_TRANSPORT=f"lmtp:127.0.0.1:{free_port()}",
                              PYMTA_RETRY_FIRST="30", PYMTA_RETRY_MAX="60")
    srv.start()
    return srv


def send(srv: ServerProc, data: bytes, *, starttls: bool = True,
         mail_options: tuple[str, ...] = ()) -> str:
    """One message with smtplib (STARTTLS first unless told not to); its queue id."""
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as smtp:
        if starttls:
            smtp.starttls(context=client_tls_context())
        smtp.ehlo()
        code, text = smtp.mail(SENDER, list(mail_options))
        assert code == 250, text
        assert smtp.rcpt(RCPT)[0] == 250
        code, reply = smtp.data(data)
        assert code == 250, reply
        return queued_id(reply.decode())


def show(srv: ServerProc, qid: str) -> str:
    out: str = srv.cli("queue", "show", qid, check=True).stdout
    return out


def entry(srv: ServerProc, qid: str) -> dict[str, Any]:
    found = srv.queue_entry(qid)
    assert found is not None, f"{qid} not in the queue"
    return found


# ----------------------------------------------------------------------- port 25, STARTTLS


def test_issue15_requiretls_advertised_only_after_starttls_and_refused_in_cleartext(
        server_factory: Any) -> None:
    srv = tls_server(server_factory, "offer")
    with smtplib.SMTP("127.0.0.1", srv.port, local_hostname="client.test", timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("starttls") and not smtp.has_extn("requiretls")
        code, text = smtp.mail(SENDER, ["REQUIRETLS"])
        assert (code, text) == (530, b"5.7.0 Must issue a STARTTLS command first")
        code, text = smtp.rcpt(RCPT)
        assert code == 503, text               # the refused MAIL began no transaction
        smtp.rset()
        smtp.starttls(context=client_tls_context())
        smtp.ehlo()
        assert smtp.has_extn("requiretls") and not smtp.has_extn("starttls")
        assert isinstance(smtp.sock, ssl.SSLSocket)
        code, text = smtp.mail(SENDER, ["REQUIRETLS", "REQUIRETLS"])
        assert (code, text) == (501, b"5.5.4 Duplicate REQUIRETLS parameter")
        code, text = smtp.mail(SENDER, ["REQUIRETLS=YES"])
        assert (code, text) == (501, b"5.5.4 REQUIRETLS takes no value")
        assert smtp.mail(SENDER, ["REQUIRETLS"])[0] == 250
        smtp.rset()
    assert srv.running and "Traceback" not in srv.stderr
    assert srv.cli("queue", "list", "--json", check=True).stdout.strip() == "[]"


def test_issue15_requiretls_queued_shown_and_kept_across_a_restart(
        server_factory: Any) -> None:
    srv = tls_server(server_factory, "queue")
    # REQUIRETLS wins over a TLS-Required: No field in the same message (RFC 8689 §4.1)
    tagged = send(srv, make_message(SENDER, RCPT, "needs tls",
                                    extra_headers={"TLS-Required": "No"}),
                  mail_options=("REQUIRETLS",))
    plain = send(srv, make_message(SENDER, RCPT, "no flag"))
    wait_until(lambda: entry(srv, tagged)["last_error"] and entry(srv, plain)["last_error"],
               20, 0.2, "both messages to be deferred")

    def check() -> None:
        first, second = entry(srv, tagged), entry(srv, plain)
        assert (first["requiretls"], first["tls_optional"]) == (True, False)
        assert (second["requiretls"], second["tls_optional"]) == (False, False)
        assert "tls:          REQUIRETLS" in show(srv, tagged)
        assert "tls:          -" in show(srv, plain)
        listing = srv.cli("queue", "list", check=True).stdout
        assert f"<{SENDER}> (REQUIRETLS)" in listing
        assert listing.count("(REQUIRETLS)") == 1

    check()
    assert srv.stop() == 0
    srv.start()                 # the queue read again from disk, by a new process
    check()


def test_issue15_tls_required_no_sets_the_flag(server_factory: Any) -> None:
    srv = tls_server(server_factory, "optional")
    # in cleartext too: the field is the sender's choice, not the session's (RFC 8689 §4.1)
    folded = send(srv, make_message(SENDER, RCPT, "relaxed", extra_headers={
        "TLS-Required": "\r\n no"}), starttls=False)
    other = send(srv, make_message(SENDER, RCPT, "unknown value",
                                   extra_headers={"TLS-Required": "Yes"}))
    wait_until(lambda: entry(srv, folded)["last_error"], 20, 0.2, "a deferral")
    assert (entry(srv, folded)["tls_optional"], entry(srv, folded)["requiretls"]) == \
        (True, False)
    assert entry(srv, other)["tls_optional"] is False
    assert "tls:          TLS-Required: No" in show(srv, folded)
    assert "Subject: relaxed" in show(srv, folded)
    assert srv.stop() == 0
    srv.start()
    assert entry(srv, folded)["tls_optional"] is True
    data = json.loads(srv.cli("queue", "list", "--json", check=True).stdout)
    assert sorted(e["tls_optional"] for e in data) == [False, True]


# ------------------------------------------------------ submission: 587 STARTTLS, 465 TLS


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_selfsigned(make_config(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def router() -> CaptureRouter:
    return CaptureRouter()


@pytest.fixture
async def mta(tmp_path: Path, tls_pair: tuple[Path, Path],
              router: CaptureRouter) -> AsyncIterator[MTA]:
    config = auth_config(tmp_path, tls_pair, smtpd_sasl_clientauth=f"client1:{{plain}}{PASSWORD}")
    async with MTA(config, router=router) as server:
        yield server


def message(to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "client1@example.com"
    msg["To"] = to
    msg["Subject"] = "sent with REQUIRETLS"
    msg.set_content("Only over TLS, please.\n")
    return msg


async def test_issue15_requiretls_on_implicit_tls_reaches_the_delivery_side(
        mta: MTA, router: CaptureRouter) -> None:
    host, port = mta.addresses["submissions"][0]
    smtp = aiosmtplib.SMTP(hostname=host, port=port, use_tls=True,
                           tls_context=client_tls_context(), timeout=15)
    await smtp.connect()
    try:
        await smtp.ehlo()
        assert smtp.supports_extension("requiretls")
        await smtp.login("client1", PASSWORD)
        errors, reply = await smtp.send_message(message("friend@foreign.example"),
                                                mail_options=["REQUIRETLS"])
        assert not errors and "Ok: queued as" in reply, reply
    finally:
        await smtp.quit()
    await wait_for(lambda: router.agent.messages)
    envelope, _, _ = router.agent.messages[0]
    assert envelope.requiretls and not envelope.tls_optional
    assert envelope.protocol == "ESMTPSA"


async def test_issue15_requiretls_on_submission_only_after_starttls(mta: MTA) -> None:
    host, port = mta.addresses["submission"][0]
    smtp = aiosmtplib.SMTP(hostname=host, port=port, start_tls=False, timeout=15)
    await smtp.connect()
    try:
        await smtp.ehlo()
        assert smtp.supports_extension("starttls")
        assert not smtp.supports_extension("requiretls")
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
            await smtp.mail("client1@example.com", options=["REQUIRETLS"])
        assert refused.value.code == 530
        await smtp.starttls(tls_context=client_tls_context())
        await smtp.ehlo()
        assert smtp.supports_extension("requiretls")
        assert (await smtp.mail("client1@example.com", options=["REQUIRETLS"])).code == 250
        await smtp.rset()
    finally:
        await asyncio.wait_for(smtp.quit(), 10)
