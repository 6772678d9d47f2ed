"""SMTP AUTH over real sockets with the password-file method (``SMTPD_SASL_CLIENTAUTH``):
TLS gating on 587, implicit TLS on 465, no AUTH on 25, PLAIN/LOGIN/CRAM-MD5 with aiosmtplib
and smtplib, the failure delay, relay policy (AUTH, MYNETWORKS), and no password in any log.

The directory, database and IMAP methods are in ``test_auth_backends.py``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from pymta.app import MTA
from pymta.backends.passwd import hash_password
from pymta.tls import ensure_selfsigned
from tests.conftest import RawClient, make_config, wait_for
from tests.integration._auth import (
    CaptureRouter,
    aiosmtplib_login,
    auth_config,
    b64,
    raw_plain,
    smtplib_login,
    submission_client,
)
from tests.integration._support import client_tls_context

PW2 = "Tr0ub4dor&3 with spaces"
CLIENTAUTH = ("client1:{plain}passwd1 "
              f"client2:{hash_password(PW2, 'SHA512-CRYPT')} "
              f"client3:{hash_password('argon-pw', 'ARGON2ID')}")


@pytest.fixture(scope="module")
def tls_pair(tmp_path_factory) -> tuple[Path, Path]:
    return ensure_selfsigned(make_config(tmp_path_factory.mktemp("tls")))


@pytest.fixture
def router() -> CaptureRouter:
    return CaptureRouter()


@pytest.fixture
async def mta(tmp_path, tls_pair, router):
    config = auth_config(tmp_path, tls_pair, smtpd_sasl_clientauth=CLIENTAUTH)
    async with MTA(config, router=router) as server:
        yield server


# ------------------------------------------------------------------------------ offering AUTH


async def test_auth_not_offered_before_starttls_on_587_and_refused(mta: MTA) -> None:
    client = await submission_client(mta, starttls=False)
    try:
        code, text = await client.cmd("EHLO client.test")
        assert "STARTTLS" in text and "AUTH" not in text
        code, text = await client.cmd("AUTH PLAIN " + b64("\0client1\0passwd1"))
        assert code == 530 and "5.7.0" in text
        code, text = await client.cmd("AUTH LOGIN")
        assert code == 530
        assert (await client.cmd("STARTTLS"))[0] == 220
        await asyncio.wait_for(client.writer.start_tls(client_tls_context()), 5.0)
        code, text = await client.cmd("EHLO client.test")
        assert "250-AUTH PLAIN LOGIN\r\n" in text      # no CRAM-MD5: hashed entries
        code, text = await client.cmd("AUTH PLAIN " + b64("\0client1\0passwd1"))
        assert (code, text) == (235, "235 2.7.0 Authentication successful\r\n")
    finally:
        await client.close()


async def test_port_25_never_offers_or_accepts_auth(mta: MTA) -> None:
    client = await RawClient.connect(*mta.addresses["smtp"][0])
    try:
        await client.reply()
        await client.cmd("EHLO client.test")
        assert (await client.cmd("STARTTLS"))[0] == 220
        await asyncio.wait_for(client.writer.start_tls(client_tls_context()), 5.0)
        code, text = await client.cmd("EHLO client.test")
        assert "AUTH" not in text
        code, text = await client.cmd("AUTH PLAIN " + b64("\0client1\0passwd1"))
        assert code == 502
    finally:
        await client.close()


async def test_no_submission_ports_without_a_sasl_method(tmp_path, tls_pair) -> None:
    async with MTA(auth_config(tmp_path, tls_pair)) as server:
        assert "submission" not in server.addresses
        assert "submissions" not in server.addresses


# ------------------------------------------------------------------------------ mechanisms


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("implicit", [True, False], ids=["465", "587"])
async def test_aiosmtplib_right_and_wrong_password(mta: MTA, mechanism: str,
                                                   implicit: bool) -> None:
    for user, password in (("client1", "passwd1"), ("client2", PW2)):
        code, message = await aiosmtplib_login(mta, user, password, mechanism=mechanism,
                                               implicit=implicit)
        assert code == 235, message
    code, message = await aiosmtplib_login(mta, "client1", "passwd2", mechanism=mechanism,
                                           implicit=implicit)
    assert code == 535 and "5.7.8" in message
    code, message = await aiosmtplib_login(mta, "nobody", "passwd1", mechanism=mechanism,
                                           implicit=implicit)
    assert code == 535


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
@pytest.mark.parametrize("implicit", [True, False], ids=["465", "587"])
async def test_smtplib_right_and_wrong_password(mta: MTA, mechanism: str,
                                                implicit: bool) -> None:
    host, port = mta.addresses["submissions" if implicit else "submission"][0]
    assert await asyncio.to_thread(smtplib_login, host, port, "client3", "argon-pw",
                                   mechanism=mechanism, implicit=implicit) == (
        235, "2.7.0 Authentication successful")
    code, text = await asyncio.to_thread(smtplib_login, host, port, "client3", "wrong",
                                         mechanism=mechanism, implicit=implicit)
    assert code == 535 and "5.7.8" in text


async def test_user_name_is_normalised_like_dovecot(mta: MTA) -> None:
    # DOVECOT_AUTH_USERNAME_FORMAT defaults to Dovecot's %Lu: the name is lower-cased
    assert (await raw_plain(mta, "CLIENT1", "passwd1"))[0] == 235


async def test_cram_md5_only_when_every_secret_is_plaintext(tmp_path, tls_pair) -> None:
    config = auth_config(tmp_path, tls_pair,
                         smtpd_sasl_clientauth="client1:{plain}passwd1 c2:{PLAIN}x")
    async with MTA(config) as server:
        client = await submission_client(server)
        code, text = await client.cmd("EHLO client.test")
        assert "AUTH PLAIN LOGIN CRAM-MD5" in text
        await client.close()
        assert (await aiosmtplib_login(server, "client1", "passwd1",
                                       mechanism="CRAM-MD5"))[0] == 235
        assert (await aiosmtplib_login(server, "client1", "nope",
                                       mechanism="CRAM-MD5"))[0] == 535
        host, port = server.addresses["submission"][0]
        assert (await asyncio.to_thread(smtplib_login, host, port, "client1", "passwd1",
                                        mechanism="CRAM-MD5"))[0] == 235


async def test_exchange_cancel_and_bad_base64(mta: MTA) -> None:
    client = await submission_client(mta)
    try:
        assert (await client.cmd("AUTH LOGIN"))[0] == 334
        code, text = await client.cmd("*")
        assert code == 501 and "5.0.0" in text
        assert (await client.cmd("AUTH PLAIN"))[0] == 334
        code, text = await client.cmd("%%%not-base64")
        assert code == 501 and "5.5.2" in text
        assert (await client.cmd("AUTH PLAIN"))[0] == 334
        code, text = await client.cmd("A" * 20000)
        assert code == 500 and "5.5.6" in text
        code, _ = await client.cmd("AUTH PLAIN " + b64("\0client1\0passwd1"))
        assert code == 235
    finally:
        await client.close()


async def test_failure_delay_grows_per_client(tmp_path, tls_pair) -> None:
    config = auth_config(tmp_path, tls_pair, smtpd_sasl_clientauth=CLIENTAUTH,
                         auth_fail_delay=0.2, auth_fail_delay_max=0.4)
    async with MTA(config) as server:
        client = await submission_client(server)
        timings = []
        for _ in range(3):
            start = time.monotonic()
            code, _ = await client.cmd("AUTH PLAIN " + b64("\0client1\0bad"))
            timings.append(time.monotonic() - start)
            assert code == 535
        assert timings[0] >= 0.18                        # 0.2 × 1
        assert timings[1] >= 0.38 and timings[2] >= 0.38  # 0.2 × 2, then the 0.4 cap
        assert timings[2] < 1.0                           # capped, not 0.6
        # other sessions are not held up meanwhile (asyncio.sleep, not a blocking wait)
        other = await submission_client(server)
        task = asyncio.create_task(client.cmd("AUTH PLAIN " + b64("\0client1\0bad")))
        await asyncio.sleep(0.02)
        start = time.monotonic()
        assert (await other.cmd("NOOP"))[0] == 250
        assert time.monotonic() - start < 0.3
        assert (await task)[0] == 535
        # a right password is answered at once
        start = time.monotonic()
        assert (await other.cmd("AUTH PLAIN " + b64("\0client1\0passwd1")))[0] == 235
        assert time.monotonic() - start < 0.3
        await client.close()
        await other.close()


# ------------------------------------------------------------------------------ relay policy


def _message(to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "client1@example.com"
    msg["To"] = to
    msg["Subject"] = "relay test"
    msg.set_content("Hello from an authenticated client.\n")
    return msg


async def test_relay_after_auth_is_accepted_and_recorded(mta: MTA,
                                                         router: CaptureRouter) -> None:
    host, port = mta.addresses["submissions"][0]
    errors, reply = await aiosmtplib.send(
        _message("friend@foreign.example"), hostname=host, port=port, use_tls=True,
        tls_context=client_tls_context(), username="client2", password=PW2)
    assert not errors and "Ok: queued as" in reply, reply
    await wait_for(lambda: router.agent.messages)
    envelope, rcpts, body = router.agent.messages[0]
    assert envelope.auth_user == "client2"
    assert envelope.protocol == "ESMTPSA"
    assert [(r.address, r.local) for r in rcpts] == [("friend@foreign.example", False)]
    head = body.split(b"\r\n\r\n", 1)[0].decode()
    assert "(Authenticated sender: client2)" in head
    assert " with ESMTPSA id " in head


async def test_relay_refused_without_auth(mta: MTA) -> None:
    for kind in ("submission", "smtp"):
        if kind == "submission":
            client = await submission_client(mta)
        else:
            client = await RawClient.connect(*mta.addresses["smtp"][0])
            await client.reply()
            await client.cmd("EHLO client.test")
        try:
            assert (await client.cmd("MAIL FROM:<client1@example.com>"))[0] == 250
            code, text = await client.cmd("RCPT TO:<friend@foreign.example>")
            assert code == 554 and "5.7.1" in text and "Relay access denied" in text
            assert (await client.cmd("RCPT TO:<alice@example.com>"))[0] == 250  # local: fine
        finally:
            await client.close()
    # a failed AUTH does not open the relay either
    client = await submission_client(mta)
    try:
        assert (await client.cmd("AUTH PLAIN " + b64("\0client1\0wrong")))[0] == 535
        await client.cmd("MAIL FROM:<client1@example.com>")
        assert (await client.cmd("RCPT TO:<friend@foreign.example>"))[0] == 554
    finally:
        await client.close()


async def test_mynetworks_client_may_relay_without_auth(tmp_path, tls_pair) -> None:
    router = CaptureRouter()
    config = auth_config(tmp_path, tls_pair, mynetworks=("127.0.0.0/8",))
    async with MTA(config, router=router) as server:
        host, port = server.addresses["smtp"][0]
        errors, reply = await aiosmtplib.send(_message("friend@foreign.example"),
                                              hostname=host, port=port, start_tls=False)
        assert not errors, errors
        await wait_for(lambda: router.agent.messages)
        envelope, rcpts, _ = router.agent.messages[0]
        assert envelope.auth_user is None and not rcpts[0].local
    config = auth_config(tmp_path / "other", tls_pair, mynetworks=("192.0.2.0/24",))
    async with MTA(config) as server:
        host, port = server.addresses["smtp"][0]
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await aiosmtplib.send(_message("friend@foreign.example"), hostname=host,
                                  port=port, start_tls=False)


# ------------------------------------------------------------------------------ logs


def secret_forms(user: str, password: str) -> list[str]:
    """The password and every encoding of it a client sends (PLAIN blob, LOGIN line)."""
    return [password, b64(password), b64(f"\0{user}\0{password}"),
            b64(f"{user}\0{user}\0{password}"),
            base64.b64encode(password.encode()).decode().rstrip("=")]


def assert_no_secret(records: list[logging.LogRecord], secrets: list[str]) -> None:
    assert records, "nothing was logged: the test would prove nothing"
    for record in records:
        text = record.getMessage()
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        for secret in secrets:
            assert secret not in text, (record.name, text)


async def test_no_password_in_any_log_line(tmp_path, tls_pair, caplog) -> None:
    """SYSLOG_LEVEL=7: every logger at DEBUG, a full AUTH session of every kind."""
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pymta")
    password = "S3cr3t-Pässword"
    config = auth_config(tmp_path, tls_pair, syslog_level=7,
                         smtpd_sasl_clientauth=f"client1:{{PLAIN}}{password}")
    async with MTA(config, router=CaptureRouter()) as server:
        client = await submission_client(server)
        await client.cmd("AUTH PLAIN " + b64(f"\0client1\0{password}x"))      # wrong
        await client.cmd("AUTH LOGIN " + b64("client1"))
        await client.cmd(b64(password + "y"))                               # wrong
        await client.cmd("AUTH PLAIN")
        await client.cmd(b64(f"client1\0client1\0{password}"))              # right
        await client.cmd("MAIL FROM:<client1@example.com>")
        await client.cmd("RCPT TO:<friend@foreign.example>")
        await client.cmd("DATA")
        await client.cmd(b"Subject: x\r\n\r\nbody\r\n.\r\n")
        await client.cmd("QUIT")
        await client.close()
        assert (await aiosmtplib_login(server, "client1", password, mechanism="LOGIN"))[0] \
            == 235
        assert (await aiosmtplib_login(server, "client1", password + "z"))[0] == 535
        assert (await aiosmtplib_login(server, "client1", password,
                                       mechanism="CRAM-MD5"))[0] == 235
    assert any("sasl_username=client1" in r.getMessage() for r in caplog.records)
    assert_no_secret(caplog.records, secret_forms("client1", password)
                     + secret_forms("client1", password + "x"))
