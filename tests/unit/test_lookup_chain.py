"""The lookup chain: first source wins, cross-source aliases, loops, caching (issue 5)."""

from __future__ import annotations

import asyncio

import pytest

from pymta.backends.chain import LookupChain
from pymta.backends.ldap import LdapLookup
from pymta.backends.mysql import MysqlLookup
from pymta.backends.regex import RegexRewrite
from pymta.backends.table import TableLookup
from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.types import Address, Destination, Target, TemporaryFailure
from pymta.wiring import recipient_lookup

DOMAINS = ("example.com", "example.org")


class Memory:
    """An in-memory source; ``fail`` makes it raise TemporaryFailure; counts queries."""

    def __init__(self, table: dict[str, Destination], delay: float = 0.0) -> None:
        self.table = {k.lower(): v for k, v in table.items()}
        self.asked: list[str] = []
        self.fail = False
        self.delay = delay
        self.closed = False

    async def lookup(self, address: Address) -> Destination | None:
        self.asked.append(address.key)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.fail:
            raise TemporaryFailure()
        return self.table.get(address.key)

    async def aclose(self) -> None:
        self.closed = True


def box(address: str) -> Destination:
    return Destination((Target(address, True, f"{address}/"),))


def alias(*targets: str) -> Destination:
    return Destination(tuple(Target(t, True, None) for t in targets))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_first_source_that_knows_the_address_wins() -> None:
    first = Memory({"a@example.com": box("a@example.com")})
    second = Memory({"a@example.com": box("other"), "b@example.com": box("b@example.com")})
    chain = LookupChain([first, second], DOMAINS)
    assert await chain.lookup(Address("A@Example.com")) == box("a@example.com")
    assert second.asked == []
    assert await chain.lookup(Address("b@example.com")) == box("b@example.com")
    assert await chain.lookup(Address("nobody@example.com")) is None


async def test_alias_resolves_in_another_source() -> None:
    table = Memory({"alice@example.com": box("alice@example.com")})
    directory = Memory({"sales@example.com": alias("alice@example.com", "bob@example.com"),
                        "bob@example.com": box("bob@example.com")})
    chain = LookupChain([table, directory], DOMAINS)
    dest = await chain.lookup(Address("sales@example.com"))
    assert dest is not None
    assert [t.mailbox for t in dest.targets] == ["alice@example.com/", "bob@example.com/"]


async def test_nested_aliases_dedupe_and_foreign_targets_forward() -> None:
    src = Memory({"all@example.com": alias("team@example.com", "x@example.com",
                                           "ext@partner.net"),
                  "team@example.com": alias("x@example.com", "y@example.org"),
                  "x@example.com": box("x@example.com"),
                  "y@example.org": box("y@example.org")})
    dest = await LookupChain([src], DOMAINS).lookup(Address("all@example.com"))
    assert dest is not None
    assert dest.targets == (Target("x@example.com", True, "x@example.com/"),
                            Target("y@example.org", True, "y@example.org/"),
                            Target("ext@partner.net", False, None))


async def test_loops_are_cut_and_a_pure_loop_is_unknown() -> None:
    src = Memory({"a@example.com": alias("b@example.com", "keep@example.com"),
                  "b@example.com": alias("a@example.com"),
                  "keep@example.com": box("keep@example.com"),
                  "p@example.com": alias("q@example.com"),
                  "q@example.com": alias("p@example.com")})
    chain = LookupChain([src], DOMAINS)
    assert await chain.lookup(Address("a@example.com")) == box("keep@example.com")
    assert await chain.lookup(Address("p@example.com")) is None


async def test_target_equal_to_its_address_is_final() -> None:
    src = Memory({"lmtp@example.com": alias("lmtp@example.com")})
    dest = await LookupChain([src], DOMAINS).lookup(Address("lmtp@example.com"))
    assert dest == alias("lmtp@example.com")


async def test_target_nobody_knows_is_kept_for_delivery_to_bounce() -> None:
    src = Memory({"a@example.com": alias("gone@example.com", "ok@example.com"),
                  "ok@example.com": box("ok@example.com")})
    dest = await LookupChain([src], DOMAINS).lookup(Address("a@example.com"))
    assert dest is not None
    assert dest.targets == (Target("gone@example.com", True, None),
                            Target("ok@example.com", True, "ok@example.com/"))


async def test_depth_limit_cuts_long_chains() -> None:
    table = {f"a{i}@example.com": alias(f"a{i + 1}@example.com") for i in range(30)}
    table["a30@example.com"] = box("a30@example.com")
    chain = LookupChain([Memory(table)], DOMAINS, max_depth=5)
    assert await chain.lookup(Address("a0@example.com")) is None
    chain = LookupChain([Memory(table)], DOMAINS, max_depth=40)
    assert await chain.lookup(Address("a0@example.com")) == box("a30@example.com")


