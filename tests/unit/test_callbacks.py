"""Plain Python values as a server's recipient lookup and local delivery agent (issue 11,
item 5): a dict or a function (``async def`` or not) answers RCPT, a function receives each
message. What the values mean, what an exception means, and that they go into the same
lookup chain (cache, aliases) as the configured sources. The SMTP replies they give are
tested over a real connection in ``tests/integration/test_embedding.py``."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import pytest

from pymta.app import MTA
from pymta.callbacks import (
    CallableAgent,
    CallableLookup,
    MappingLookup,
    as_delivery_agent,
    as_recipient_lookup,
    message_bytes,
)
from pymta.config.model import Config
from pymta.contracts import DeliveryAgent, RecipientLookup
from pymta.types import (
    Address,
    Destination,
    Envelope,
    Outcome,
    OutcomeKind,
    QueuedMessage,
    Recipient,
    Reply,
    SMTPError,
    Target,
    TemporaryFailure,
)
from pymta.wiring import recipient_lookup

CONFIG = Config(hostname="mx.example.com", mail_domain=("example.com", "example.org"))


def one(address: str, mailbox: str | None) -> Destination:
    return Destination((Target(address, True, mailbox),))


# --------------------------------------------------------------------------- lookup values


@pytest.mark.parametrize(("value", "expected"), [
    (None, None),
    (False, None),
    ("alice/", one("alice@example.com", "alice/")),
    ("mbox/alice", one("alice@example.com", "mbox/alice")),
    (True, one("alice@example.com", "alice@example.com")),
    (Target("bob@example.net", False), Destination((Target("bob@example.net", False),))),
    (one("carol@example.com", "carol/"), one("carol@example.com", "carol/")),
    ([Target("a@example.net", False), Target("b@example.net", False)],
     Destination((Target("a@example.net", False), Target("b@example.net", False)))),
    ((Target("a@example.net", False),), Destination((Target("a@example.net", False),))),
    ([], None),
])
async def test_mapping_value_meanings(value: object, expected: Destination | None) -> None:
    lookup = MappingLookup({"alice@example.com": value})
    assert await lookup.lookup(Address("alice@example.com")) == expected


async def test_missing_key_is_unknown() -> None:
    assert await MappingLookup({"alice@example.com": "alice/"}).lookup(
        Address("bob@example.com")) is None


async def test_mapping_falls_back_to_the_lower_case_key() -> None:
    lookup = MappingLookup({"alice@example.com": "alice/", "Bob@Example.com": "exact/",
                            "bob@example.com": "folded/"})
    assert await lookup.lookup(Address("ALICE@Example.COM")) == one("ALICE@Example.COM",
                                                                     "alice/")
    # the key as written wins over the folded one
    assert await lookup.lookup(Address("Bob@Example.com")) == one("Bob@Example.com", "exact/")
    assert await lookup.lookup(Address("BOB@example.com")) == one("BOB@example.com", "folded/")


async def test_mapping_is_read_at_each_lookup() -> None:
    users: dict[str, object] = {}
    lookup = MappingLookup(users)
    assert await lookup.lookup(Address("new@example.com")) is None
    users["new@example.com"] = "new/"
    assert await lookup.lookup(Address("new@example.com")) == one("new@example.com", "new/")


async def test_a_sequence_of_other_things_is_a_clear_type_error() -> None:
    lookup = MappingLookup({"alice@example.com": ["bob@example.com"]})
    with pytest.raises(TypeError, match=r"<alice@example.com>: a sequence of Targets"):
        await lookup.lookup(Address("alice@example.com"))


async def test_sync_callable_gets_the_address_as_written() -> None:
    asked: list[str] = []

    def find(address: str) -> str | None:
        asked.append(address)
        return "box/" if address.lower() == "alice@example.com" else None

    lookup = as_recipient_lookup(find)
    assert isinstance(lookup, CallableLookup)
    assert await lookup.lookup(Address("Alice@Example.com")) == one("Alice@Example.com", "box/")
    assert await lookup.lookup(Address("bob@example.com")) is None
    assert asked == ["Alice@Example.com", "bob@example.com"]


async def test_async_def_lookup_is_awaited() -> None:
    async def find(address: str) -> object:
        return [Target("x@example.net", False)] if address == "fwd@example.com" else False

    lookup = as_recipient_lookup(find)
    assert await lookup.lookup(Address("fwd@example.com")) == Destination(
        (Target("x@example.net", False),))
    assert await lookup.lookup(Address("other@example.com")) is None


async def test_lookup_exceptions_pass_through_unchanged() -> None:
    """The session turns them into replies (451 either way, never 550); they must reach it
    as they were raised, through the chain too, and a failure is not cached."""
    calls = 0

    async def flaky(address: str) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TemporaryFailure("directory down")
        if calls == 2:
            raise RuntimeError("application bug")
        return "ok/"

    chain = recipient_lookup(CONFIG, [flaky])
    with pytest.raises(TemporaryFailure) as temp:
        await chain.lookup(Address("a@example.com"))
    assert (temp.value.reply.code, temp.value.reply.enhanced) == (451, "4.3.0")
    with pytest.raises(RuntimeError, match="application bug"):
        await chain.lookup(Address("a@example.com"))
    assert await chain.lookup(Address("a@example.com")) == one("a@example.com", "ok/")
    assert calls == 3


def test_as_recipient_lookup_keeps_lookups_and_wraps_the_rest() -> None:
    class Own:
        async def lookup(self, address: Address) -> Destination | None:
            return None

    own = Own()
    assert as_recipient_lookup(own) is own
    assert isinstance(as_recipient_lookup({}), MappingLookup)
    assert isinstance(as_recipient_lookup(lambda a: None), CallableLookup)
    assert isinstance(as_recipient_lookup({}), RecipientLookup)


@pytest.mark.parametrize("bad", ["alice@example.com", 42, None])
def test_a_lookup_of_the_wrong_kind_is_a_type_error(bad: object) -> None:
    with pytest.raises(TypeError, match="not a recipient lookup, mapping or callable"):
        as_recipient_lookup(bad)  # type: ignore[arg-type]


def test_mta_refuses_a_lookup_or_agent_of_the_wrong_kind(tmp_path: Path) -> None:
    config = dataclasses.replace(CONFIG, state_dir=str(tmp_path / "state"))
    with pytest.raises(TypeError, match="not a recipient lookup"):
        MTA(config, lookups="alice@example.com")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not a delivery agent or callable"):
        MTA(config, agent=42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- delivery


def queued(tmp_path: Path, *rcpts: str) -> tuple[QueuedMessage, list[Recipient]]:
    body = tmp_path / "body"
    body.write_bytes(b"Received: from x by mx.example.com\r\n\r\nhello\r\n")
    recipients = [Recipient(address=r, original=r) for r in rcpts]
    env = Envelope(sender="s@example.net", recipients=recipients, received_at=0.0,
                   next_attempt=0.0, prepend="Authentication-Results: mx.example.com; none\r\n")
    return QueuedMessage("Q1", env, str(body)), recipients


async def test_callback_returning_none_delivers_every_recipient(tmp_path: Path) -> None:
    got: list[tuple[bytes, list[str]]] = []

    async def deliver(msg: QueuedMessage, rcpts: Sequence[Recipient]) -> None:
        got.append((message_bytes(msg), [r.address for r in rcpts]))

    msg, rcpts = queued(tmp_path, "a@example.com", "b@example.com")
    outcomes = await as_delivery_agent(deliver).deliver(msg, rcpts)
    assert [(o.recipient, o.kind, o.reply.code) for o in outcomes] == [
        ("a@example.com", OutcomeKind.DELIVERED, 250),
        ("b@example.com", OutcomeKind.DELIVERED, 250)]
    # the message as delivered: the fields added after receiving, then the spooled message
    assert got == [(b"Authentication-Results: mx.example.com; none\r\n"
                    b"Received: from x by mx.example.com\r\n\r\nhello\r\n",
                    ["a@example.com", "b@example.com"])]


async def test_sync_callback_works_too(tmp_path: Path) -> None:
    seen: list[str] = []
    msg, rcpts = queued(tmp_path, "a@example.com")
    outcomes = await as_delivery_agent(lambda m, r: seen.append(m.qid)).deliver(msg, rcpts)
    assert seen == ["Q1"] and outcomes[0].kind is OutcomeKind.DELIVERED


async def test_callback_raising_temporary_failure_defers_every_recipient(tmp_path: Path) -> None:
    async def busy(msg: QueuedMessage, rcpts: Sequence[Recipient]) -> None:
        raise TemporaryFailure("mailbox busy", "4.2.0")

    msg, rcpts = queued(tmp_path, "a@example.com", "b@example.com")
    outcomes = await CallableAgent(busy).deliver(msg, rcpts)
    assert [(o.recipient, o.kind) for o in outcomes] == [
        ("a@example.com", OutcomeKind.TEMPORARY), ("b@example.com", OutcomeKind.TEMPORARY)]
    assert outcomes[0].reply == Reply(451, "4.2.0", "mailbox busy")


async def test_callback_raising_550_fails_every_recipient_permanently(tmp_path: Path) -> None:
    async def refuse(msg: QueuedMessage, rcpts: Sequence[Recipient]) -> None:
        raise SMTPError(Reply(550, "5.1.1", "no such user"))

    msg, rcpts = queued(tmp_path, "a@example.com")
    [outcome] = await CallableAgent(refuse).deliver(msg, rcpts)
    assert outcome.kind is OutcomeKind.PERMANENT
    assert outcome.reply == Reply(550, "5.1.1", "no such user")


async def test_callback_returning_outcomes_decides_per_recipient(tmp_path: Path) -> None:
    async def mixed(msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
        return [Outcome(rcpts[0].address, OutcomeKind.DELIVERED, Reply(250, "2.0.0", "ok")),
                Outcome(rcpts[1].address, OutcomeKind.PERMANENT, Reply(550, "5.2.1", "off"))]

    msg, rcpts = queued(tmp_path, "a@example.com", "b@example.com")
    outcomes = await CallableAgent(mixed).deliver(msg, rcpts)
    assert [(o.recipient, o.kind) for o in outcomes] == [
        ("a@example.com", OutcomeKind.DELIVERED), ("b@example.com", OutcomeKind.PERMANENT)]


@pytest.mark.parametrize("result", ["done", 1, ["not an outcome"]])
async def test_callback_returning_something_else_is_a_fault(tmp_path: Path,
                                                            result: object) -> None:
    """A fault, not a delivery: the queue manager makes any exception of an agent a
    temporary failure (retried; shown end to end in test_embedding)."""
    msg, rcpts = queued(tmp_path, "a@example.com")
    with pytest.raises(TypeError, match=r"None or a list of Outcomes"):
        await CallableAgent(lambda m, r: result).deliver(msg, rcpts)


async def test_callback_raising_another_exception_reaches_the_queue_manager(
        tmp_path: Path) -> None:
    async def broken(msg: QueuedMessage, rcpts: Sequence[Recipient]) -> None:
        raise KeyError("application bug")

    msg, rcpts = queued(tmp_path, "a@example.com")
    with pytest.raises(KeyError):   # never turned into a delivery or a permanent failure
        await CallableAgent(broken).deliver(msg, rcpts)


def test_as_delivery_agent_keeps_agents_and_wraps_callables() -> None:
    class Own:
        async def deliver(self, msg: QueuedMessage, rcpts: Sequence[Recipient]) -> list[Outcome]:
            return []

    own = Own()
    assert as_delivery_agent(own) is own
    wrapped = as_delivery_agent(lambda m, r: None)
    assert isinstance(wrapped, CallableAgent) and isinstance(wrapped, DeliveryAgent)
    with pytest.raises(TypeError, match="not a delivery agent or callable"):
        as_delivery_agent("local")  # type: ignore[arg-type]


def test_mta_routes_local_recipients_to_the_callback(tmp_path: Path) -> None:
    async def deliver(msg: QueuedMessage, rcpts: Sequence[Recipient]) -> None:
        return None

    config = dataclasses.replace(CONFIG, state_dir=str(tmp_path / "state"))
    mta = MTA(config, lookups={"a@example.com": True}, agent=deliver)
    key, agent = mta.router.route(Recipient("a@example.com", "a@example.com"))
    assert isinstance(agent, CallableAgent) and agent.callback is deliver
    remote_key, remote = mta.router.route(Recipient("x@example.net", "x@example.net",
                                                    local=False))
    assert remote is not agent and remote_key != key     # the relay, as configured
    with pytest.raises(ValueError, match="a router or a local delivery agent, not both"):
        MTA(config, agent=deliver, router=mta.router)
