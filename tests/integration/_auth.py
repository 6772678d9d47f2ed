"""Helpers for the SMTP AUTH integration tests: a TLS-enabled config, a delivery agent that
records what the queue hands it, and raw/aiosmtplib/smtplib AUTH clients."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import shutil
import smtplib
import ssl
from collections.abc import Sequence
from pathlib import Path

import aiosmtplib

from pymta.app import MTA
from pymta.config.model import Config
from pymta.tls import selfsigned_paths
from pymta.types import Envelope, Outcome, OutcomeKind, QueuedMessage, Recipient, Reply
from tests.conftest import RawClient, make_config
from tests.integration._support import client_tls_context


def auth_config(tmp_path: Path, tls_pair: tuple[Path, Path], **overrides: object) -> Config:
    """make_config + SMTPD_USE_TLS with the shared self-signed pair + tiny AUTH delays."""
    base = make_config(tmp_path, smtpd_use_tls=True, auth_fail_delay=0.01,
                       auth_fail_delay_max=0.05)
    cfg = dataclasses.replace(base, **overrides)
    cert, key = selfsigned_paths(cfg)
    cert.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    shutil.copy(tls_pair[0], cert)
    shutil.copy(tls_pair[1], key)
    return cfg


class CaptureAgent:
    """Delivers nothing; records (envelope, body) of every message the queue hands over."""

    def __init__(self) -> None:
        self.messages: list[tuple[Envelope, list[Recipient], bytes]] = []

    async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        with open(msg.body_path, "rb") as fh:
            body = fh.read()
        self.messages.append((msg.envelope, list(rcpts), body))
        return [Outcome(r.address, OutcomeKind.DELIVERED, Reply(250, "2.0.0", "Ok"), "capture")
                for r in rcpts]


class CaptureRouter:
    def __init__(self) -> None:
        self.agent = CaptureAgent()

    def route(self, rcpt: Recipient) -> tuple[str, CaptureAgent]:
        return ("local" if rcpt.local else "relay"), self.agent


def b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


async def submission_client(mta: MTA, *, starttls: bool = True) -> RawClient:
    """A raw client on 587, after EHLO (and STARTTLS + EHLO again when asked)."""
    client = await RawClient.connect(*mta.addresses["submission"][0])
    assert (await client.reply())[0] == 220
    assert (await client.cmd("EHLO client.test"))[0] == 250
    if starttls:
        assert (await client.cmd("STARTTLS"))[0] == 220
        await asyncio.wait_for(client.writer.start_tls(client_tls_context()), 5.0)
        assert (await client.cmd("EHLO client.test"))[0] == 250
    return client


async def raw_plain(mta: MTA, user: str, password: str) -> tuple[int, str]:
    """AUTH PLAIN on a fresh 587 connection after STARTTLS; the reply."""
    client = await submission_client(mta)
    try:
        return await client.cmd("AUTH PLAIN " + b64(f"\0{user}\0{password}"))
    finally:
        await client.close()


async def aiosmtplib_login(mta: MTA, user: str, password: str, *, mechanism: str = "PLAIN",
                           implicit: bool = True) -> tuple[int, str]:
    """(code, message) of an aiosmtplib AUTH on 465 (implicit TLS) or 587 (STARTTLS)."""
    kind = "submissions" if implicit else "submission"
    host, port = mta.addresses[kind][0]
    smtp = aiosmtplib.SMTP(hostname=host, port=port, use_tls=implicit,
                           start_tls=not implicit, tls_context=client_tls_context(),
                           timeout=15)
    await smtp.connect()
    try:
        await smtp.ehlo()
        method = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login,
                  "CRAM-MD5": smtp.auth_crammd5}[mechanism]
        try:
            response = await method(user, password)
        except aiosmtplib.SMTPAuthenticationError as exc:
            return exc.code, exc.message
        except aiosmtplib.SMTPResponseException as exc:
            return exc.code, exc.message
        return response.code, response.message
    finally:
        try:
            await smtp.quit()
        except aiosmtplib.SMTPException:
            smtp.close()


def smtplib_login(host: str, port: int, user: str, password: str, *,
                  mechanism: str = "PLAIN", implicit: bool = False) -> tuple[int, str]:
    """The stdlib client (run it in a thread: the server shares the test's event loop)."""
    ctx = client_tls_context()
    smtp: smtplib.SMTP
    if implicit:
        smtp = smtplib.SMTP_SSL(host, port, context=ctx, timeout=15)
    else:
        smtp = smtplib.SMTP(host, port, timeout=15)
        smtp.starttls(context=ctx)
    try:
        smtp.ehlo("client.test")
        smtp.user, smtp.password = user, password
        try:
            code, text = smtp.auth(mechanism, getattr(smtp, "auth_" + mechanism.lower()
                                                      .replace("-", "_")),
                                   initial_response_ok=True)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        return code, text.decode()
    finally:
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError, ssl.SSLError):
            smtp.close()
