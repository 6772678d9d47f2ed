"""Issue 11: NOTIFY=DELAY is acted on -- delay DSNs ("Delayed Mail (still being retried)").

The queue manager sends one delay notice per recipient, after a failed attempt, once the
message has been queued longer than the delay threshold: ``PYMTA_DELAY_WARNING_TIME`` for
every recipient whose NOTIFY allows it (none given, or one with DELAY), or, while that is 0
(off, the default), ``DSN_DELAY_DEFAULT`` for recipients that asked with ``NOTIFY=DELAY``.
Clocks are injected; nothing here waits for real time.
"""

from __future__ import annotations

import email.utils
import logging

import pytest

from pymta.queue import codec
from pymta.queue.manager import DELAY_NOTIFIED, DSN_DELAY_DEFAULT, QueueManager
from pymta.queue.retry import RetryPolicy
from pymta.types import Envelope, RcptState, Recipient, Reply
from tests.unit.test_manager import (
    DEFER,
    OK,
    REJECT,
    Agent,
    Clock,
    FakeStore,
    Router,
    always,
    parse,
    put,
    resolve,
)

HOUR = 3600.0
LIFETIME = 5 * 86400.0
MX = "mx.example.net[192.0.2.1]:25"


class RecordingStore(FakeStore):
    """The fake store, keeping a copy of every message queued through it (the notices are
    delivered, and so removed, by later runs)."""

    def __init__(self, tmp_path) -> None:
        super().__init__(tmp_path)
        self.queued: list[bytes] = []

    async def enqueue_bytes(self, envelope: Envelope, data: bytes) -> str:
        qid = await super().enqueue_bytes(envelope, data)
        self.queued.append(data)
        return qid


def make(tmp_path, remote: Agent, *, delay_warning: float | None = None,
         local: Agent | None = None, clock: Clock | None = None,
         store: RecordingStore | None = None, lifetime: float = LIFETIME):
    """A manager on a fake store; ``delay_warning`` None leaves the constructor's default."""
    store = store or RecordingStore(tmp_path)
    clock = clock or Clock()
    kw = {} if delay_warning is None else {"delay_warning": delay_warning}
    mgr = QueueManager(store, Router(remote, local or Agent(always(OK))),
                       policy=RetryPolicy(lifetime=lifetime, jitter=0),
                       hostname="mta.example.org", postmaster="postmaster@example.org",
                       resolve=resolve, clock=clock, **kw)
    return mgr, store, clock


def rcpt(address: str = "bob@example.net", notify: str | None = None, **kw) -> Recipient:
    return Recipient(address, address, local=False, notify=notify, **kw)


def notices(store: RecordingStore, qid: str) -> list:
    """The DSNs queued so far (every message queued but the original ``qid``), parsed,
    oldest first."""
    return [parse(data) for data in store.queued[1:]]


def report(msg):
    """(per-message block, per-recipient blocks) of a DSN's delivery-status part."""
    blocks = msg.get_payload()[1].get_payload()
    return blocks[0], blocks[1:]


async def attempt_at(mgr: QueueManager, clock: Clock, qid: str, when: float) -> None:
    """Make ``qid`` due at wall time ``when`` and run the attempts due then."""
    clock.t = when
    env = mgr._store.load(qid)
    if env is not None:
        env.next_attempt = when
        await mgr._store.save(qid, env)
    await mgr.run_once_due()


# ------------------------------------------------------------------------ the regression


