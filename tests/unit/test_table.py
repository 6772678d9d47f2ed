"""The MAIL_BOXES / MAIL_ALIASES table lookup (mlan/postfix-amavis README,
"Table mailbox lookup")."""

from __future__ import annotations

import pytest

from pymta.backends.table import TableLookup
from pymta.config.errors import ConfigError
from pymta.types import Address, Destination, RecipientLookup, Target

DOMS = ("example.com", "example.org")


def table(boxes: str = "", aliases: str = "", domains: tuple[str, ...] = DOMS) -> TableLookup:
    return TableLookup.from_text(domains, boxes, aliases)


async def targets(t: TableLookup, address: str) -> list[Target] | None:
    dest = await t.lookup(Address(address))
    return None if dest is None else list(dest.targets)


def local(address: str, mailbox: str) -> Target:
    return Target(address, True, mailbox)


# ------------------------------------------------------------------ MAIL_BOXES


async def test_is_a_recipient_lookup() -> None:
    assert isinstance(table(), RecipientLookup)


async def test_mailbox_defaults_to_address_mbox() -> None:
    t = table("receiver@example.com")
    assert await targets(t, "receiver@example.com") == [
        local("receiver@example.com", "receiver@example.com")]


async def test_explicit_mbox_and_maildir_paths() -> None:
    t = table("receiver@example.com:receiver/inbox info@example.com:example.com/info/")
    assert await targets(t, "receiver@example.com") == [
        local("receiver@example.com", "receiver/inbox")]
    assert await targets(t, "info@example.com") == [
        local("info@example.com", "example.com/info/")]


async def test_unknown_address_is_none() -> None:
    t = table("a@example.com")
    assert await t.lookup(Address("b@example.com")) is None
    assert await t.lookup(Address("a@elsewhere.net")) is None


async def test_lookup_is_case_insensitive_and_keeps_configured_spelling() -> None:
    t = table("Alice@Example.COM:Alice/Mail/")
    assert await targets(t, "aLICE@example.com") == [local("Alice@Example.COM", "Alice/Mail/")]


async def test_unqualified_mailbox_gets_first_domain() -> None:
    t = table("bob")
    assert await targets(t, "bob@example.com") == [local("bob@example.com", "bob@example.com")]
    assert await t.lookup(Address("bob@example.org")) is None


async def test_empty_tables() -> None:
    t = table("", "")
    assert len(t) == 0
    assert await t.lookup(Address("postmaster@example.com")) is None


async def test_postmaster_is_not_invented() -> None:
    t = table("a@example.com")
    assert await t.lookup(Address("postmaster@example.com")) is None


def test_domains_and_is_local_domain() -> None:
    t = table(domains=("Example.COM", "example.org"))
    assert t.domains == ("example.com", "example.org")
    assert t.is_local_domain("EXAMPLE.com")
    assert t.is_local_domain("example.org.")
    assert not t.is_local_domain("sub.example.com")


@pytest.mark.parametrize("boxes", [
    "a@example.com:/var/mail/a",
    "a@example.com:../a",
    "a@example.com:x/../../a/",
    "a@example.com:x/..",
    "../../etc/passwd@example.com",
])
def test_path_traversal_refused(boxes: str) -> None:
    with pytest.raises(ConfigError, match=r"^MAIL_BOXES: "):
        table(boxes)


def test_dots_inside_names_are_fine() -> None:
    t = table("a..b@example.com:a..b/x.y/")
    assert "a..b@example.com" in t


@pytest.mark.parametrize("boxes", [
    "a@foreign.net",
    "a@example.com:",
    ":box",
    "@example.com",
    "a@example.com:x a@example.com:y",
])
def test_bad_boxes_name_the_variable(boxes: str) -> None:
    with pytest.raises(ConfigError, match=r"^MAIL_BOXES: "):
        table(boxes)


def test_unqualified_without_domain_is_error() -> None:
    with pytest.raises(ConfigError, match=r"^MAIL_BOXES: "):
        table("bob", domains=())


def test_identical_duplicate_box_is_tolerated() -> None:
    assert len(table("a@example.com a@example.com")) == 1


# ------------------------------------------------------------------ MAIL_ALIASES


async def test_image_example() -> None:
    t = table("info@example.com", "root:info,info@example.com postmaster:root")
    info = local("info@example.com", "info@example.com")
    # root → info (unqualified = first domain) and info@example.com: one delivery
    assert await targets(t, "root@example.com") == [info]
    assert await targets(t, "postmaster@example.com") == [info]
    assert await targets(t, "info@example.com") == [info]


async def test_alias_fan_out_keeps_order() -> None:
    t = table("a@example.com b@example.com:b/", "team:b,a")
    assert await targets(t, "team@example.com") == [
        local("b@example.com", "b/"), local("a@example.com", "a@example.com")]


async def test_unqualified_names_use_first_domain_only() -> None:
    t = table("a@example.com a@example.org", "x:a")
    assert await targets(t, "x@example.com") == [local("a@example.com", "a@example.com")]
    assert await t.lookup(Address("x@example.org")) is None


async def test_nested_aliases_resolve_recursively() -> None:
    t = table("m@example.com", "a:b b:c c:m")
    assert await targets(t, "a@example.com") == [local("m@example.com", "m@example.com")]
    assert await targets(t, "b@example.com") == [local("m@example.com", "m@example.com")]


async def test_diamond_is_deduplicated_case_insensitively() -> None:
    t = table("m@example.com", "all:x,y,M@EXAMPLE.COM x:m y:m@Example.com")
    assert await targets(t, "all@example.com") == [local("m@example.com", "m@example.com")]


async def test_foreign_target_is_remote_forward() -> None:
    t = table("m@example.com", "fwd:m,someone@Gmail.com,SOMEONE@gmail.com")
    assert await targets(t, "fwd@example.com") == [
        local("m@example.com", "m@example.com"), Target("someone@Gmail.com", False, None)]


async def test_loop_with_an_exit_is_cut() -> None:
    t = table("m@example.com", "a:b,m b:a")
    assert await targets(t, "a@example.com") == [local("m@example.com", "m@example.com")]
    assert await targets(t, "b@example.com") == [local("m@example.com", "m@example.com")]


def test_loop_without_mailbox_is_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"^MAIL_ALIASES: alias loop .*a@example\.com.*"
                                          r"b@example\.com"):
        table("", "a:b b:a")


def test_self_loop_without_mailbox_is_error() -> None:
    with pytest.raises(ConfigError, match=r"^MAIL_ALIASES: alias loop"):
        table("", "a:a")


async def test_alias_overrides_mailbox_unless_self_referenced() -> None:
    t = table("a@example.com b@example.com c@example.com", "a:b c:c,b")
    assert await targets(t, "a@example.com") == [local("b@example.com", "b@example.com")]
    # Postfix's self-reference rule: c keeps a copy and forwards one to b
    assert await targets(t, "c@example.com") == [
        local("c@example.com", "c@example.com"), local("b@example.com", "b@example.com")]


@pytest.mark.parametrize("aliases", [
    "a:nobody",               # local target that is neither alias nor mailbox
    "a@foreign.net:m",        # alias outside our domains
    "a",                      # no colon
    "a:",                     # no targets
    ":m",                     # no alias
    "a:m a:m",                # defined twice
])
def test_bad_aliases_name_the_variable(aliases: str) -> None:
    with pytest.raises(ConfigError, match=r"^MAIL_ALIASES: "):
        table("m@example.com", aliases)


async def test_expansion_is_precomputed() -> None:
    t = table("m@example.com", "a:b b:m")
    assert isinstance(t._table["a@example.com"], Destination)
