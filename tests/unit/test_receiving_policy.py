"""Issue 11: the receiving side's seams. AUTH policy in one module (``pymta.receiving.auth``), the
framework's time limits on recipient lookups and AUTH, and the queue's intake applying the
pipeline's typed Decision (the session never touches the store or a lock)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from pymta.backends.chain import LookupChain
from pymta.backends.passwd import PasswordFile, hash_password
from pymta.contracts import RecipientLookup
from pymta.pipeline import Pipeline, SpooledBody, Transaction
from pymta.queue.intake import Intake
from pymta.queue.store import QueueStore
from pymta.receiving.auth import AuthPolicy, AuthThrottle
from pymta.receiving.session import ReceiveContext, Session
from pymta.smtp import events as ev
from pymta.smtp.params import MailParams, RcptParams
from pymta.types import (
    Action,
    Address,
    ConnInfo,
    Decision,
    Destination,
    Envelope,
    Identity,
    Recipient,
    Target,
    TemporaryFailure,
    Verdict,
)
from tests.unit.test_faults_store import listing, open_queue_fds

PEER = "192.0.2.7"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[QueueStore]:
    s = QueueStore(tmp_path / "queue", hand_over_locks=True)
    await s.start()
    yield s
    await s.aclose()


class Submitted:
    """QueueManager.submit's stand-in: records what it is given, releases handed claims."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Envelope, bool]] = []

    def __call__(self, qid: str, env: Envelope, lock: Any = None) -> None:
        self.calls.append((qid, env, lock is not None and lock.held))
        if lock is not None:
            lock.release()


def make_session(store: QueueStore, *, lookups: Sequence[RecipientLookup] = (),
                 auth: AuthPolicy | None = None, pipeline: Pipeline | None = None,
                 lookup_timeout: float = 15.0, hold: bool = False,
                 tls_info: str | None = None) -> tuple[Session, Submitted]:
    submitted = Submitted()
    ctx = ReceiveContext(hostname="mx.example.com", local_domains=frozenset({"example.com"}),
                         first_domain="example.com",
                         lookup=LookupChain(lookups, frozenset({"example.com"})),
                         intake=Intake(store, submitted, hold_incoming=hold), auth=auth,
                         pipeline=pipeline, lookup_timeout=lookup_timeout)
    session = Session(ctx, PEER, 40000)
    session.tls_info = tls_info
    return session, submitted


def plain(user: str = "alice", password: str = "pw") -> ev.Auth:
    return ev.Auth("PLAIN", user, password)


class Recording:
    """An Authenticator that says yes to everyone and keeps the ConnInfo it was given."""

    def __init__(self) -> None:
        self.conns: list[ConnInfo] = []

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None:
        self.conns.append(conn)
        return Identity(username)


class Hanging:
    """A lookup and an authenticator that never answer (a directory that stopped talking)."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def _hang(self) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def lookup(self, address: Address) -> Destination | None:
        await self._hang()
        return None

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None:
        await self._hang()
        return None


class Broken:
    async def lookup(self, address: Address) -> Destination | None:
        raise RuntimeError("bug in a library user's lookup")

    async def authenticate(self, username: str, password: str,
                           conn: ConnInfo) -> Identity | None:
        raise RuntimeError("bug")


class Known:
    async def lookup(self, address: Address) -> Destination | None:
        if address.key == "bob@example.com":
            return Destination((Target("bob@example.com", True, "bob/"),))
        return None


# ------------------------------------------------------------------------------ AUTH


async def test_issue11_conninfo_tls_is_the_real_tls_state(store: QueueStore) -> None:
    """Issue 11: the AUTH path built ``ConnInfo(..., tls=True)`` whatever the connection was;
    an authenticator that decides by it (plaintext passwords only under TLS) was told a
    lie. Now it is the session's TLS state: none, after STARTTLS, implicit TLS (465)."""
    recording = Recording()
    session, _ = make_session(store, auth=AuthPolicy(recording, timeout=5))
    session.helo = "client.example.net"
    assert (await session.on_auth(plain())).code == 235
    session2, _ = make_session(store, auth=AuthPolicy(recording, timeout=5))
    session2.on_tls("TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)")
    assert (await session2.on_auth(plain())).code == 235
    session3, _ = make_session(store, auth=AuthPolicy(recording, timeout=5),
                               tls_info="TLSv1.3 with cipher TLS_AES_128_GCM_SHA256")
    assert (await session3.on_auth(plain())).code == 235
    assert [c.tls for c in recording.conns] == [False, True, True]
    assert recording.conns[0] == ConnInfo(PEER, 40000, "client.example.net", tls=False)
    assert session.auth_user == "alice"