async def test_issue11_notify_delay_sends_a_delay_dsn(tmp_path, caplog):
    """RCPT TO:<bob> NOTIFY=FAILURE,DELAY to a next hop that keeps answering 451: once the
    message is older than the threshold (PYMTA_DELAY_WARNING_TIME unset: 4 hours for an
    explicit NOTIFY=DELAY), the failed attempt queues one "delayed" report to the sender."""
    caplog.set_level(logging.INFO)
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote)
    received = clock.t
    qid = await put(store, clock, rcpts=[rcpt(notify="FAILURE,DELAY",
                                              orcpt="rfc822;bob@example.net")],
                    envid="ENV-1", ret="FULL")
    await mgr.run_once_due()                          # deferred, young: nothing to report
    assert store.ids() == [qid]
    await attempt_at(mgr, clock, qid, received + 4 * HOUR + 60)
    [dsn] = notices(store, qid)
    [dsn_qid] = [q for q in store.ids() if q != qid]    # not delivered yet: no run since
    denv = store.load(dsn_qid)
    assert denv.sender == "" and denv.is_bounce
    assert [r.address for r in denv.recipients] == ["alice@example.org"]
    assert dsn["Subject"] == "Delayed Mail (still being retried)"
    assert dsn["To"] == "alice@example.org"
    per_msg, [bob] = report(dsn)
    assert per_msg["Original-Envelope-Id"] == "ENV-1"
    assert per_msg["X-Pymta-Queue-ID"] == qid
    assert bob["Final-Recipient"] == "rfc822; bob@example.net"
    assert bob["Original-Recipient"] == "rfc822; bob@example.net"
    assert bob["Action"] == "delayed"
    assert bob["Status"] == "4.7.1"                   # from the last reply
    assert bob["Remote-MTA"] == "dns; mx.example.net"
    assert bob["Diagnostic-Code"] == f"smtp; {DEFER}"
    until = email.utils.parsedate_to_datetime(bob["Will-Retry-Until"]).timestamp()
    assert until == received + LIFETIME
    # headers only, whatever RET says (a warning, not a bounce)
    assert dsn.get_payload()[2].get_content_type() == "text/rfc822-headers"
    human = dsn.get_payload()[0].get_content()
    assert "THIS IS A WARNING ONLY" in human
    assert f"<bob@example.net>: host mx.example.net said: {DEFER}" in human
    assert f"{qid}: sender delay notification: {dsn_qid}" in caplog.text
    # the original stays queued, still pending, and remembers the notice
    env = store.load(qid)
    assert env.recipients[0].state is RcptState.PENDING
    assert env.extra[DELAY_NOTIFIED] == "0"


# ------------------------------------------------------------------------ thresholds


async def test_issue11_explicit_delay_waits_for_the_default_threshold(tmp_path):
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote)
    received = clock.t
    qid = await put(store, clock, rcpts=[rcpt(notify="DELAY")])
    await attempt_at(mgr, clock, qid, received + DSN_DELAY_DEFAULT - 1)
    assert notices(store, qid) == []
    await attempt_at(mgr, clock, qid, received + DSN_DELAY_DEFAULT)
    [dsn] = notices(store, qid)
    assert report(dsn)[1][0]["Action"] == "delayed"


async def test_issue11_default_notify_gets_no_delay_notice_when_the_setting_is_off(tmp_path):
    """As Postfix with delay_warning_time = 0: the default NOTIFY never warns."""
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote)
    received = clock.t
    qid = await put(store, clock)
    for hours in (1, 5, 24, 100):
        await attempt_at(mgr, clock, qid, received + hours * HOUR)
    assert notices(store, qid) == []
    assert DELAY_NOTIFIED not in store.load(qid).extra


async def test_issue11_delay_warning_time_covers_the_default_notify(tmp_path):
    """PYMTA_DELAY_WARNING_TIME > 0: recipients without NOTIFY are warned too, those with
    NOTIFY=DELAY at the same (configured) time; NOTIFY=NEVER and NOTIFY without DELAY never.
    One report lists every recipient it concerns."""
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR)
    received = clock.t
    rcpts = [rcpt("dflt@example.net"), rcpt("never@example.net", "NEVER"),
             rcpt("fail@example.net", "FAILURE"), rcpt("succ@example.net", "SUCCESS,FAILURE"),
             rcpt("delay@example.net", "FAILURE,DELAY")]
    qid = await put(store, clock, rcpts=rcpts)
    await attempt_at(mgr, clock, qid, received + HOUR - 1)
    assert notices(store, qid) == []
    await attempt_at(mgr, clock, qid, received + HOUR)
    [dsn] = notices(store, qid)
    _, blocks = report(dsn)
    assert [b["Final-Recipient"] for b in blocks] == ["rfc822; dflt@example.net",
                                                      "rfc822; delay@example.net"]
    assert {b["Action"] for b in blocks} == {"delayed"}
    assert sorted(store.load(qid).extra[DELAY_NOTIFIED].split()) == ["0", "4"]


