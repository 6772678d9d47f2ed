"""Issue 11: every extension point is a Protocol in ``pymta.contracts``, the adapters fill
them (optional capabilities seen by ``isinstance``, one lifecycle method ``aclose``), the
local queue store fills the store contract a networked store could fill too, and the core
imports no adapter by name."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from pymta import contracts
from pymta.backends.authchain import AuthChain
from pymta.backends.chain import LookupChain
from pymta.backends.imapauth import ImapAuthenticator
from pymta.backends.ldap import LdapLookup
from pymta.backends.ldapauth import LdapBindAuthenticator
from pymta.backends.mysql import MysqlLookup
from pymta.backends.mysqlauth import MysqlAuthenticator
from pymta.backends.passwd import PasswordFile
from pymta.backends.regex import RegexRewrite, parse_regex_alias
from pymta.backends.table import TableLookup
from pymta.delivery.lmtp import LMTPDeliveryAgent
from pymta.delivery.local import LocalDeliveryAgent
from pymta.delivery.relay import SMTPRelayAgent
from pymta.delivery.router import StaticRouter, UnroutableAgent
from pymta.pipeline import Check, Modifier
from pymta.pipeline.authresults import AuthResultsModifier
from pymta.pipeline.dkimverify import DkimVerify
from pymta.pipeline.dmarc import DMARCCheck
from pymta.pipeline.spf import SPFCheck
from pymta.queue.spool import SpoolWriter
from pymta.queue.store import MessageLock, QueueStore
from pymta.receiving.auth import AuthPolicy
from pymta.srs.reverse import SRSLookup
from pymta.types import Envelope, Recipient

REPO = Path(__file__).resolve().parents[2]


def test_recipient_lookups_and_their_lifecycle() -> None:
    table = TableLookup.from_text(("example.com",), "a@example.com", "")
    chain = LookupChain([table], ("example.com",))
    for lookup in (table, chain, RegexRewrite(parse_regex_alias("/x/ y"), chain,
                                              ("example.com",))):
        assert isinstance(lookup, contracts.RecipientLookup)
    for cls in (LdapLookup, MysqlLookup, SRSLookup):
        assert issubclass(cls, contracts.RecipientLookup)
    # what holds pools or threads closes with aclose(); a precomputed table holds nothing
    for cls in (LookupChain, RegexRewrite, LdapLookup, MysqlLookup):
        assert issubclass(cls, contracts.Closeable), cls
    assert not isinstance(table, contracts.Closeable)


def test_authenticators_and_the_cram_md5_capability() -> None:
    plain = PasswordFile.from_text("a:{plain}x")
    assert isinstance(plain, contracts.CramMD5Authenticator) and plain.supports_cram_md5
    for cls in (LdapBindAuthenticator, MysqlAuthenticator, ImapAuthenticator):
        assert issubclass(cls, contracts.Authenticator)
        assert not hasattr(cls, "authenticate_cram_md5"), cls   # not a CRAM authenticator
    chain = AuthChain([plain])
    assert isinstance(chain, contracts.CramMD5Authenticator) and chain.supports_cram_md5
    assert isinstance(chain, contracts.Closeable)
    for cls in (LdapBindAuthenticator, MysqlAuthenticator):
        assert issubclass(cls, contracts.Closeable)
    assert AuthPolicy(chain).mechanisms[-1] == "CRAM-MD5"


async def test_delivery_agents_and_their_capabilities(tmp_path: Path) -> None:
    local = LocalDeliveryAgent(str(tmp_path), "mx.example.com")
    relay = SMTPRelayAgent(hostname="mx.example.com")
    lmtp = LMTPDeliveryAgent("lmtp:unix:/nonexistent", "mx.example.com")
    router = StaticRouter(local, relay)
    try:
        for agent in (local, relay, lmtp, UnroutableAgent()):
            assert isinstance(agent, contracts.DeliveryAgent)
        for agent in (local, relay, lmtp):
            assert isinstance(agent, contracts.ProgressReportingAgent)
        assert not isinstance(UnroutableAgent(), contracts.ProgressReportingAgent)
        assert isinstance(local, contracts.StoppableAgent)
        assert isinstance(relay, contracts.FlushableAgent)
        assert isinstance(local, contracts.Closeable) and isinstance(relay, contracts.Closeable)
        assert isinstance(router, contracts.Router)
        for capability in (contracts.StoppableAgent, contracts.FlushableAgent,
                           contracts.Closeable):
            assert isinstance(router, capability)       # passed on to its agents
    finally:
        await router.aclose()


def test_pipeline_stages_are_checks_and_modifiers() -> None:
    for check in (SPFCheck(receiver="mx.example.com"), DkimVerify(), DMARCCheck()):
        assert isinstance(check, Check)
    assert isinstance(AuthResultsModifier("mx.example.com"), Modifier)
    assert Check is contracts.Check and Modifier is contracts.Modifier


def test_old_names_still_resolve() -> None:
    from pymta import types

    assert types.RecipientLookup is contracts.RecipientLookup
    assert types.DeliveryAgent is contracts.DeliveryAgent
    with pytest.raises(AttributeError):
        types.NoSuchThing  # noqa: B018


async def test_the_local_store_fills_the_store_contract(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue", hand_over_locks=True)
    await store.start()
    try:
        assert isinstance(store, contracts.QueueStore)
        spool = store.new_spool()
        assert isinstance(spool, SpoolWriter) and isinstance(spool, contracts.Spool)
        spool.write(b"Subject: s\r\n\r\nbody\r\n")
        now = time.time()
        env = Envelope("a@x.test", [Recipient("b@example.com", "b@example.com")], now, now)
        qid = await store.commit(spool, env)
        lock = spool.lock
        assert isinstance(lock, MessageLock) and isinstance(lock, contracts.MessageLock)
        assert lock.held and lock.qid == qid
        assert await store.claim(qid) is None               # held: nobody else gets it
        assert await store.list_queued() == [qid]
        assert await store.load_envelope(qid) == env
        assert await store.exists(qid)
        with open(await store.open_body(qid), "rb") as f:
            assert f.read() == b"Subject: s\r\n\r\nbody\r\n"
        lock.release()
        claim = await store.claim(qid)
        assert claim is not None and claim.held
        await store.remove(qid)
        assert not claim.held                               # the claim went with it
        claim.release()
        assert await store.list_queued() == [] and not await store.exists(qid)
        assert await store.load_envelope(qid) is None
    finally:
        await store.aclose()


# The core never names an adapter: only the wiring does (``pymta.app`` builds a server
# through it; the configuration checks live in the adapters, ``from_config``/``check_config``).
WIRING = {"pymta/wiring.py"}
NOT_YET: set[str] = set()


def test_the_core_imports_no_adapter_by_name() -> None:
    offenders = []
    for path in sorted((REPO / "pymta").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        if rel in WIRING or rel in NOT_YET:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[:2] in (["pymta", "backends"], ["pymta", "delivery"]):
                    offenders.append(f"{rel}: {name}")
    assert offenders == []
