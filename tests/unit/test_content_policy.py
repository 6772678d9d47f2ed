"""Issue 12: the content filter's settings (the image's names and defaults), its destiny rules
and the header fields it writes from values a sender controls (virus names, file names,
rule names, a Subject)."""

from __future__ import annotations

import asyncio
import email
from pathlib import Path

import pytest

from pymta.config.errors import ConfigError
from pymta.config.load import load_config
from pymta.content.badheader import HeaderFinding
from pymta.content.banned import BannedItem
from pymta.content.filter import (
    REPORT,
    ContentCheck,
    ContentPolicy,
    ContentReport,
    ContentTags,
    SpamScore,
)
from pymta.pipeline import SpooledBody, Transaction
from pymta.pipeline.headers import filter_bytes
from pymta.types import Action, Recipient

ENV = {"MAIL_DOMAIN": "example.com"}


def test_issue12_defaults_are_the_images() -> None:
    c = load_config(ENV)
    assert (c.sa_tag_level_deflt, c.sa_tag2_level_deflt, c.sa_kill_level_deflt) == (
        2.0, 6.2, 6.9)
    assert (c.final_virus_destiny, c.final_banned_destiny, c.final_spam_destiny,
            c.final_bad_header_destiny) == ("discard", "discard", "pass", "pass")
    assert c.quarantine_lifetime == 30 * 86400
    assert (c.virus_on_error, c.spam_on_error) == ("tempfail", "pass")
    assert c.kopano_spamd_lib == "/var/lib/kopano/spamd"


@pytest.mark.parametrize("value, expected", [("D_REJECT", "reject"), ("d_bounce", "bounce"),
                                             ("DISCARD", "discard"), (" D_PASS ", "pass")])
def test_issue12_destinies_take_amavis_names(value: str, expected: str) -> None:
    assert load_config({**ENV, "FINAL_SPAM_DESTINY": value}).final_spam_destiny == expected


@pytest.mark.parametrize("env, words", [
    ({"FINAL_VIRUS_DESTINY": "D_KEEP"}, "FINAL_VIRUS_DESTINY: not one of D_PASS"),
    ({"SA_KILL_LEVEL_DEFLT": "high"}, "SA_KILL_LEVEL_DEFLT: not a number"),
    ({"PYMTA_VIRUS_ON_ERROR": "ignore"}, "PYMTA_VIRUS_ON_ERROR: not one of tempfail, pass"),
    ({"PYMTA_BANNED_FILES": "exe ../etc"}, "PYMTA_BANNED_FILES: not a file extension"),
    ({"PYMTA_SPAMD": "a:783", "PYMTA_RSPAMD": "b:11333"}, "one spam engine at a time"),
])
def test_issue12_bad_settings_name_the_variable(env: dict[str, str], words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config({**ENV, **env})


def test_issue12_a_level_can_be_unset_for_the_engines_own_verdict() -> None:
    c = load_config({**ENV, "SA_KILL_LEVEL_DEFLT": "none", "SA_TAG_LEVEL_DEFLT": "-5"})
    assert (c.sa_kill_level_deflt, c.sa_tag_level_deflt) == (None, -5.0)
    policy = ContentPolicy(kill_level=None, tag2_level=None)
    rspamd_reject = SpamScore("rspamd", 3.0, (), spam=True, reject=True)
    assert policy.killed(rspamd_reject) and policy.flagged(rspamd_reject)
    assert not ContentPolicy().killed(rspamd_reject)      # 3.0 < 6.9


def txn(*, trusted: bool = False) -> Transaction:
    return Transaction(qid="ABC123", sender="x@remote.test",
                       recipients=[Recipient("alice@example.com", "alice@example.com")],
                       peer_ip="192.0.2.1", helo="remote.test", hostname="mx.example.com",
                       local_domains=frozenset({"example.com"}), trusted=trusted)


def decide(report: ContentReport, **destinies: str) -> object:
    policy = ContentPolicy(destinies={"virus": "discard", "banned": "discard", "spam": "pass",
                                      "bad-header": "pass", **destinies})
    return ContentCheck(policy=policy)._decide(txn(), report)


def test_issue12_the_first_blocking_kind_decides() -> None:
    both = ContentReport(viruses=("Eicar",), spam=SpamScore("spamd", 50, (), True, True))
    verdict = decide(both, virus="pass", spam="reject")
    assert verdict.action is Action.REJECT and verdict.quarantine_kind == "spam"
    assert verdict.reply.code == 554 and "SPAM" in verdict.reply.text
    verdict = decide(both)
    assert verdict.action is Action.QUARANTINE and verdict.quarantine_kind == "virus"


def test_issue12_no_bounce_for_a_virus() -> None:
    verdict = decide(ContentReport(viruses=("Eicar",)), virus="bounce")
    assert verdict.action is Action.QUARANTINE and verdict.bounce is None
    verdict = decide(ContentReport(banned=(BannedItem("2", "a.exe", "name", "exe"),)),
                     banned="bounce")
    assert verdict.bounce is not None and verdict.bounce.enhanced == "5.7.0"


def test_issue12_reject_text_from_a_hostile_file_name_is_one_safe_line() -> None:
    name = "x\r\n250 ok\r\n\x00" + "é" * 300 + ".exe"
    verdict = decide(ContentReport(banned=(BannedItem("2", name, "name", "exe\r\nX: y"),)),
                     banned="reject")
    text = verdict.reply.text
    assert text.isascii() and text.isprintable() and len(text) < 400


def run_tags(report: ContentReport, head: bytes, tmp_path: Path,
             policy: ContentPolicy | None = None) -> tuple[Transaction, bytes]:
    t = txn()
    t.results[REPORT] = report
    path = tmp_path / "msg"
    path.write_bytes(head + b"\r\nbody\r\n")
    body = SpooledBody(str(path), path.stat().st_size)
    asyncio.run(ContentTags(policy or ContentPolicy(hostname="mx.example.com")).modify(t, body))
    delivered = "".join(t.prepend).encode() + filter_bytes(path.read_bytes(), t.header_drops)
    return t, delivered


def test_issue12_spam_fields_are_well_formed_whatever_the_rule_names(tmp_path: Path) -> None:
    rules = tuple(f"RULE_{i}" for i in range(60)) + ("BAD\r\nX-Spam-Flag: NO", "A,B]")
    report = ContentReport(tag=True, virus_scanned=True,
                           spam=SpamScore("spamd", 7.5, rules, True, True))
    _, delivered = run_tags(report, b"From: a@b.test\r\nSubject: hi\r\n", tmp_path)
    msg = email.message_from_bytes(delivered)
    assert msg.get_all("X-Spam-Flag") == ["YES"]
    assert msg["X-Spam-Level"] == "*******"
    head = delivered.split(b"\r\n\r\n")[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))
    assert b"\r\nX-Spam-Flag: NO" not in head


