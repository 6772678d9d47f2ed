"""Spam learning (issue 12, item 7): the kopano-spamd folders ``KOPANO_SPAMD_LIB/spam`` and
``/ham`` taught to the real spamd and rspamd, and ``pymta learn spam|ham FILE...``.

What spamd learnt is read back from spamd itself: ``TELL`` of the same message again answers
"already learned" (the client's ``learn`` returns False) once the folder taught it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from serverproc import PYTHON, REPO, clean_environ

from pymta.content.learn import LearnFolders
from pymta.content.rspamd import RspamdClient
from pymta.content.spamd import SpamdClient
from tests.conftest import wait_for
from tests.services import RspamdServer, SpamdServer, free_port

POLL = 0.1


def message(seed: str) -> bytes:
    """A message (CRLF) with a fresh Message-ID and enough distinct words for Bayes."""
    words = " ".join(f"{seed}{i} harvest meadow lantern copper{i % 7}" for i in range(40))
    lines = ["From: Alice <alice@example.com>", "To: bob@example.com",
             f"Subject: {seed}", "Date: Sun, 06 Dec 2026 12:00:00 +0000",
             f"Message-ID: <{uuid.uuid4().hex}@example.com>", "", words]
    return ("\r\n".join(lines) + "\r\n").encode()


def drop(folder: Path, name: str, data: bytes, *, age: float = 10.0) -> Path:
    """A finished file as kopano-spamd leaves it (last written ``age`` seconds ago)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    then = time.time() - age
    os.utime(path, (then, then))
    return path


def empty(folder: Path) -> bool:
    """No file left in ``folder``, not even a claim being taught."""
    return not [n for n in os.listdir(folder) if n != ".too-large"]


def lines(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "pymta.learn" and r.levelno >= level]


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="pymta.learn")
    return caplog


# --- the folders, spamd -----------------------------------------------------------------------

