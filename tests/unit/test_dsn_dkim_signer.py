"""DKIM signatures on the DSNs pymta writes (issue 15, item 7): which From domains are
covered, the signer over a real ``build_dsn`` notice (verified by dkimpy with the public key
handed to it directly: no DNS here; tests/integration/test_dsn_dkim.py does it through the
test DNS server), and the queue manager's use of it, including a signer that fails."""

from __future__ import annotations

import logging
from pathlib import Path

import dkim
import pytest

from pymta import wiring
from pymta.config.model import Config
from pymta.contracts import NoticeSigner
from pymta.pipeline.dkimkeys import DkimKey, KeyStore
from pymta.pipeline.dkimsign import FromDomainSigner, covering_domain
from pymta.queue.dsn import DsnEntry, build_dsn
from pymta.queue.manager import QueueManager
from pymta.queue.retry import RetryPolicy
from pymta.types import Envelope, Recipient, Reply
from tests.unit.test_manager import (
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


def _store(tmp_path: Path, algorithm: str = "rsa") -> tuple[KeyStore, DkimKey]:
    keys = KeyStore(str(tmp_path / "state"), "notices", algorithm=algorithm, bits=1024)
    return keys, keys.get("example.org")


def _dnsfunc(key: DkimKey):
    record = key.txt_value().encode()

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes | None:
        return record if name.decode().rstrip(".") == key.record_name else None

    return dnsfunc


def _tags(field: bytes) -> dict[str, str]:
    """The tags of a (folded) DKIM-Signature field, whitespace removed."""
    value = b"".join(field.split()).decode().partition(":")[2]
    return dict(tag.split("=", 1) for tag in value.split(";") if tag)


def _notice(tmp_path: Path, reporting_mta: str) -> bytes:
    original = tmp_path / "original"
    original.write_bytes(b"From: <alice@example.org>\r\nSubject: hi\r\n\r\nhello\r\n")
    env = Envelope(sender="alice@example.org",
                   recipients=[Recipient("bob@example.net", "bob@example.net", local=False)],
                   received_at=1_700_000_000.0, next_attempt=1_700_000_000.0)
    entry = DsnEntry(env.recipients[0], "failed", "5.1.1", Reply(550, "5.1.1", "unknown"))
    return build_dsn(reporting_mta=reporting_mta, qid="Q0001", envelope=env,
                     entries=[entry], body_path=str(original), now=1_700_000_100.0,
                     action_kind="failed")


# ------------------------------------------------------------------------------ the rule


@pytest.mark.parametrize(("author", "expected"), [
    ("example.org", "example.org"),           # a signed domain itself
    ("mx.example.org", "example.org"),        # the host name under it: its closest parent
    ("a.b.Example.ORG.", "example.org"),      # case and a root dot do not matter
    ("mx.sub.example.org", "sub.example.org"),  # the closest listed parent wins
    ("example.net", None),
    ("notexample.org", None),                 # a suffix match is not a parent
    ("org", None),                            # never a bare top-level label
    ("", None),
])
def test_issue15_dsn_dkim_covering_domain(author: str, expected: str | None) -> None:
    domains = frozenset({"example.org", "sub.example.org", "org.invalid"})
    assert covering_domain(author, domains) == expected


# ------------------------------------------------------------------------------ the signer


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_issue15_dsn_dkim_signer_signs_a_notice_from_the_host_name(
        tmp_path: Path, algorithm: str) -> None:
    keys, key = _store(tmp_path, algorithm)
    signer = FromDomainSigner(keys, ["example.org", "example.com"])
    assert isinstance(signer, NoticeSigner)
    notice = _notice(tmp_path, "mx.example.org")
    field = signer(notice)
    assert field.startswith(b"DKIM-Signature: ") and field.endswith(b"\r\n")
    tags = _tags(field)
    assert (tags["a"], tags["c"], tags["d"], tags["s"]) == (
        f"{algorithm}-sha256", "relaxed/relaxed", "example.org", "notices")
    signed = field + notice
    assert dkim.verify(signed, dnsfunc=_dnsfunc(key))
    assert not dkim.verify(signed.replace(b"unknown", b"unknowN"), dnsfunc=_dnsfunc(key))
    # the usual fields are signed, From oversigned
    h = tags["h"].lower().split(":")
    assert {"from", "to", "subject", "date", "message-id", "mime-version",
            "content-type"} <= set(h)
    assert h.count("from") == 2


def test_issue15_dsn_dkim_signer_leaves_other_domains_alone(tmp_path: Path) -> None:
    keys, _ = _store(tmp_path)
    signer = FromDomainSigner(keys, ["example.org"])
    assert signer(_notice(tmp_path, "mx.other.test")) == b""
    assert signer(_notice(tmp_path, "localhost")) == b""
    # no key was made for a domain we do not sign for
    assert sorted(p.name for p in (tmp_path / "state" / "dkim").iterdir()) == [
        "example.org.notices._domainkey.txt", "example.org.notices.key"]


def test_issue15_dsn_dkim_wiring_builds_a_signer_only_when_signing(tmp_path: Path) -> None:
    base = Config(hostname="mx.example.org", mail_domain=("example.org",),
                  state_dir=str(tmp_path / "state"))
    services = wiring.Services.from_config(base)
    assert isinstance(wiring.notice_signer(base, services), FromDomainSigner)
    off = Config(hostname="mx.example.org", mail_domain=("example.org",),
                 state_dir=str(tmp_path / "state"), dkim_sign=False, arc=True)
    assert wiring.notice_signer(off, wiring.Services.from_config(off)) is None
    none = Config(hostname="mx.example.org", mail_domain=(), state_dir=str(tmp_path))
    assert wiring.notice_signer(none, wiring.Services.from_config(none)) is None


# ------------------------------------------------------------------------------ the manager


def _manager(tmp_path: Path, signer: NoticeSigner | None) -> tuple[QueueManager, FakeStore,
                                                                     Clock]:
    store = FakeStore(tmp_path)
    clock = Clock()
    remote = Agent(always(REJECT), relay="mx.example.net[192.0.2.1]:25")
    mgr = QueueManager(store, Router(remote, Agent(always(Reply(250, "2.0.0", "Ok")))),
                       policy=RetryPolicy(jitter=0), hostname="mta.example.org",
                       postmaster="postmaster@example.org", resolve=resolve, clock=clock,
                       signer=signer)
    return mgr, store, clock


async def test_issue15_dsn_dkim_manager_queues_the_bounce_signed(tmp_path: Path,
                                                                  caplog) -> None:
    caplog.set_level(logging.INFO)
    keys, key = _store(tmp_path)
    mgr, store, clock = _manager(tmp_path, FromDomainSigner(keys, ["example.org"]))
    qid = await put(store, clock)
    await mgr.run_once_due()
    [dsn_qid] = store.ids()
    data = store.body(dsn_qid)
    assert data.startswith(b"DKIM-Signature: ")
    assert _tags(data.split(b"\r\nFrom: ")[0])["d"] == "example.org"
    assert dkim.verify(data, dnsfunc=_dnsfunc(key))
    denv = store.load(dsn_qid)
    assert denv is not None and denv.size == len(data) and denv.is_bounce
    assert parse(data)["From"].startswith("MAILER-DAEMON@mta.example.org")
    assert f"{qid}: sender non-delivery notification: {dsn_qid}" in caplog.text
    assert f"{dsn_qid}: DKIM-signed d=example.org s=notices a=rsa-sha256" in caplog.text


class _Broken:
    def __call__(self, message: bytes) -> bytes:
        raise PermissionError(13, "Permission denied", "/state/dkim/example.org.notices.key")


async def test_issue15_dsn_dkim_signing_fault_queues_the_notice_unsigned(tmp_path: Path,
                                                                         caplog) -> None:
    caplog.set_level(logging.INFO)
    mgr, store, clock = _manager(tmp_path, _Broken())
    qid = await put(store, clock)
    await mgr.run_once_due()
    [dsn_qid] = store.ids()        # the original is done: its notice is queued, never lost
    data = store.body(dsn_qid)
    assert data.startswith(b"From: MAILER-DAEMON@mta.example.org")
    assert b"DKIM-Signature" not in data
    assert store.load(dsn_qid).size == len(data)  # type: ignore[union-attr]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        f"{qid}: failed notification not DKIM-signed: Permission denied (EACCES) "
        "(/state/dkim/example.org.notices.key); it goes out unsigned"]
    assert "DKIM-signed d=" not in caplog.text