def test_issue12_forged_spam_fields_are_removed_even_below_the_tag_level(
        tmp_path: Path) -> None:
    report = ContentReport(tag=True, spam=SpamScore("spamd", 0.5, (), False, False))
    forged = b"X-Spam-Flag: NO\r\nx-spam-status: No\r\nFrom: a@b.test\r\n"
    _, delivered = run_tags(report, forged, tmp_path)
    assert b"X-Spam" not in delivered and b"x-spam" not in delivered


def test_issue12_no_fields_for_mail_the_check_did_not_tag(tmp_path: Path) -> None:
    report = ContentReport(tag=False, virus_scanned=True,
                           bad_header=(HeaderFinding("duplicate", "Subject", "twice"),))
    t, _ = run_tags(report, b"Subject: a\r\nSubject: b\r\n", tmp_path)
    assert t.prepend == [] and t.header_drops == []


def test_issue12_subject_tag_keeps_a_folded_subject(tmp_path: Path) -> None:
    report = ContentReport(tag=True, spam=SpamScore("spamd", 9, (), True, True))
    policy = ContentPolicy(hostname="h", subject_tag="***SPAM***")
    _, delivered = run_tags(report, b"Subject: long\r\n folded\r\nFrom: a@b.test\r\n",
                            tmp_path, policy)
    msg = email.message_from_bytes(delivered)
    assert msg.get_all("Subject") == ["***SPAM*** long\r\n folded"]


@pytest.mark.parametrize("header", ["True ; inf / 5.0", "False ; nan / 5.0",
                                    "True ; 1e999 / 5.0"])
def test_issue12_review_a_score_that_is_not_a_number_is_a_scanner_error(header: str) -> None:
    from pymta.content.spamd import SpamdError, parse_spam_header

    with pytest.raises(SpamdError):
        parse_spam_header(header)


def test_issue12_review_rspamd_score_that_is_not_a_number_is_a_scanner_error() -> None:
    from pymta.content.rspamd import RspamdError, parse_check

    with pytest.raises(RspamdError):
        parse_check({"score": float("inf"), "required_score": 15, "action": "reject"})


def test_issue12_fuzz_base64_pad_midstream_decodes_the_same_in_any_cut() -> None:
    """Found by the content fuzz target: a '=' in the middle of a base64 part ended the
    decoding of whatever block it stood in, so the walk taken in blocks and the walk taken
    line by line disagreed on an executable after it. Pads are skipped now; the last partial
    quantum is padded at the end."""
    import base64
    import io

    from pymta.content.banned import BannedFiles

    pe = b"MZ" + b"\x00" * 58 + b"\x40\x00\x00\x00" + b"PE\x00\x00" + b"\x00" * 60
    encoded = base64.b64encode(pe).decode()
    glued = encoded[:40] + "=" + encoded[40:]          # a pad where none belongs
    for body in (glued, "\r\n".join(glued[i:i + 7] for i in range(0, len(glued), 7))):
        msg = ("Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
               f"\r\n{body}\r\n").encode()
        found = BannedFiles().inspect(io.BytesIO(msg))
        assert [(f.kind, f.reason) for f in found] == [
            ("content", "Windows executable (PE header)")]