async def test_temporary_failure_propagates_and_is_never_cached() -> None:
    first = Memory({})
    second = Memory({"a@example.com": box("a@example.com")})
    first.fail = True
    chain = LookupChain([first, second], DOMAINS)
    with pytest.raises(TemporaryFailure) as info:
        await chain.lookup(Address("a@example.com"))
    assert info.value.reply.code == 451 and info.value.reply.enhanced == "4.3.0"
    assert second.asked == []          # a later source must not answer for the failing one
    first.fail = False
    assert await chain.lookup(Address("a@example.com")) == box("a@example.com")


async def test_failure_while_resolving_an_alias_target_is_temporary() -> None:
    table = Memory({"list@example.com": alias("u@example.com")})
    directory = Memory({"u@example.com": box("u@example.com")})
    directory.fail = True
    chain = LookupChain([table, directory], DOMAINS)
    with pytest.raises(TemporaryFailure):
        await chain.lookup(Address("list@example.com"))


async def test_positive_and_negative_results_are_cached_with_their_ttls() -> None:
    clock = Clock()
    src = Memory({"a@example.com": box("a@example.com")})
    chain = LookupChain([src], DOMAINS, ttl=60, negative_ttl=30, clock=clock)
    for _ in range(5):
        assert await chain.lookup(Address("a@example.com")) is not None
        assert await chain.lookup(Address("A@EXAMPLE.COM")) is not None
        assert await chain.lookup(Address("no@example.com")) is None
    assert src.asked == ["a@example.com", "no@example.com"]
    assert chain.hits == 13 and chain.misses == 2
    clock.now += 31                       # negative entry expired, positive not yet
    await chain.lookup(Address("a@example.com"))
    await chain.lookup(Address("no@example.com"))
    assert src.asked[2:] == ["no@example.com"]
    clock.now += 30
    await chain.lookup(Address("a@example.com"))
    assert src.asked[3:] == ["a@example.com"]


async def test_zero_ttl_disables_the_cache_and_size_is_bounded() -> None:
    src = Memory({"a@example.com": box("a@example.com")})
    chain = LookupChain([src], DOMAINS, ttl=0, negative_ttl=0)
    await chain.lookup(Address("a@example.com"))
    await chain.lookup(Address("a@example.com"))
    assert len(src.asked) == 2
    chain = LookupChain([src], DOMAINS, max_entries=3)
    for i in range(10):
        await chain.lookup(Address(f"n{i}@example.com"))
    assert len(chain._cache) == 3


async def test_concurrent_lookups_of_one_address_share_one_query() -> None:
    src = Memory({"a@example.com": box("a@example.com")}, delay=0.05)
    chain = LookupChain([src], DOMAINS)
    results = await asyncio.gather(*(chain.lookup(Address("a@example.com")) for _ in range(20)))
    assert all(r == box("a@example.com") for r in results)
    assert src.asked == ["a@example.com"]


async def test_a_cancelled_caller_does_not_cancel_the_shared_lookup() -> None:
    src = Memory({"a@example.com": box("a@example.com")}, delay=0.05)
    chain = LookupChain([src], DOMAINS)
    first = asyncio.ensure_future(chain.lookup(Address("a@example.com")))
    second = asyncio.ensure_future(chain.lookup(Address("a@example.com")))
    await asyncio.sleep(0.01)
    first.cancel()
    assert await second == box("a@example.com")
    assert src.asked == ["a@example.com"]


async def test_close_closes_every_source() -> None:
    a, b = Memory({}), Memory({})
    await LookupChain([a, b], DOMAINS).aclose()
    assert a.closed and b.closed


async def test_table_with_other_sources_leaves_unknown_local_targets_to_the_chain() -> None:
    with pytest.raises(ConfigError, match="MAIL_ALIASES"):
        TableLookup.from_text(DOMAINS, "a@example.com", "sales:a,ldapuser")
    table = TableLookup.from_text(DOMAINS, "a@example.com", "sales:a,ldapuser",
                                    other_sources=True)
    directory = Memory({"ldapuser@example.com": box("ldapuser@example.com")})
    dest = await LookupChain([table, directory], DOMAINS).lookup(Address("sales@example.com"))
    assert dest is not None
    assert [t.address for t in dest.targets] == ["a@example.com", "ldapuser@example.com"]
    assert dest.targets[1].mailbox == "ldapuser@example.com/"