async def test_issue11_hanging_authenticator_is_454_after_the_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    hanging = Hanging()
    policy = AuthPolicy(hanging, timeout=0.2)
    start = time.monotonic()
    result = await policy.check(plain(), ConnInfo(PEER, 1, tls=True))
    assert time.monotonic() - start < 3
    assert (result.reply.code, result.reply.enhanced) == (454, "4.7.0")
    assert result.identity is None and hanging.cancelled == 1
    assert policy.throttle.failures(PEER) == 0      # not a wrong password: no delay owed
    [line] = [r.getMessage() for r in caplog.records if "SASL" in r.getMessage()]
    assert "no answer within 0.2s" in line and "pw" not in line


async def test_broken_authenticator_is_454_without_traceback(
        caplog: pytest.LogCaptureFixture) -> None:
    result = await AuthPolicy(Broken()).check(plain(), ConnInfo(PEER, 1, tls=True))
    assert (result.reply.code, result.reply.enhanced) == (454, "4.7.0")
    assert all(r.exc_info is None for r in caplog.records)


async def test_wrong_password_is_535_after_the_growing_delay() -> None:
    policy = AuthPolicy(PasswordFile.from_text("alice:{plain}right"),
                        throttle=AuthThrottle(step=0.1, maximum=1.0))
    conn = ConnInfo(PEER, 1, tls=True)
    delays = []
    for _ in range(2):
        start = time.monotonic()
        result = await policy.check(plain(password="wrong"), conn)
        delays.append(time.monotonic() - start)
        assert (result.reply.code, result.reply.enhanced) == (535, "5.7.8")
    assert 0.08 <= delays[0] < 0.5 and 0.18 <= delays[1] < 0.6
    assert (await policy.check(plain(password="right"), conn)).reply.code == 235
    bad_name = await policy.check(ev.Auth("PLAIN", "alice\r\nx", "right"), conn)
    assert bad_name.reply.code == 535 and policy.throttle.failures(PEER) == 3


async def test_cram_md5_is_a_capability_seen_by_isinstance() -> None:
    assert AuthPolicy(PasswordFile.from_text("a:{plain}x")).mechanisms == (
        "PLAIN", "LOGIN", "CRAM-MD5")
    hashed = PasswordFile.from_text(f"a:{hash_password('x', 'SHA512-CRYPT')}")
    assert AuthPolicy(hashed).mechanisms == ("PLAIN", "LOGIN")
    assert AuthPolicy(Recording()).mechanisms == ("PLAIN", "LOGIN")
    # a client that tries CRAM-MD5 anyway against an authenticator without it: a plain no
    result = await AuthPolicy(Recording()).check(
        ev.Auth("CRAM-MD5", "a", "00" * 16, challenge="<1.2@mx>"), ConnInfo(PEER, 1))
    assert result.reply.code == 535


# ------------------------------------------------------------------------------ RCPT


