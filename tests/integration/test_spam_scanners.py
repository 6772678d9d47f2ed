"""The spamd and rspamd clients (``pymta.content``) against the real daemons (issue 12).

Messages are spooled files with CRLF line ends, as the queue holds them. The GTUBE line is
joined from two halves at run time so that no file of the repository carries it whole.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from pymta.content.rspamd import Envelope, RspamdClient, RspamdError
from pymta.content.spamd import SpamdClient, SpamdError
from tests.services import RspamdServer, SpamdServer, free_port

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*" + "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def spool(tmp_path: Path, body: str, *, to: str = "bob@example.com",
          name: str = "msg.eml") -> Path:
    """A message file as the spool holds it (CRLF), with a fresh Message-ID."""
    lines = [
        "Received: from mx.example.org (mx.example.org [192.0.2.10]) by mail.example.com",
        "From: Alice <alice@example.com>",
        f"To: {to}",
        "Subject: quarterly figures",
        "Date: Sun, 06 Dec 2026 12:00:00 +0000",
        f"Message-ID: <{uuid.uuid4().hex}@example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "",
        *body.splitlines(),
    ]
    path = tmp_path / name
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


HAM = ("Hello Bob,\n\nthe figures for the third quarter are attached to the ticket; the meeting "
       "about them is on Tuesday at ten in the small room.\n\nRegards,\nAlice\n")


def prose(seed: str) -> str:
    """A body with enough distinct words for Bayes (it ignores short messages)."""
    return " ".join(f"{seed}{i} harvest report meadow lantern copper{i % 7}" for i in range(40))


# --- spamd ------------------------------------------------------------------------------------

async def test_spamd_ham_is_not_spam(spamd: SpamdServer, tmp_path: Path) -> None:
    result = await SpamdClient(spamd.address, timeout=20).check(spool(tmp_path, HAM))
    assert not result.is_spam
    assert result.score < result.threshold == 5.0
    assert "GTUBE" not in result.rules


async def test_spamd_gtube_is_spam_with_score_1000(spamd: SpamdServer, tmp_path: Path) -> None:
    path = spool(tmp_path, f"buy now\n{GTUBE}\n")
    result = await SpamdClient(spamd.address, timeout=20).check(path)
    assert result.is_spam
    assert result.score >= 1000.0
    assert result.threshold == 5.0
    assert "GTUBE" in result.rules


async def test_spamd_reads_an_open_file_from_its_position(spamd: SpamdServer,
                                                          tmp_path: Path) -> None:
    """The caller's file object is scanned from where it stands to its end, and left open:
    a GTUBE message before that position must not count."""
    gtube = spool(tmp_path, f"{GTUBE}\n", name="gtube.eml").read_bytes()
    ham = spool(tmp_path, HAM, name="ham.eml").read_bytes()
    both = tmp_path / "both.eml"
    both.write_bytes(gtube + ham)
    client = SpamdClient(spamd.address, timeout=20, user="alice")
    with open(both, "rb") as f:
        f.seek(len(gtube))
        result = await client.check(f)
        assert not f.closed
    assert "GTUBE" not in result.rules
    assert not result.is_spam


async def test_spamd_learns_spam_then_ham(spamd: SpamdServer, tmp_path: Path) -> None:
    client = SpamdClient(spamd.address, timeout=20)
    spam = spool(tmp_path, prose("offer"), name="spam.eml")
    ham = spool(tmp_path, prose("minutes"), name="ham.eml")
    assert await client.learn(spam, spam=True) is True
    assert await client.learn(spam, spam=True) is False     # already known as spam
    assert await client.learn(ham, spam=False) is True
    assert await client.learn(spam, spam=False) is True     # re-classified: learnt again


async def test_spamd_ping(spamd: SpamdServer) -> None:
    await SpamdClient(spamd.address, timeout=5).ping()


async def test_spamd_down_is_an_error_not_a_timeout(tmp_path: Path) -> None:
    client = SpamdClient(f"127.0.0.1:{free_port()}", timeout=5)
    with pytest.raises(SpamdError) as tcp:
        await client.check(spool(tmp_path, HAM))
    assert not tcp.value.timeout
    assert "127.0.0.1" in str(tcp.value)
    with pytest.raises(SpamdError) as unix:
        await SpamdClient(f"unix:{tmp_path}/no-such.sock", timeout=5).ping()
    assert not unix.value.timeout
    assert "no-such.sock" in str(unix.value)


# --- rspamd -----------------------------------------------------------------------------------

def _rspamd(rspamd: RspamdServer, **kwargs: object) -> RspamdClient:
    return RspamdClient(rspamd.address, controller=rspamd.controller,
                        password=rspamd.password, timeout=20, **kwargs)  # type: ignore[arg-type]


async def test_rspamd_ham_is_not_spam(rspamd: RspamdServer, tmp_path: Path) -> None:
    envelope = Envelope(ip="127.0.0.1", helo="mail.example.com", mail_from="alice@example.com",
                        rcpts=("bob@example.com",), queue_id="Q1ham")
    result = await _rspamd(rspamd).check(spool(tmp_path, HAM), envelope)
    assert not result.is_spam
    assert result.action in ("no action", "greylist")
    assert result.score < result.required_score
    assert "GTUBE" not in result.symbols


async def test_rspamd_gtube_is_rejected(rspamd: RspamdServer, tmp_path: Path) -> None:
    result = await _rspamd(rspamd).check(spool(tmp_path, f"{GTUBE}\n"))
    assert result.action == "reject"
    assert result.is_spam
    assert "GTUBE" in result.symbols
    assert result.score >= result.required_score
    assert result.smtp_message == "Gtube pattern"


async def test_rspamd_envelope_headers_reach_rspamd(rspamd: RspamdServer,
                                                    tmp_path: Path) -> None:
    """IP/From feed SPF (example.com allows 127/8 and 192.0.2/24 only, ``-all``); every
    recipient travels in its own Rcpt header."""
    client = _rspamd(rspamd)
    path = spool(tmp_path, HAM, to="bob@example.com, carol@example.com")
    both = ("bob@example.com", "carol@example.com")
    failed = await client.check(path, Envelope(ip="198.51.100.7", helo="mx.example.org",
                                               mail_from="alice@example.com", rcpts=both))
    assert "R_SPF_FAIL" in failed.symbols
    assert "TO_MATCH_ENVRCPT_ALL" in failed.symbols
    allowed = await client.check(path, Envelope(ip="192.0.2.10", helo="mx.example.org",
                                                mail_from="alice@example.com",
                                                rcpts=both[:1]))
    assert "R_SPF_ALLOW" in allowed.symbols
    assert "TO_MATCH_ENVRCPT_SOME" in allowed.symbols


async def test_rspamd_learning_without_a_classifier_says_why(rspamd: RspamdServer,
                                                             tmp_path: Path) -> None:
    """Without redis rspamd has no Bayes backend and refuses every learn: the client reports
    rspamd's own reason, as an error that is not a timeout."""
    client = _rspamd(rspamd)
    for spam, endpoint in ((True, "learnspam"), (False, "learnham")):
        with pytest.raises(RspamdError) as refused:
            await client.learn(spool(tmp_path, prose("lesson")), spam=spam)
        assert not refused.value.timeout
        assert f"{endpoint} refused" in str(refused.value)
        assert "classifier" in str(refused.value)


async def test_rspamd_ping(rspamd: RspamdServer) -> None:
    await _rspamd(rspamd).ping()


async def test_rspamd_down_is_an_error_not_a_timeout(tmp_path: Path) -> None:
    port = free_port()
    client = RspamdClient(f"127.0.0.1:{port}", controller=f"127.0.0.1:{port}", timeout=5)
    started = time.monotonic()
    with pytest.raises(RspamdError) as check:
        await client.check(spool(tmp_path, HAM))
    with pytest.raises(RspamdError) as learn:
        await client.learn(spool(tmp_path, HAM), spam=True)
    assert time.monotonic() - started < 2
    assert not check.value.timeout and not learn.value.timeout
    assert f":{port}" in str(check.value)