async def test_issue15_dsn_dkim_no_signer_is_exactly_as_before(tmp_path: Path) -> None:
    mgr, store, clock = _manager(tmp_path, None)
    await put(store, clock)
    await mgr.run_once_due()
    [dsn_qid] = store.ids()
    assert store.body(dsn_qid).startswith(b"From: MAILER-DAEMON@mta.example.org")


async def test_issue15_dsn_dkim_unreadable_key_file_queues_the_notice_unsigned(
        tmp_path: Path, caplog) -> None:
    """The real signer over a key file that cannot be read as a key (replaced after the
    start, say): the bounce is queued all the same, unsigned, and the log names the file."""
    state = tmp_path / "state"
    (state / "dkim").mkdir(parents=True)
    (state / "dkim" / "example.org.notices.key").write_text("not a key\n")
    keys = KeyStore(str(state), "notices", bits=1024)
    mgr, store, clock = _manager(tmp_path, FromDomainSigner(keys, ["example.org"]))
    await put(store, clock)
    await mgr.run_once_due()
    [dsn_qid] = store.ids()
    data = store.body(dsn_qid)
    assert data.startswith(b"From: MAILER-DAEMON@mta.example.org")
    assert b"DKIM-Signature" not in data
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "failed notification not DKIM-signed" in warning
    assert "example.org.notices.key" in warning and warning.endswith("; it goes out unsigned")