def test_default_lookups_wiring() -> None:
    base = Config(hostname="mx.example.com", mail_domain=DOMAINS, mail_boxes="a@example.com")
    only_table = recipient_lookup(base)     # issue 11: always the chain, the table alone too
    assert isinstance(only_table, LookupChain)
    assert [type(s) for s in only_table.sources] == [TableLookup]

    full = Config(
        hostname="mx.example.com", mail_domain=DOMAINS, mail_boxes="a@example.com",
        mail_aliases="x:nobody-in-table", regex_alias="/([^+]+)[+-].*@(.+)/ $1@$2",
        ldap_host="ldap://127.0.0.1:1", ldap_user_base="dc=example,dc=com",
        ldap_query_filter_user="(mail=%s)", mysql_host="127.0.0.1:1", mysql_database="db",
        mysql_query_user="select mail from users where mail='%s'", lookup_cache_ttl=5,
        lookup_negative_ttl=2)
    lookup = recipient_lookup(full)
    assert isinstance(lookup, RegexRewrite)
    chain = lookup.inner
    assert isinstance(chain, LookupChain)
    assert [type(s) for s in chain.sources] == [TableLookup, LdapLookup, MysqlLookup]
    assert chain.ttl == 5 and chain.negative_ttl == 2


@pytest.mark.parametrize(("overrides", "variable"), [
    ({"ldap_host": "ldap://h", "ldap_query_filter_user": "(mail=%s)"}, "LDAP_USER_BASE"),
    ({"ldap_host": "ldap://h", "ldap_user_base": "dc=x"}, "LDAP_QUERY_FILTER_USER"),
    ({"ldap_host": "ldap://h", "ldap_user_base": "dc=x",
      "ldap_query_filter_user": "(mail=%s"}, "LDAP_QUERY_FILTER_USER"),
    ({"mysql_host": "db", "mysql_query_user": "select 1 where a=%s"}, "MYSQL_DATABASE"),
    ({"mysql_host": "db", "mysql_database": "x"}, "MYSQL_QUERY_USER"),
])
def test_incomplete_directory_settings_are_config_errors(overrides: dict[str, str],
                                                         variable: str) -> None:
    config = Config(hostname="mx.example.com", mail_domain=DOMAINS, **overrides)
    with pytest.raises(ConfigError, match=f"^{variable}"):
        recipient_lookup(config)


class Counting(Memory):
    """Memory that also records the most lookups it had in flight at once."""

    def __init__(self, table: dict[str, Destination], delay: float = 0.001) -> None:
        super().__init__(table, delay)
        self.in_flight = 0
        self.peak = 0

    async def lookup(self, address: Address) -> Destination | None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            return await super().lookup(address)
        finally:
            self.in_flight -= 1


def _wide_tree(width: int) -> dict[str, Destination]:
    """root -> width aliases -> width members each, every member a mailbox of its own that
    takes a lookup: width + width² lookups and width² targets when expanded in full."""
    table = {"root@example.com": alias(*(f"l{i}@example.com" for i in range(width)))}
    for i in range(width):
        members = [f"m{i}-{j}@example.com" for j in range(width)]
        table[f"l{i}@example.com"] = alias(*members)
        table.update({m: box(m) for m in members})
    return table


async def test_issue10_alias_expansion_limit_applies_during_expansion() -> None:
    """The target limit stops the expansion while it runs: a 50 × 50 tree with a limit of
    100 targets costs about 100 member lookups, not all 2,551, and never more than a few
    lookups at a time."""
    src = Counting(_wide_tree(50))
    chain = LookupChain([src], DOMAINS, max_targets=100)
    dest = await chain.lookup(Address("root@example.com"))
    assert dest is not None
    assert len(dest.targets) == 100
    assert len({t.address for t in dest.targets}) == 100
    assert all(t.mailbox for t in dest.targets)
    assert len(src.asked) <= 1 + 50 + 100 + 8, len(src.asked)
    assert src.peak <= 8, src.peak


async def test_issue10_alias_expansion_lookup_limit() -> None:
    """A tree that needs more lookups than allowed is cut at the lookup limit (its targets
    found so far are kept), whatever the target limit."""
    src = Counting(_wide_tree(10))
    chain = LookupChain([src], DOMAINS, max_targets=1000, max_lookups=20)
    dest = await chain.lookup(Address("root@example.com"))
    assert dest is not None
    assert len(src.asked) == 1 + 20
    assert 0 < len(dest.targets) <= 10


async def test_full_expansion_within_the_limits_is_unchanged_and_ordered() -> None:
    src = Counting(_wide_tree(6))
    dest = await LookupChain([src], DOMAINS).lookup(Address("root@example.com"))
    assert dest is not None
    assert [t.address for t in dest.targets] == [
        f"m{i}-{j}@example.com" for i in range(6) for j in range(6)]
    assert len(src.asked) == 1 + 6 + 36