async def test_spam_and_ham_folders_are_taught_to_spamd_and_emptied(
        spamd: SpamdServer, tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    spam, ham = message("offer"), message("minutes")
    spam_file = drop(tmp_path / "spam", "1.eml", spam)
    ham_file = drop(tmp_path / "ham", "2.eml", ham)
    client = SpamdClient(spamd.address, timeout=20)
    learner = LearnFolders(client, tmp_path, POLL, 10240000)
    learner.start()
    try:
        await wait_for(lambda: empty(tmp_path / "spam") and empty(tmp_path / "ham"), 30)
    finally:
        await learner.aclose()
    assert sorted(os.listdir(tmp_path / "spam") + os.listdir(tmp_path / "ham")) == []
    assert f"learned spam from {spam_file} (spamd)" in lines(logs)
    assert f"learned ham from {ham_file} (spamd)" in lines(logs)
    assert lines(logs, logging.WARNING) == []
    # spamd knows both now: the same messages again are "already learned" as that class
    again = tmp_path / "again.eml"
    again.write_bytes(spam)
    assert await client.learn(again, spam=True) is False
    again.write_bytes(ham)
    assert await client.learn(again, spam=False) is False


async def test_a_file_still_being_written_is_left_alone(spamd: SpamdServer,
                                                        tmp_path: Path) -> None:
    """A file that grows between polls and was written within the last seconds is not
    taken; once its writer is done it is taught."""
    path = tmp_path / "spam" / "growing.eml"
    path.parent.mkdir()
    data = message("growing")
    learner = LearnFolders(SpamdClient(spamd.address, timeout=20), tmp_path, POLL, 0)
    learner.start()
    try:
        for i in range(0, len(data), len(data) // 20 + 1):     # ~1 s of writing
            with open(path, "ab") as f:
                f.write(data[i:i + len(data) // 20 + 1])
            await asyncio.sleep(0.05)
            assert os.listdir(path.parent) == ["growing.eml"]
        await wait_for(lambda: empty(path.parent), 30)
    finally:
        await learner.aclose()


async def test_two_pollers_on_one_folder_teach_each_file_once(
        spamd: SpamdServer, tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    """Two worker processes share the folders: the rename claim gives each file to one."""
    files = [drop(tmp_path / "ham", f"{i}.eml", message(f"pair{i}x")) for i in range(6)]
    learners = [LearnFolders(SpamdClient(spamd.address, timeout=20), tmp_path, 0.01, 0)
                for _ in range(2)]
    for learner in learners:
        learner.start()
    try:
        await wait_for(lambda: empty(tmp_path / "ham"), 30)
    finally:
        for learner in learners:
            await learner.aclose()
    learned = [line for line in lines(logs) if line.startswith("learned ham from")]
    assert sorted(learned) == sorted(f"learned ham from {f} (spamd)" for f in files)
    assert os.listdir(tmp_path / "ham") == []


async def test_a_dead_workers_claim_is_taken_over_a_live_one_is_not(
        spamd: SpamdServer, tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    stale = drop(tmp_path / "spam", ".learning-999999-old.eml", message("stale"), age=660)
    live = drop(tmp_path / "spam", ".learning-999998-busy.eml", message("busy"), age=5)
    learner = LearnFolders(SpamdClient(spamd.address, timeout=20), tmp_path, POLL, 0)
    learner.start()
    try:
        await wait_for(lambda: os.listdir(stale.parent) == [live.name], 30)
        await asyncio.sleep(5 * POLL)
    finally:
        await learner.aclose()
    assert f"learned spam from {tmp_path / 'spam' / 'old.eml'} (spamd)" in lines(logs)
    assert os.listdir(tmp_path / "spam") == [live.name]


# --- failures ---------------------------------------------------------------------------------

async def test_rspamd_refusing_keeps_the_files_and_says_so_once(
        rspamd: RspamdServer, tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    """rspamd without redis has no Bayes and refuses every learn: the files stay under their
    own names for the next try, and each refusal is one log line however many polls and files
    see it (spam and ham are refused in different words: two lines for three files)."""
    client = RspamdClient(rspamd.address, controller=rspamd.controller,
                          password=rspamd.password, timeout=20)
    first = drop(tmp_path / "spam", "a.eml", message("refusedA"), age=20)
    drop(tmp_path / "spam", "c.eml", message("refusedC"))
    second = drop(tmp_path / "ham", "b.eml", message("refusedB"))
    learner = LearnFolders(client, tmp_path, 0.05, 0)
    learner.start()
    try:
        await wait_for(lambda: sum("still failing (3)" in m for m in lines(logs, 0)) == 3, 30)
    finally:
        await learner.aclose()
    assert first.read_bytes().startswith(b"From: Alice")
    assert sorted(os.listdir(tmp_path / "spam")) == ["a.eml", "c.eml"]    # no claim left
    assert os.listdir(tmp_path / "ham") == ["b.eml"]
    warnings = lines(logs, logging.WARNING)
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith(f"cannot learn {first} (rspamd): rspamd controller at ")
    assert "learnspam refused" in warnings[0] and "the file is kept" in warnings[0]
    assert warnings[1].startswith(f"cannot learn {second} (rspamd): ")
    assert "learnham refused" in warnings[1]


async def test_engine_down_then_up_logs_each_transition_once(
        spamd: SpamdServer, tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    port = free_port()
    learner = LearnFolders(SpamdClient(f"127.0.0.1:{port}", timeout=5), tmp_path, 0.05, 0)
    path = drop(tmp_path / "spam", "x.eml", message("downup"))
    learner.start()
    try:
        await wait_for(lambda: any("still failing (2)" in m for m in lines(logs, 0)), 30)
        learner.client = SpamdClient(spamd.address, timeout=20)    # the engine is back
        await wait_for(lambda: empty(path.parent), 30)
    finally:
        await learner.aclose()
    warnings = lines(logs, logging.WARNING)
    assert len(warnings) == 1 and f":{port}" in warnings[0], warnings
    assert "learning folders: spamd learning works again" in lines(logs)


async def test_a_file_over_the_size_limit_is_moved_aside_unread(
        tmp_path: Path, logs: pytest.LogCaptureFixture) -> None:
    """Nothing listens on the engine's port: the big file is never sent anywhere."""
    data = message("big") * 20
    big = drop(tmp_path / "spam", "big.eml", data)
    small = drop(tmp_path / "spam", "small.eml", b"x" * 100)
    learner = LearnFolders(SpamdClient(f"127.0.0.1:{free_port()}", timeout=5), tmp_path,
                           POLL, 1000)
    learner.start()
    try:
        await wait_for(lambda: not big.exists(), 30)
    finally:
        await learner.aclose()
    aside = tmp_path / "spam" / ".too-large" / "big.eml"
    assert aside.read_bytes() == data
    assert small.exists()
    assert any(m.startswith(f"not learning {big}: ") and "over the size limit of 1000" in m
               and str(aside) in m for m in lines(logs, logging.WARNING))


async def test_without_the_directory_nothing_runs(tmp_path: Path) -> None:
    learner = LearnFolders(SpamdClient("127.0.0.1:7830"), tmp_path / "absent", POLL, 0)
    learner.start()
    assert not learner.active
    await learner.aclose()


# --- pymta learn ------------------------------------------------------------------------------

def pymta_learn(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "pymta", "learn", *args], cwd=REPO,
                          env=clean_environ(MAIL_DOMAIN="example.com", **env),
                          capture_output=True, text=True, timeout=60)


def test_cli_learns_every_file_exit_0(spamd: SpamdServer, tmp_path: Path) -> None:
    files = [drop(tmp_path, f"{i}.eml", message(f"cli{i}q")) for i in range(2)]
    proc = pymta_learn("spam", *map(str, files), PYMTA_SPAMD=spamd.address)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines() == [f"learned spam from {f} (spamd)" for f in files]
    assert all(f.exists() for f in files)          # the command leaves the files alone


def test_cli_one_line_per_failed_file_exit_1(spamd: SpamdServer, tmp_path: Path) -> None:
    good = drop(tmp_path, "good.eml", message("cligood"))
    missing = tmp_path / "missing.eml"
    proc = pymta_learn("ham", str(missing), str(good), str(tmp_path),
                       PYMTA_SPAMD=spamd.address)
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [f"learned ham from {good} (spamd)"]
    assert proc.stderr.splitlines() == [
        f"pymta: learn ham: {missing}: No such file or directory",
        f"pymta: learn ham: {tmp_path}: Is a directory"]


def test_cli_rspamd_refusing_exit_1(rspamd: RspamdServer, tmp_path: Path) -> None:
    path = drop(tmp_path, "r.eml", message("clirspamd"))
    proc = pymta_learn("spam", str(path), PYMTA_RSPAMD=rspamd.address,
                       PYMTA_RSPAMD_CONTROLLER=rspamd.controller,
                       PYMTA_RSPAMD_PASSWORD=rspamd.password)
    assert proc.returncode == 1
    assert proc.stdout == ""
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"pymta: learn spam: {path}: rspamd controller at ")
    assert "learnspam refused" in line


def test_cli_engine_down_exit_1(tmp_path: Path) -> None:
    path = drop(tmp_path, "d.eml", message("clidown"))
    port = free_port()
    proc = pymta_learn("spam", str(path), PYMTA_SPAMD=f"127.0.0.1:{port}")
    assert proc.returncode == 1
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"pymta: learn spam: {path}: spamd at 127.0.0.1:{port}: ")


def test_cli_without_an_engine_exit_2_one_line(tmp_path: Path) -> None:
    proc = pymta_learn("spam", str(drop(tmp_path, "n.eml", b"x")))
    assert proc.returncode == 2
    assert proc.stderr == "pymta: PYMTA_SPAMD or PYMTA_RSPAMD: not set\n"
    assert proc.stdout == ""


async def test_issue12_the_server_teaches_the_kopano_folders(
        spamd: SpamdServer, tmp_path: Path) -> None:
    """``pymta serve`` with ``PYMTA_SPAMD`` and an existing ``KOPANO_SPAMD_LIB`` runs the
    folders: a file dropped in ``spam/`` is taught and removed while the server runs."""
    from pymta.app import MTA
    from tests.conftest import make_config

    root = tmp_path / "kopano"
    dropped = drop(root / "spam", "junk.eml", message("server"))
    (root / "ham").mkdir()
    cfg = make_config(tmp_path, spamd=spamd.address, kopano_spamd_lib=str(root),
                      learn_interval=POLL, banned_check=False, bad_header_check=False)
    data = dropped.read_bytes()
    async with MTA(cfg):
        await wait_for(lambda: not dropped.exists() and empty(root / "spam"), 30)
    copy = tmp_path / "copy.eml"
    copy.write_bytes(data)
    # spamd knows it now: teaching the same message again changes nothing
    assert await SpamdClient(spamd.address, timeout=20).learn(str(copy), spam=True) is False


async def test_issue12_rspamd_with_bayes_learns_both_folders(
        rspamd_bayes: RspamdServer, tmp_path: Path) -> None:
    """rspamd with its Bayes in redis: files in both folders are taught (``learnspam``,
    ``learnham``) and removed; teaching the same message again is "already learned", which
    is success, not a failure to retry."""
    spam, ham = message("bargain"), message("agenda")
    drop(tmp_path / "spam", "1.eml", spam)
    drop(tmp_path / "ham", "2.eml", ham)
    client = RspamdClient(rspamd_bayes.address, controller=rspamd_bayes.controller,
                          password=rspamd_bayes.password, timeout=20)
    learner = LearnFolders(client, tmp_path, POLL, 10240000)
    learner.start()
    try:
        await wait_for(lambda: empty(tmp_path / "spam") and empty(tmp_path / "ham"), 30)
    finally:
        await learner.aclose()
    again = tmp_path / "again.eml"
    again.write_bytes(spam)
    await client.learn(str(again), spam=True)       # "already learned": no error
