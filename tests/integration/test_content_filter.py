"""Issue 12: the content filter in a running server, with real clamd, spamd and rspamd.

What a mail administrator of the image sees: infected mail is not delivered and sits in the
quarantine; spam gets amavis's X-Spam-* fields (and a forged ``X-Spam-Flag: NO`` is gone);
each FINAL_*_DESTINY does what the image's README says; a scanner that is down defers mail
(or passes it, by the stated policy); mail a trusted client sends out is scanned for viruses
only. The GTUBE and EICAR strings are joined at run time (tests/services).
"""

from __future__ import annotations

import asyncio
import email
import email.utils
import logging
from pathlib import Path

import aiosmtplib
import pytest

from pymta.app import MTA
from pymta.queue import quarantine
from tests.conftest import maildir_messages, make_config, wait_for
from tests.integration.test_spam_scanners import GTUBE
from tests.services.clamd import DETECTED_AS, ClamdServer, eicar
from tests.services.rspamd import RspamdServer
from tests.services.spamd import SpamdServer

OFF = dict(spf_check=False, dkim_verify=False, dmarc_check=False, arc=False, dkim_sign=False,
           srs_enable=False)
SENDER = "someone@remote.test"


def message(body: str, *, subject: str = "hello", extra: str = "") -> bytes:
    text = (f"From: {SENDER}\r\nTo: alice@example.com\r\nSubject: {subject}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: <t.{id(body)}@remote.test>\r\n"
            f"{extra}\r\n{body}\r\n")
    return text.encode()


def eicar_message() -> bytes:
    return message("see attached\r\n" + eicar().decode())


def exe_message() -> bytes:
    return (f"From: {SENDER}\r\nTo: alice@example.com\r\nSubject: invoice\r\n"
            "Date: Sun, 06 Dec 2026 12:00:00 +0000\r\nMIME-Version: 1.0\r\n"
            'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            "--b1\r\nContent-Type: text/plain\r\n\r\nplease pay\r\n"
            "--b1\r\nContent-Type: application/octet-stream\r\n"
            'Content-Disposition: attachment; filename="invoice.pdf.exe"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--b1--\r\n").encode()


async def send(mta: MTA, data: bytes, *, sender: str = SENDER,
               rcpts: tuple[str, ...] = ("alice@example.com",)) -> tuple[int, str]:
    """One message over SMTP; (code, text) of the end-of-data reply."""
    host, port = mta.addresses["smtp"][0]
    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=30, start_tls=False,
                             local_hostname="client.remote.test")
    await client.connect()
    try:
        await client.ehlo()
        await client.mail(sender)
        for rcpt in rcpts:
            await client.rcpt(rcpt)
        code, text = await client.data(data)
        return code, text
    except aiosmtplib.SMTPDataError as exc:
        return exc.code, exc.message
    finally:
        await client.quit()


async def quarantined(mta: MTA) -> list[tuple[str, object]]:
    out = []
    for qid in await mta.store.list_queued():
        env = await mta.store.load_envelope(qid)
        if env is not None and quarantine.is_quarantined(env):
            out.append((qid, env))
    return out


def inbox(tmp_path: Path) -> list[email.message.Message]:
    return [email.message_from_bytes(m)
            for m in maildir_messages(str(tmp_path / "mail"), "alice")]


@pytest.fixture
def scanners(clamd: ClamdServer, spamd: SpamdServer) -> dict[str, object]:
    return dict(clamd=clamd.address, spamd=spamd.address, **OFF)