async def test_issue11_configured_time_also_applies_to_explicit_delay(tmp_path):
    """A configured PYMTA_DELAY_WARNING_TIME is the threshold for NOTIFY=DELAY too, shorter
    or longer than the default."""
    for configured in (HOUR, 10 * HOUR):
        remote = Agent(always(DEFER), relay=MX)
        sub = tmp_path / str(int(configured))
        sub.mkdir()
        mgr, store, clock = make(sub, remote, delay_warning=configured)
        received = clock.t
        qid = await put(store, clock, rcpts=[rcpt(notify="DELAY")])
        await attempt_at(mgr, clock, qid, received + configured - 1)
        assert notices(store, qid) == []
        await attempt_at(mgr, clock, qid, received + configured)
        assert len(notices(store, qid)) == 1


# ------------------------------------------------------------------------ once per recipient


async def test_issue11_one_delay_notice_per_recipient_across_retries_and_restarts(tmp_path):
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR)
    received = clock.t
    qid = await put(store, clock, rcpts=[rcpt(notify="DELAY")])
    for hours in (1, 2, 3):
        await attempt_at(mgr, clock, qid, received + hours * HOUR)
    assert len(notices(store, qid)) == 1
    # a new process on the same queue: the mark is on disk, no second notice
    mgr2, _, _ = make(tmp_path, Agent(always(DEFER), relay=MX), delay_warning=HOUR,
                      store=store, clock=clock)
    for hours in (4, 10):
        await attempt_at(mgr2, clock, qid, received + hours * HOUR)
    assert len(notices(store, qid)) == 1
    assert store.load(qid).recipients[0].attempts == 5


def test_issue11_delay_mark_survives_the_queue_codec():
    original = Envelope("alice@example.org", [rcpt(), rcpt("carol@example.net")], 1.0, 2.0,
                        extra={DELAY_NOTIFIED: "0 1"})
    again = codec.decode(codec.encode(original))
    assert again.extra == {DELAY_NOTIFIED: "0 1"}
    assert again == original


async def test_issue11_recipient_deferred_after_the_notice_is_not_warned_again(tmp_path):
    """Two recipients warned together; one later delivered, the other still deferred: no
    further delay notice for either, and the final failure notice follows at expiry."""
    remote = Agent(lambda r, n: OK if r.address.startswith("a") and n >= 3 else DEFER,
                   relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR, lifetime=10 * HOUR)
    received = clock.t
    qid = await put(store, clock, rcpts=[rcpt("a@example.net"), rcpt("b@example.net")])
    await attempt_at(mgr, clock, qid, received + HOUR)     # warned: both
    await attempt_at(mgr, clock, qid, received + 2 * HOUR)
    await attempt_at(mgr, clock, qid, received + 3 * HOUR)  # a delivered
    await attempt_at(mgr, clock, qid, received + 10 * HOUR)  # b expires
    msgs = notices(store, qid)
    assert [m["Subject"] for m in msgs] == ["Delayed Mail (still being retried)",
                                            "Undelivered Mail Returned to Sender"]
    assert [b["Final-Recipient"] for b in report(msgs[0])[1]] == ["rfc822; a@example.net",
                                                                  "rfc822; b@example.net"]
    [failed] = report(msgs[1])[1]
    assert failed["Final-Recipient"] == "rfc822; b@example.net"
    assert failed["Action"] == "failed" and failed["Status"] == "4.4.7"
    assert "Will-Retry-Until" not in failed
    assert qid not in store.ids()


# ------------------------------------------------------------------------ never


async def test_issue11_never_a_delay_notice_to_the_null_sender(tmp_path):
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR)
    received = clock.t
    qid = await put(store, clock, sender="", rcpts=[rcpt(notify="DELAY")])
    await attempt_at(mgr, clock, qid, received + 5 * HOUR)
    assert store.ids() == [qid]              # no notice, not to the postmaster either
    assert DELAY_NOTIFIED not in store.load(qid).extra