async def test_issue11_hanging_lookup_is_451_after_the_lookup_timeout(
        store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:
    hanging = Hanging()
    session, _ = make_session(store, lookups=[Known(), hanging], lookup_timeout=0.2)
    assert session.on_mail(ev.MailFrom("a@remote.test", MailParams())).code == 250
    start = time.monotonic()
    reply = await session.on_rcpt(ev.RcptTo("nobody@example.com", RcptParams()))
    assert time.monotonic() - start < 3
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert hanging.cancelled == 1
    assert any("no answer within 0.2s" in r.getMessage() for r in caplog.records)
    # the session goes on: an address the first source knows is never asked further
    reply = await session.on_rcpt(ev.RcptTo("bob@example.com", RcptParams()))
    assert reply.code == 250


async def test_broken_lookup_is_451_not_a_dropped_session(store: QueueStore) -> None:
    session, _ = make_session(store, lookups=[Broken()])
    assert session.on_mail(ev.MailFrom("a@remote.test", MailParams())).code == 250
    reply = await session.on_rcpt(ev.RcptTo("bob@example.com", RcptParams()))
    assert (reply.code, reply.enhanced) == (451, "4.3.0")


async def test_temporary_failure_of_a_lookup_is_its_own_reply(store: QueueStore) -> None:
    class Down:
        async def lookup(self, address: Address) -> Destination | None:
            raise TemporaryFailure("Temporary lookup failure (directory unavailable)")

    session, _ = make_session(store, lookups=[Down()])
    session.on_mail(ev.MailFrom("a@remote.test", MailParams()))
    reply = await session.on_rcpt(ev.RcptTo("bob@example.com", RcptParams()))
    assert (reply.code, reply.enhanced) == (451, "4.3.0")
    assert "directory unavailable" in reply.text


# ------------------------------------------------------------------------------ the Decision


class Stage:
    """A check and a modifier at once, doing what the test says."""

    name = "stage"

    def __init__(self, action: Action = Action.PASS, sender: str | None = None,
                 header: str | None = None, drop: bytes | None = None,
                 reason: str = "") -> None:
        self.action, self.sender, self.header, self.drop = action, sender, header, drop
        self.reason = reason

    async def check(self, txn: Transaction, body: SpooledBody) -> Verdict:
        return Verdict(self.action, reason=self.reason)

    async def modify(self, txn: Transaction, body: SpooledBody) -> None:
        if self.sender is not None:
            txn.sender = self.sender
        if self.header is not None:
            txn.add_header(self.header)
        if self.drop is not None:
            name = self.drop
            txn.drop_header(lambda field: field.lower().startswith(name))


async def send(session: Session, body: bytes) -> Any:
    assert session.on_mail(ev.MailFrom("a@remote.test", MailParams())).code == 250
    session._targets["bob@example.com"] = Recipient("bob@example.com", "bob@example.com")
    assert session.on_data_start(ev.DataStart(False)).code == 354
    session.on_data_chunk(body)
    return await session.on_data_end(ev.DataEnd(None, len(body)))


async def test_pipeline_returns_one_typed_decision() -> None:
    txn = Transaction(qid="Q", sender="a@remote.test", recipients=[], peer_ip=PEER, helo="h",
                      hostname="mx", local_domains=frozenset())
    stage = Stage(Action.QUARANTINE, sender="SRS0=x@example.com", header="X-A: 1",
                  drop=b"x-drop:", reason="looks odd")
    decision = await Pipeline([stage], [stage]).run(txn, SpooledBody("/nonexistent", 0))
    assert isinstance(decision, Decision)
    assert decision.action is Action.QUARANTINE and decision.reply is None
    assert decision.sender == "SRS0=x@example.com"
    assert decision.prepend == ("X-A: 1\r\n",)
    assert len(decision.drops) == 1 and decision.drops[0](b"X-Drop: y\r\n")
    assert decision.quarantine == "stage: looks odd"
    assert decision.reasons == ("stage: looks odd",)
    same = await Pipeline([Stage()], [Stage()]).run(
        Transaction(qid="Q", sender="a@x", recipients=[], peer_ip=PEER, helo="h",
                    hostname="mx", local_domains=frozenset()), SpooledBody("/nonexistent", 0))
    assert same == Decision()       # nothing to apply: the sender unchanged is None


async def test_intake_applies_the_decision_and_hands_the_claim_over(store: QueueStore) -> None:
    stage = Stage(Action.QUARANTINE, sender="SRS0=x@example.com", header="X-Added: yes",
                  drop=b"x-drop:", reason="suspicious")
    session, submitted = make_session(store, pipeline=Pipeline([stage], [stage]))
    reply = await send(session, b"X-Drop: forged\r\nSubject: s\r\n\r\nbody\r\n")
    assert reply.code == 250
    [(qid, env, handed_over)] = submitted.calls
    assert handed_over                      # the commit's claim went to the scheduler, held
    assert env.sender == "SRS0=x@example.com" and env.prepend == "X-Added: yes\r\n"
    assert env.held and env.extra["quarantine"] == "stage: suspicious"
    with open(store.body_path(qid), "rb") as f:
        body = f.read()
    assert b"X-Drop" not in body and b"Subject: s\r\n\r\nbody\r\n" in body
    assert store.load(qid) == env
    assert open_queue_fds(store) == []


async def test_a_queued_message_gets_postfix_client_and_message_id_lines(
        store: QueueStore, caplog: pytest.LogCaptureFixture) -> None:
    """smtpd's ``QID: client=NAME[IP]`` (what pflogsumm counts as received) and cleanup's
    ``QID: message-id=<>``, with the queue id the 250 names."""
    caplog.set_level(logging.INFO)
    session, submitted = make_session(store, pipeline=Pipeline(
        [], [Stage(sender="SRS0=x@example.com")]), hold=True)
    reply = await send(session, b"Subject: s\r\nMessage-ID: <m1@a.test>\r\n\r\nbody\r\n")
    assert reply.code == 250
    [(qid, env, _)] = submitted.calls
    assert env.held                         # PYMTA_HOLD_INCOMING
    assert str(reply).endswith(f"queued as {qid}")
    lines = [(r.name, r.getMessage()) for r in caplog.records if r.getMessage().startswith(qid)]
    assert lines == [("pymta.smtpd", f"{qid}: client=unknown[{PEER}]"),
                     ("pymta.cleanup", f"{qid}: message-id=<m1@a.test>")], lines


@pytest.mark.parametrize("action", [Action.REJECT, Action.TEMPFAIL, Action.DISCARD])
async def test_refused_or_discarded_messages_never_reach_the_queue(
        store: QueueStore, action: Action) -> None:
    session, submitted = make_session(store, pipeline=Pipeline([Stage(action)]))
    reply = await send(session, b"Subject: s\r\n\r\nbody\r\n")
    assert reply.code == {Action.REJECT: 451, Action.TEMPFAIL: 451, Action.DISCARD: 250}[
        action]   # a REJECT verdict without a reply of its own gets the temporary one
    assert submitted.calls == []
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}


async def test_disconnect_after_the_checks_aborts_the_spool_before_the_commit(
        store: QueueStore, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the pipeline is done a disconnect aborts the spool at once; a commit that has
    not taken it yet then finds it closed: nothing queued, one NOTICE line."""
    caplog.set_level(logging.DEBUG)
    session, submitted = make_session(store, pipeline=Pipeline([Stage()]))
    real_accept = Intake.accept

    async def accept_after_disconnect(self: Intake, spool: Any, envelope: Envelope,
                                      decision: Decision | None = None) -> str:
        session.abort()                     # connection_lost, between checks and commit
        return await real_accept(self, spool, envelope, decision)

    monkeypatch.setattr(Intake, "accept", accept_after_disconnect)
    reply = await send(session, b"Subject: s\r\n\r\nbody\r\n")
    assert reply.code != 250 and submitted.calls == []
    assert listing(store) == {"tmp": [], "data": [], "env": [], "corrupt": []}
    assert open_queue_fds(store) == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert lines == [f"lost connection after END-OF-MESSAGE from unknown[{PEER}]"]