async def test_issue12_virus_is_discarded_into_the_quarantine(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    async with MTA(make_config(tmp_path, **scanners)) as mta:
        code, _ = await send(mta, eicar_message())
        assert code == 250                        # D_DISCARD: accepted, not delivered
        held = await quarantined(mta)
        assert len(held) == 1
        qid, env = held[0]
        assert env.extra[quarantine.KIND] == "virus"
        assert DETECTED_AS.split(".")[0] in env.extra[quarantine.QUARANTINE]
        assert "X-Envelope-To: <alice@example.com>" in env.prepend
        assert "X-Envelope-To-Blocked: <alice@example.com>" in env.prepend
        await asyncio.sleep(0.5)
        assert inbox(tmp_path) == []


async def test_issue12_clean_mail_is_delivered_with_the_scan_fields(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    cfg = make_config(tmp_path, sa_tag_level_deflt=-1000.0, **scanners)
    async with MTA(cfg) as mta:
        code, _ = await send(mta, message("just a note about lunch"))
        assert code == 250
        [msg] = await wait_for(lambda: inbox(tmp_path))
        assert msg["X-Virus-Scanned"] == "ClamAV at mx.example.com (pymta)"
        assert msg["X-Spam-Flag"] == "NO"
        assert msg["X-Spam-Status"].startswith("No, score=")


async def test_issue12_spam_is_tagged_and_a_forged_flag_removed(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    async with MTA(make_config(tmp_path, spam_subject_tag="***SPAM*** ", **scanners)) as mta:
        forged = ("X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-5\r\n"
                  "X-Virus-Scanned: ClamAV, all clean\r\n")
        code, _ = await send(mta, message(f"buy now\r\n{GTUBE}", extra=forged))
        assert code == 250                        # D_PASS (the image's default for spam)
        [msg] = await wait_for(lambda: inbox(tmp_path))
        assert msg.get_all("X-Spam-Flag") == ["YES"]
        assert len(msg.get_all("X-Spam-Status")) == 1
        assert msg["X-Spam-Status"].startswith("Yes, score=")
        assert float(msg["X-Spam-Status"].split("score=")[1].split()[0]) >= 900
        assert "GTUBE" in msg["X-Spam-Status"]
        assert float(msg["X-Spam-Score"]) >= 900    # GTUBE's 1000, less ALL_TRUSTED
        assert msg["X-Spam-Level"] == "*" * 64
        assert msg.get_all("Subject") == ["***SPAM*** hello"]
        assert msg.get_all("X-Virus-Scanned") == ["ClamAV at mx.example.com (pymta)"]


async def test_issue12_spam_reject_is_a_554_and_kept_in_the_quarantine(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    async with MTA(make_config(tmp_path, final_spam_destiny="reject", **scanners)) as mta:
        code, text = await send(mta, message(f"buy now\r\n{GTUBE}"))
        assert code == 554
        assert text.startswith("5.7.0 Reject, id=") and "SPAM" in text
        [(qid, env)] = await quarantined(mta)
        assert env.extra[quarantine.KIND] == "spam"
        assert qid in text
        code, _ = await send(mta, message("an ordinary message"))
        assert code == 250
        await wait_for(lambda: inbox(tmp_path))


async def test_issue12_spam_bounce_tells_the_sender(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    cfg = make_config(tmp_path, final_spam_destiny="bounce", **scanners)
    async with MTA(cfg) as mta:
        # the sender is local, so its failure notice lands in a mailbox we can read
        code, _ = await send(mta, message(f"buy now\r\n{GTUBE}"), sender="bob@example.com",
                             rcpts=("alice@example.com",))
        assert code == 250
        assert len(await quarantined(mta)) == 1
        mbox = tmp_path / "mail" / "bob"
        await wait_for(lambda: mbox.exists() and b"5.7.0" in mbox.read_bytes())
        text = mbox.read_bytes()
        assert b"Undelivered Mail Returned to Sender" in text
        assert b"X-Envelope-To" not in text        # who else it was for stays ours
        assert b"text/rfc822-headers" in text and b"buy now" not in text   # no spam mailed back
        assert inbox(tmp_path) == []


async def test_issue12_virus_bounce_is_a_discard(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    cfg = make_config(tmp_path, final_virus_destiny="bounce", **scanners)
    async with MTA(cfg) as mta:
        code, _ = await send(mta, eicar_message(), sender="bob@example.com")
        assert code == 250
        assert len(await quarantined(mta)) == 1
        await asyncio.sleep(0.5)
        assert not (tmp_path / "mail" / "bob").exists()   # no notice to a forged sender


async def test_issue12_banned_attachment_is_quarantined(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    async with MTA(make_config(tmp_path, **scanners)) as mta:
        code, _ = await send(mta, exe_message())
        assert code == 250
        [(_, env)] = await quarantined(mta)
        assert env.extra[quarantine.KIND] == "banned"
        assert "invoice.pdf.exe" in env.extra[quarantine.QUARANTINE]


async def test_issue12_bad_header_reject_and_pass_with_alert(tmp_path: Path) -> None:
    dup = message("text", extra="Subject: second\r\n")
    async with MTA(make_config(tmp_path / "r", final_bad_header_destiny="reject", **OFF)) as mta:
        code, text = await send(mta, dup)
        assert code == 554 and text.startswith("5.6.0 ") and "BAD HEADER" in text
    async with MTA(make_config(tmp_path, **OFF)) as mta:      # D_PASS: delivered, flagged
        assert (await send(mta, dup))[0] == 250
        [msg] = await wait_for(lambda: inbox(tmp_path))
        assert "BAD HEADER" in msg["X-Amavis-Alert"]


async def test_issue12_clamd_down_defers_or_passes_by_policy(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymta.content")
    down = dict(clamd="127.0.0.1:9", **OFF)           # nothing listens on discard
    async with MTA(make_config(tmp_path / "t", **down)) as mta:
        for _ in range(3):
            code, text = await send(mta, message("hello"))
            assert (code, text[:5]) == (451, "4.7.1")
    outage = [r for r in caplog.records if "is not answering" in r.getMessage()]
    assert len(outage) == 1                           # once per outage, not per message
    async with MTA(make_config(tmp_path, virus_on_error="pass", **down)) as mta:
        assert (await send(mta, message("hello")))[0] == 250
        [msg] = await wait_for(lambda: inbox(tmp_path))
        assert msg["X-Virus-Scanned"] == "unchecked"


async def test_issue12_outbound_mail_is_scanned_for_viruses_only(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    """A trusted client's mail to foreign domains: a virus is caught, spam is not judged;
    the same client's mail to our own users gets every check."""
    cfg = make_config(tmp_path, mynetworks=("127.0.0.0/8",), final_spam_destiny="reject",
                      hold_incoming=True, **scanners)
    out = ("someone@foreign.test",)
    async with MTA(cfg) as mta:
        code, _ = await send(mta, message(f"buy now\r\n{GTUBE}"), rcpts=out)
        assert code == 250                            # no spam check on the way out
        assert await quarantined(mta) == []
        code, _ = await send(mta, eicar_message(), rcpts=out)
        assert code == 250
        [(_, env)] = await quarantined(mta)
        assert env.extra[quarantine.KIND] == "virus"
        code, text = await send(mta, message(f"buy now\r\n{GTUBE}"))   # to alice
        assert code == 554 and "SPAM" in text


async def test_issue12_rspamd_scores_against_the_same_levels(
        tmp_path: Path, clamd: ClamdServer, rspamd: RspamdServer) -> None:
    cfg = make_config(tmp_path, clamd=clamd.address, rspamd=rspamd.address,
                      final_spam_destiny="discard", **OFF)
    async with MTA(cfg) as mta:
        assert (await send(mta, message(f"buy now\r\n{GTUBE}")))[0] == 250
        [(_, env)] = await quarantined(mta)
        assert env.extra[quarantine.KIND] == "spam"
        assert "rspamd" in env.extra[quarantine.QUARANTINE]


async def test_issue12_real_malware_sample_is_quarantined(tmp_path: Path) -> None:
    """A real-world sample of the hardening corpus (a zip holding ``….jpg.exe``) is caught by
    the default banned-files check, with no scanner configured."""
    sample = (Path(__file__).resolve().parents[1] / "corpus" / "malformed"
              / "mailparser-mail_malformed_1.eml").read_bytes()
    data = sample.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    async with MTA(make_config(tmp_path, **OFF)) as mta:
        assert (await send(mta, data))[0] == 250
        [(_, env)] = await quarantined(mta)
        assert env.extra[quarantine.KIND] == "banned"
        assert ".jpg.exe" in env.extra[quarantine.QUARANTINE]


# ------------------------------------------------------------------ every destiny, every kind

KIND_MESSAGES = {
    "virus": eicar_message,
    "banned": exe_message,
    "spam": lambda: message(f"buy now\r\n{GTUBE}"),
    "bad-header": lambda: message("text", extra="Subject: second\r\n"),
}
DESTINY_FIELD = {"virus": "final_virus_destiny", "banned": "final_banned_destiny",
                 "spam": "final_spam_destiny", "bad-header": "final_bad_header_destiny"}


@pytest.mark.parametrize("destiny", ["pass", "discard", "reject", "bounce"])
@pytest.mark.parametrize("kind", list(KIND_MESSAGES))
async def test_issue12_each_destiny_for_each_kind(
        tmp_path: Path, scanners: dict[str, object], kind: str, destiny: str) -> None:
    # the other kinds pass, so only the one under test can decide
    settings = {**{f: "pass" for f in DESTINY_FIELD.values()}, DESTINY_FIELD[kind]: destiny}
    bob = tmp_path / "mail" / "bob"                   # the (local) sender's mbox
    async with MTA(make_config(tmp_path, **settings, **scanners)) as mta:
        code, text = await send(mta, KIND_MESSAGES[kind](), sender="bob@example.com")
        held = await quarantined(mta)
        if destiny == "pass":
            assert code == 250 and held == []
            [msg] = await wait_for(lambda: inbox(tmp_path))
            assert msg["X-Amavis-Alert"] is not None or msg["X-Spam-Flag"] == "YES"
            return
        [(qid, env)] = held
        assert env.extra[quarantine.KIND] == kind
        if destiny == "reject":
            assert code == 554
            assert text.startswith("5.6.0" if kind == "bad-header" else "5.7.0"), text
            assert qid in text
        else:
            assert code == 250
        if destiny == "bounce" and kind != "virus":
            await wait_for(lambda: bob.exists() and b"Undelivered Mail" in bob.read_bytes())
        else:
            await asyncio.sleep(0.5)
            assert not bob.exists()                   # no notice (and none for a virus)
        assert inbox(tmp_path) == []


# ------------------------------------------------------------------ scanners that fail


async def test_issue12_spamd_down_passes_or_defers_by_policy(
        tmp_path: Path, clamd: ClamdServer) -> None:
    down = dict(clamd=clamd.address, spamd="127.0.0.1:9", **OFF)
    async with MTA(make_config(tmp_path / "t", spam_on_error="tempfail", **down)) as mta:
        code, text = await send(mta, message(f"buy now\r\n{GTUBE}"))
        assert (code, text[:5]) == (451, "4.7.1")
        assert await mta.store.list_queued() == []        # nothing kept: the client retries
    async with MTA(make_config(tmp_path, **down)) as mta:   # default: pass
        assert (await send(mta, message(f"buy now\r\n{GTUBE}")))[0] == 250
        [msg] = await wait_for(lambda: inbox(tmp_path))
        assert msg["X-Spam-Flag"] is None
        assert msg["X-Virus-Scanned"] is not None         # clamd still scanned it


@pytest.fixture
def hanging_scanner() -> object:
    """A scanner that accepts connections and never answers (a hung daemon)."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield f"127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


async def test_issue12_a_hanging_scanner_times_out_alone(
        tmp_path: Path, clamd: ClamdServer, hanging_scanner: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pymta.content")
    cfg = make_config(tmp_path, clamd=clamd.address, spamd=hanging_scanner,
                      scanner_timeout=1.0, **OFF)
    async with MTA(cfg) as mta:
        loop = asyncio.get_running_loop()
        started = loop.time()
        codes = await asyncio.gather(*(send(mta, message(f"note {i}")) for i in range(3)))
        assert [c for c, _ in codes] == [250, 250, 250]
        assert loop.time() - started < 10                 # one scanner timeout, not three
        msgs = await wait_for(lambda: len(inbox(tmp_path)) == 3 and inbox(tmp_path))
        assert all(m["X-Virus-Scanned"] and m["X-Spam-Flag"] is None for m in msgs)
    assert any("spam check failed" in r.getMessage() for r in caplog.records)


async def test_issue12_a_hanging_clamd_defers(tmp_path: Path, hanging_scanner: str) -> None:
    cfg = make_config(tmp_path, clamd=hanging_scanner, scanner_timeout=1.0, **OFF)
    async with MTA(cfg) as mta:
        code, text = await send(mta, message("hello"))
        assert (code, text[:5]) == (451, "4.7.1")
        assert await mta.store.list_queued() == []


async def test_issue12_mail_for_foreign_domains_is_not_tagged(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    cfg = make_config(tmp_path, mynetworks=("127.0.0.0/8",), hold_incoming=True,
                      sa_tag_level_deflt=-1000.0, **scanners)
    async with MTA(cfg) as mta:
        code, text = await send(mta, message(f"buy now\r\n{GTUBE}"),
                                rcpts=("someone@foreign.test",))
        assert code == 250
        [qid] = await mta.store.list_queued()
        env = await mta.store.load_envelope(qid)
        assert env is not None and not quarantine.is_quarantined(env)
        assert "X-Spam" not in env.prepend and "X-Virus-Scanned" not in env.prepend


async def test_issue12_a_bounce_that_cannot_be_queued_defers_and_keeps_nothing(
        tmp_path: Path, spamd: SpamdServer) -> None:
    """D_BOUNCE: the quarantined copy and the sender's notice are one outcome. When the
    notice cannot be queued (its recipient's directory is down), the copy goes too and the
    client is told to retry: nothing half-done, nothing lost."""
    from pymta.types import TemporaryFailure

    directory_up = True

    def lookup(address: str) -> object:
        if address.lower() == "alice@example.com":
            return "alice/"
        if address.lower() == "bob@example.com" and directory_up:
            return "bob"
        raise TemporaryFailure("directory down")

    cfg = make_config(tmp_path, spamd=spamd.address, final_spam_destiny="bounce",
                      lookup_cache_ttl=0, lookup_negative_ttl=0, **OFF)
    async with MTA(cfg, lookups=[lookup]) as mta:
        directory_up = False
        code, text = await send(mta, message(f"buy now\r\n{GTUBE}"), sender="bob@example.com")
        assert (code, text[:5]) == (451, "4.3.0"), text
        assert await mta.store.list_queued() == []
        directory_up = True
        code, _ = await send(mta, message(f"buy now\r\n{GTUBE}"), sender="bob@example.com")
        assert code == 250
        assert len(await quarantined(mta)) == 1
        bob = tmp_path / "mail" / "bob"
        await wait_for(lambda: bob.exists() and b"Undelivered Mail" in bob.read_bytes())


async def test_issue12_review_no_bounce_notice_for_a_null_sender(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    """D_BOUNCE of mail from <>: nobody to tell, and not the postmaster either."""
    cfg = make_config(tmp_path, final_spam_destiny="bounce", **scanners)
    async with MTA(cfg) as mta:
        code, _ = await send(mta, message(f"buy now\r\n{GTUBE}"), sender="")
        assert code == 250
        assert len(await quarantined(mta)) == 1
        await asyncio.sleep(0.5)
        assert [q for q in await mta.store.list_queued()
                if q not in [qid for qid, _ in await quarantined(mta)]] == []
        assert maildir_messages(str(tmp_path / "mail"), "postmaster") == []


async def test_issue12_review_a_hung_spam_engine_does_not_stall_the_messages_queued_behind(
        tmp_path: Path, clamd: ClamdServer, hanging_scanner: str) -> None:
    """Messages waiting for one of the two slots of a hung spamd give up at their own
    deadline, not one deadline after the other: all pass by the policy, none is 451."""
    cfg = make_config(tmp_path, clamd=clamd.address, spamd=hanging_scanner,
                      scanner_timeout=1.0, scanner_concurrency=2, pipeline_timeout=4.0, **OFF)
    async with MTA(cfg) as mta:
        loop = asyncio.get_running_loop()
        started = loop.time()
        replies = await asyncio.gather(*(send(mta, message(f"note {i}")) for i in range(8)))
        assert [c for c, _ in replies] == [250] * 8
        assert loop.time() - started < 4


async def test_issue12_mail_forwarded_through_our_alias_is_filtered(
        tmp_path: Path, scanners: dict[str, object]) -> None:
    """An alias of ours that forwards elsewhere: the mail was addressed to our domain, so it
    is judged like any inbound mail (we do not forward spam)."""
    cfg = make_config(tmp_path, mail_aliases="fwd:someone@remote.test",
                      final_spam_destiny="reject", **scanners)
    async with MTA(cfg) as mta:
        code, text = await send(mta, message(f"buy now\r\n{GTUBE}"), rcpts=("fwd@example.com",))
        assert code == 554 and "SPAM" in text
