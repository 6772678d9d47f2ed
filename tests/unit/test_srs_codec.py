"""SRS (issue 6, item 8): the codec against PostSRSd's own test vectors, verification
(hash, case, expiry, old secrets), the secret file, the config variables, the forward-rewrite
stage and the reverse lookup."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from pymta.config import load as load_mod
from pymta.config.errors import ConfigError
from pymta.config.load import load_config
from pymta.config.model import Config
from pymta.pipeline import Transaction
from pymta.srs import SRS, SRSError, build
from pymta.srs.codec import is_srs, load_secrets
from pymta.srs.reverse import SRSLookup
from pymta.srs.rewrite import SRSRewrite
from pymta.types import Address, Destination, Recipient, SMTPError, Target

# PostSRSd's tests/unit/test_srs2.c and its socketmap tests: secret "tops3cr3t", faketime
# 2020-01-01 00:01:00 UTC, SRS domain example.com.
T0 = 1577836860
DAY = 86400


def codec(now: float = T0, secrets: tuple[str, ...] = ("tops3cr3t",), **kw: object) -> SRS:
    clock = [now]
    srs = SRS(list(secrets), "example.com", clock=lambda: clock[0], **kw)  # type: ignore[arg-type]
    srs.clock = clock  # type: ignore[attr-defined]  # tests move time through it
    return srs


# ------------------------------------------------------------------------------ codec


def test_postsrsd_vectors_forward() -> None:
    srs = codec()
    assert srs.forward("test@otherdomain.com") == "SRS0=vmyz=2W=otherdomain.com=test@example.com"
    assert (srs.forward("SRS0=opaque+string@otherdomain.com")
            == "SRS1=chaI=otherdomain.com==opaque+string@example.com")
    assert (srs.forward("SRS1=X=thirddomain.com==opaque+string@otherdomain.com")
            == "SRS1=JIBX=thirddomain.com==opaque+string@example.com")


def test_postsrsd_vectors_reverse() -> None:
    srs = codec()
    assert srs.reverse("SRS0=vmyz=2W=otherdomain.com=test@example.com") == "test@otherdomain.com"
    assert (srs.reverse("SRS1=chaI=otherdomain.com==opaque+string@example.com")
            == "SRS0=opaque+string@otherdomain.com")


def test_not_rewritten() -> None:
    srs = codec()
    assert srs.forward("") == ""                       # null sender
    assert srs.forward("foo") == "foo"                 # no domain
    assert srs.forward("test@example.com") == "test@example.com"   # already our SRS domain
    assert srs.forward("test@EXAMPLE.COM") == "test@EXAMPLE.COM"


@pytest.mark.parametrize("sender", [
    "alice@origin.test", "Alice.Smith@Origin.Test", "a+tag@x.test", "a=b=c@x.test",
    "bounce-123=list@lists.example.net", '"john doe"@x.test', "ü@bücher.test",
])
def test_roundtrip(sender: str) -> None:
    srs = codec()
    rewritten = srs.forward(sender)
    assert rewritten.endswith("@example.com") and rewritten.lstrip('"').startswith("SRS0=")
    assert srs.reverse(rewritten) == sender


def test_srs1_of_srs0_and_back_to_the_first_hop() -> None:
    first = SRS(["hop1-secret"], "hop1.test", clock=lambda: T0)
    ours = codec()
    srs0 = first.forward("alice@origin.test")
    srs1 = ours.forward(srs0)
    assert srs1.startswith("SRS1=") and srs1.endswith("@example.com")
    assert "=hop1.test==" in srs1
    # reversing ours gives the first hop's SRS0, which the first hop reverses to alice
    back = ours.reverse(srs1)
    assert back == srs0
    assert first.reverse(back) == "alice@origin.test"
    # a third hop rewrites SRS1 to SRS1 pointing straight at the first hop
    third = SRS(["third"], "hop3.test", clock=lambda: T0)
    srs1b = third.forward(srs1)
    assert srs1b.endswith("@hop3.test") and "=hop1.test==" in srs1b
    assert third.reverse(srs1b) == srs0


def test_hash_is_case_insensitive_like_postsrsd() -> None:
    srs = codec()
    address = srs.forward("Test@OtherDomain.com")
    local, _, domain = address.rpartition("@")
    assert srs.reverse(local.upper() + "@" + domain) == "TEST@OTHERDOMAIN.COM"
    assert srs.reverse(local.lower() + "@" + domain) == "test@otherdomain.com"
    assert srs.reverse("srs0=VMYZ=2w=otherdomain.com=test@example.com") == "test@otherdomain.com"
    assert is_srs("srs0+x") and is_srs("SRS1-x") and not is_srs("srs2=x") and not is_srs("SRS0")


@pytest.mark.parametrize("forged", [
    "SRS0=abcd=2W=otherdomain.com=test@example.com",          # wrong hash
    "SRS0=vmyz=2W=otherdomain.com=evil@example.com",          # changed local part
    "SRS0=vmyz=2W=evildomain.com=test@example.com",           # changed domain
    "SRS0=vmyz=2X=otherdomain.com=test@example.com",          # changed timestamp
    "SRS0=vmy=2W=otherdomain.com=test@example.com",           # hash too short
    "SRS1=abcd=otherdomain.com==opaque+string@example.com",
])
def test_forged_addresses_are_refused(forged: str) -> None:
    with pytest.raises(SRSError) as info:
        codec().reverse(forged)
    assert info.value.reason == "forged"


@pytest.mark.parametrize("bad", [
    "SRS0=vmyz@example.com", "SRS0=vmyz=2W=otherdomain.com@example.com",
    "SRS0=vmyz=2W==test@example.com", "SRS1=chaI=otherdomain.com@example.com",
    "test@example.com", "SRS0=vmyz=2!=otherdomain.com=test@example.com",
])
def test_malformed_addresses(bad: str) -> None:
    srs = codec()
    with pytest.raises(SRSError) as info:
        srs.reverse(bad)
    assert info.value.reason in ("malformed", "forged")


def test_expiry_after_max_age_days() -> None:
    srs = codec()
    address = srs.forward("test@otherdomain.com")
    srs.clock[0] = T0 + 21 * DAY  # type: ignore[attr-defined]
    assert srs.reverse(address) == "test@otherdomain.com"
    srs.clock[0] = T0 + 22 * DAY  # type: ignore[attr-defined]
    with pytest.raises(SRSError) as info:
        srs.reverse(address)
    assert info.value.reason == "expired"
    short = codec(max_age=3)
    address = short.forward("test@otherdomain.com")
    short.clock[0] = T0 + 4 * DAY  # type: ignore[attr-defined]
    with pytest.raises(SRSError, match="4 days old"):
        short.reverse(address)


def test_timestamp_wraps_after_1024_days() -> None:
    srs = codec()
    address = srs.forward("test@otherdomain.com")
    srs.clock[0] = T0 + 1024 * DAY + DAY  # type: ignore[attr-defined]
    assert srs.reverse(address) == "test@otherdomain.com"  # the 10-bit stamp wrapped


def test_old_secrets_verify_first_signs() -> None:
    old = codec(secrets=("old-secret",))
    made_with_old = old.forward("test@otherdomain.com")
    rotated = codec(secrets=("new-secret", "old-secret"))
    assert rotated.reverse(made_with_old) == "test@otherdomain.com"
    made_with_new = rotated.forward("test@otherdomain.com")
    assert made_with_new != made_with_old
    assert codec(secrets=("new-secret",)).reverse(made_with_new) == "test@otherdomain.com"
    with pytest.raises(SRSError):
        codec(secrets=("other",)).reverse(made_with_new)


# ------------------------------------------------------------------------------ secrets


def test_secret_file_generated_once_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / "srs" / "secret"
    first = load_secrets(str(path))
    assert len(first) == 1 and len(first[0]) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert load_secrets(str(path)) == first
    assert [p.name for p in path.parent.iterdir()] == ["secret"]  # no temp files left


def test_secret_file_lines_first_signs_all_verify(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"new-one\nold-one\n\n")
    assert load_secrets(str(path)) == [b"new-one", b"old-one"]
    path.write_bytes(b"\n")
    with pytest.raises(ValueError):
        load_secrets(str(path))


def test_concurrent_generation_agrees(tmp_path: Path) -> None:
    path = str(tmp_path / "srs" / "secret")
    results: list[list[bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(load_secrets(path)))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and all(r == results[0] for r in results)


def test_build(tmp_path: Path) -> None:
    base = Config(hostname="mx.example.com", mail_domain=("example.com", "example.org"),
                  state_dir=str(tmp_path / "state"))
    srs = build(base)
    assert srs is not None and srs.domain == "example.com"
    assert not (tmp_path / "state").exists()  # nothing is read or written before use
    made = srs.forward("a@x.test")
    assert (tmp_path / "state" / "srs" / "secret").exists()
    assert build(base).reverse(made) == "a@x.test"  # same secret from the file
    given = Config(hostname="mx.example.com", mail_domain=("example.com",), srs_secret="s1 s0",
                   srs_domain="srs.example.com", srs_max_age=7, state_dir=str(tmp_path / "x"))
    srs2 = build(given)
    assert srs2 is not None and srs2.domain == "srs.example.com" and srs2.max_age == 7
    assert SRS(["s1"], "srs.example.com").reverse(srs2.forward("a@x.test")) == "a@x.test"
    assert build(Config(srs_enable=False)) is None
    assert "s1" not in repr(given)


# ------------------------------------------------------------------------------ config


@pytest.fixture
def _fqdn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(load_mod, "_host_fqdn", lambda: "mx1.example.net")


@pytest.mark.usefixtures("_fqdn")
def test_config_variables() -> None:
    c = load_config({"MAIL_DOMAIN": "example.com"})
    assert (c.srs_enable, c.srs_domain, c.srs_secret, c.srs_max_age) == (True, "", "", 21)
    c = load_config({"MAIL_DOMAIN": "example.com", "SRS_ENABLE": "no",
                     "SRS_DOMAIN": "SRS.Example.COM.", "SRS_SECRET": "abc def",
                     "SRS_MAX_AGE": "30"})
    assert (c.srs_enable, c.srs_domain, c.srs_secret, c.srs_max_age) == (
        False, "srs.example.com", "abc def", 30)
    assert load_config({"MAIL_DOMAIN": "example.com", "SRS_MAX_AGE": "3w"}).srs_max_age == 21
    assert load_config({"MAIL_DOMAIN": "example.com", "SRS_MAX_AGE": "48h"}).srs_max_age == 2


@pytest.mark.usefixtures("_fqdn")
@pytest.mark.parametrize(("var", "value"), [
    ("SRS_MAX_AGE", "0"), ("SRS_MAX_AGE", "2000"), ("SRS_MAX_AGE", "12h"),
    ("SRS_MAX_AGE", "soon"), ("SRS_DOMAIN", "a.test b.test"), ("SRS_DOMAIN", "x@y"),
    ("SRS_ENABLE", "maybe"),
])
def test_config_errors_name_the_variable(var: str, value: str) -> None:
    with pytest.raises(ConfigError, match=var):
        load_config({"MAIL_DOMAIN": "example.com", var: value})


# ------------------------------------------------------------------------------ stage

LOCAL = frozenset({"example.com", "example.org"})


def txn(sender: str, *rcpts: Recipient) -> Transaction:
    return Transaction(qid="Q1", sender=sender, recipients=list(rcpts), peer_ip="192.0.2.1",
                       helo="client.test", hostname="mx.example.com", local_domains=LOCAL)


FORWARDED = Recipient(address="bob@remote.test", original="fwd@example.com", local=False)
LOCAL_RCPT = Recipient(address="alice@example.com", original="alice@example.com",
                       local=True, mailbox="alice/")
RELAYED = Recipient(address="carol@remote.test", original="carol@remote.test", local=False)


async def test_stage_rewrites_foreign_sender_of_forwarded_mail() -> None:
    srs = codec()
    t = txn("sender@origin.test", FORWARDED)
    await SRSRewrite(srs).modify(t, None)  # type: ignore[arg-type]
    assert t.sender.startswith("SRS0=") and t.sender.endswith("@example.com")
    assert srs.reverse(t.sender) == "sender@origin.test"
    assert t.results["srs"] == "sender@origin.test"


async def test_stage_rewrites_for_all_when_local_and_forwarded_mix() -> None:
    t = txn("sender@origin.test", LOCAL_RCPT, FORWARDED)
    await SRSRewrite(codec()).modify(t, None)  # type: ignore[arg-type]
    assert t.sender.startswith("SRS0=")


@pytest.mark.parametrize(("sender", "rcpts"), [
    ("alice@example.com", (FORWARDED,)),         # local sender: ours to sign, not rewritten
    ("someone@Example.ORG", (FORWARDED,)),
    ("", (FORWARDED,)),                           # bounce
    ("sender@origin.test", (LOCAL_RCPT,)),        # nothing forwarded
    ("sender@origin.test", (RELAYED,)),           # relay by a trusted client, no alias
    ("x@example.com", (RELAYED, FORWARDED)),
])
async def test_stage_leaves_sender(sender: str, rcpts: tuple[Recipient, ...]) -> None:
    t = txn(sender, *rcpts)
    await SRSRewrite(codec()).modify(t, None)  # type: ignore[arg-type]
    assert t.sender == sender and "srs" not in t.results


async def test_stage_srs_sender_becomes_srs1() -> None:
    first = SRS(["k"], "hop1.test", clock=lambda: T0).forward("a@origin.test")
    t = txn(first, FORWARDED)
    await SRSRewrite(codec()).modify(t, None)  # type: ignore[arg-type]
    assert t.sender.startswith("SRS1=") and "=hop1.test==" in t.sender


# ------------------------------------------------------------------------------ lookup


class Table:
    def __init__(self, known: dict[str, Destination]) -> None:
        self.known = known

    async def lookup(self, address: Address) -> Destination | None:
        return self.known.get(address.key)


async def test_lookup_reverses_to_a_remote_target() -> None:
    srs = codec()
    lookup = SRSLookup(srs, LOCAL)
    dest = await lookup.lookup(Address(srs.forward("Sender@Origin.test")))
    assert dest == Destination((Target("Sender@Origin.test", local=False),))
    assert await lookup.lookup(Address("alice@example.com")) is None
    assert await lookup.lookup(Address("SRS0=vmyz=2W=otherdomain.com=test@other.test")) is None


async def test_lookup_refuses_forged() -> None:
    with pytest.raises(SMTPError) as info:
        await SRSLookup(codec(), LOCAL).lookup(
            Address("SRS0=abcd=2W=otherdomain.com=test@example.com"))
    reply = info.value.reply
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert "invalid SRS signature" in reply.text


async def test_lookup_leaves_malformed_to_the_other_lookups() -> None:
    lookup = SRSLookup(codec(), LOCAL)
    assert await lookup.lookup(Address("SRS0=vmyz=2W@example.com")) is None
    assert await lookup.lookup(Address("srs0-sales@example.com")) is None


async def test_lookup_refuses_expired() -> None:
    srs = codec()
    address = srs.forward("test@otherdomain.com")
    srs.clock[0] = T0 + 30 * DAY  # type: ignore[attr-defined]
    with pytest.raises(SMTPError) as info:
        await SRSLookup(srs, LOCAL).lookup(Address(address))
    assert info.value.reply.code == 550 and "SRS address expired" in info.value.reply.text


async def test_lookup_of_our_own_user_goes_through_the_other_lookups() -> None:
    srs = codec()
    box = Destination((Target("alice@example.com", True, "alice/"),))
    lookup = SRSLookup(srs, LOCAL, Table({"alice@example.com": box}))
    # an SRS address (made by us) standing for a local address resolves to the mailbox
    made = f"SRS0={srs.make_hash(srs.timestamp(), 'example.com', 'alice')}=" \
           f"{srs.timestamp()}=example.com=alice@example.com"
    assert await lookup.lookup(Address(made)) == box
    unknown = f"SRS0={srs.make_hash(srs.timestamp(), 'example.com', 'nobody')}=" \
              f"{srs.timestamp()}=example.com=nobody@example.com"
    assert await lookup.lookup(Address(unknown)) is None


def test_no_file_in_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    from pymta.wiring import build_pipeline

    pipeline = build_pipeline(Config(hostname="mx.example.com", mail_domain=("a.test",)))
    assert any(m.name == "srs" for m in pipeline.modifiers)
    assert os.listdir(tmp_path) == []  # building stages reads and writes nothing