async def test_issue11_never_a_delay_notice_for_a_bounce(tmp_path):
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR)
    received = clock.t
    qid = await put(store, clock, sender="", is_bounce=True,
                    rcpts=[rcpt("alice@example.net")])
    await attempt_at(mgr, clock, qid, received + 5 * HOUR)
    assert store.ids() == [qid]


async def test_issue11_no_delay_notice_for_an_unsendable_sender_and_no_retry(tmp_path):
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR)
    received = clock.t
    qid = await put(store, clock, sender="bad sender@exa\x01mple.org")
    await attempt_at(mgr, clock, qid, received + HOUR)
    assert store.ids() == [qid]              # dropped, as success reports are
    assert store.load(qid).extra[DELAY_NOTIFIED] == "0"


async def test_issue11_no_delay_notice_before_a_failed_attempt(tmp_path):
    """Old enough, but delivered (or refused for good) at its attempt: no warning."""
    remote = Agent(lambda r, n: OK if r.address.startswith("ok") else REJECT, relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR)
    qid = await put(store, clock, received_at=clock.t - 5 * HOUR,
                    rcpts=[rcpt("ok@example.net"), rcpt("no@example.net")])
    await mgr.run_once_due()
    msgs = notices(store, qid)
    assert [m["Subject"] for m in msgs] == ["Undelivered Mail Returned to Sender"]
    assert qid not in store.ids()


async def test_issue11_expiring_attempt_sends_the_failure_not_a_warning(tmp_path):
    """The first attempt past the threshold is also past the lifetime: only the failure
    notice (Postfix: a message that is bounced is not warned about)."""
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR, lifetime=2 * HOUR)
    qid = await put(store, clock, received_at=clock.t - 3 * HOUR,
                    rcpts=[rcpt(notify="FAILURE,DELAY")])
    await mgr.run_once_due()
    [dsn] = notices(store, qid)
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    assert report(dsn)[1][0]["Status"] == "4.4.7"


async def test_issue11_lifetime_shorter_than_the_threshold_never_warns(tmp_path):
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=4 * HOUR, lifetime=2 * HOUR)
    received = clock.t
    qid = await put(store, clock, rcpts=[rcpt(notify="DELAY,FAILURE")])
    await attempt_at(mgr, clock, qid, received + HOUR)
    await attempt_at(mgr, clock, qid, received + 2 * HOUR)
    assert [m["Subject"] for m in notices(store, qid)] == ["Undelivered Mail Returned to Sender"]


# ------------------------------------------------------------------------ faults


async def test_issue11_delay_notice_that_cannot_be_queued_is_tried_at_the_next_attempt(
        tmp_path, caplog):
    remote = Agent(always(DEFER), relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR)
    received = clock.t
    qid = await put(store, clock, rcpts=[rcpt(notify="DELAY")])
    real = store.enqueue_bytes

    async def broken(envelope, data):
        raise OSError(28, "No space left on device")

    store.enqueue_bytes = broken
    await attempt_at(mgr, clock, qid, received + HOUR)
    env = store.load(qid)
    assert DELAY_NOTIFIED not in env.extra                  # not sent: not marked
    assert env.recipients[0].state is RcptState.PENDING     # and delivery goes on
    assert env.next_attempt > clock.t
    assert "cannot queue delayed notification" in caplog.text
    store.enqueue_bytes = real
    await attempt_at(mgr, clock, qid, received + 2 * HOUR)
    assert len(notices(store, qid)) == 1
    assert store.load(qid).extra[DELAY_NOTIFIED] == "0"


async def test_issue11_status_is_a_4xx_code_even_without_one_in_the_reply(tmp_path):
    remote = Agent(always(Reply(421, "", "Service not available")), relay=MX)
    mgr, store, clock = make(tmp_path, remote, delay_warning=HOUR)
    qid = await put(store, clock, received_at=clock.t - 2 * HOUR,
                    rcpts=[rcpt(notify="DELAY")])
    await mgr.run_once_due()
    [dsn] = notices(store, qid)
    [bob] = report(dsn)[1]
    assert bob["Status"].startswith("4.")


def test_issue11_negative_delay_warning_is_refused(tmp_path):
    with pytest.raises(ValueError):
        make(tmp_path, Agent(always(OK)), delay_warning=-1.0)
