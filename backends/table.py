"""Recipient lookup from the ``MAIL_BOXES`` / ``MAIL_ALIASES`` environment tables.

This is ``mlan/postfix-amavis``'s "Table mailbox lookup" (``virtual_mailbox_maps`` plus
``virtual_alias_maps`` generated from two variables). Everything is parsed, validated and fully
expanded once, at construction, because ``lookup`` runs for every ``RCPT TO`` and must be a
dict get; a broken table is a :class:`ConfigError` at start-up rather than a surprise bounce
at 3 a.m.

Semantics, following Postfix where the image relies on it:

* ``MAIL_BOXES="addr addr:mailbox"`` -- without a mailbox the address itself is the path (an
  mbox file named after the address); a path ending in ``/`` is a maildir. Paths are relative to
  the mail directory; absolute paths and ``..`` components are refused (no writing outside it).
* ``MAIL_ALIASES="alias:target,target"`` -- names without ``@`` belong to the first domain.
  Aliases win over mailboxes (virtual_alias_maps is consulted first); an alias that lists
  itself keeps a copy in its own mailbox (Postfix's self-reference rule).
* Aliases of aliases expand recursively. A loop only cuts the looping branch; an alias left
  with no destination at all is an error naming the loop. Targets reached twice are delivered
  once. A local-domain target that is neither alias nor mailbox is an error (it would bounce
  every message); a foreign-domain target is forwarded (a remote Target).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pymta.config.errors import ConfigError
from pymta.types import Address, Destination, Target

_BOXES = "MAIL_BOXES"
_ALIASES = "MAIL_ALIASES"


def check_mailbox_path(path: str) -> str | None:
    """Why a mailbox path may not be used, or None when it is safe.

    Shared with the local delivery agent, which re-checks paths from any lookup source: a path
    must never let a recipient entry write outside the mail directory.
    """
    if not path or path in ("/", "./"):
        return "empty mailbox path"
    if path.startswith("/"):
        return f"mailbox path must be relative to the mail directory: {path!r}"
    if "\0" in path:
        return f"mailbox path contains a NUL byte: {path!r}"
    if ".." in path.split("/"):
        return f"mailbox path must not contain '..': {path!r}"
    return None


class TableLookup:
    """A :class:`~pymta.contracts.RecipientLookup` over a precomputed address → Destination map."""

    def __init__(self, domains: Sequence[str], table: Mapping[str, Destination]) -> None:
        """``table`` keys must already be case-folded (``Address.key``); use ``from_config``."""
        self._domains = tuple(d.lower().rstrip(".") for d in domains)
        self._domain_set = frozenset(self._domains)
        self._table = dict(table)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(cls, config: Any, *, other_sources: bool = False) -> TableLookup:
        """The table of ``MAIL_DOMAIN``, ``MAIL_BOXES`` and ``MAIL_ALIASES`` (see
        :meth:`from_text`); this is also the check of those settings (a pure parse)."""
        return cls.from_text(config.mail_domain, config.mail_boxes, config.mail_aliases,
                             other_sources=other_sources)

    @classmethod
    def from_text(cls, domains: Sequence[str], mail_boxes: str,
                  mail_aliases: str, *, other_sources: bool = False) -> TableLookup:
        """Parse and expand the two variables; raise ConfigError naming the bad variable.

        With ``other_sources`` (LDAP or MySQL configured too) a local-domain alias target that
        is not in the table is not an error: it becomes an unresolved Target (no mailbox) that
        the lookup chain resolves in the other sources.
        """
        doms = tuple(d.lower().rstrip(".") for d in domains if d.strip())
        parser = _Parser(doms)
        boxes = parser.parse_boxes(mail_boxes)
        aliases = parser.parse_aliases(mail_aliases)
        table = _Expander(doms, boxes, aliases, other_sources).expand_all()
        return cls(doms, table)

    # ------------------------------------------------------------------ queries

    @property
    def domains(self) -> tuple[str, ...]:
        """The configured domains, lower-case, in configuration order (first = default)."""
        return self._domains

    def is_local_domain(self, domain: str) -> bool:
        """Whether mail for ``domain`` is ours (case-insensitive, trailing dot ignored)."""
        return domain.lower().rstrip(".") in self._domain_set

    def __len__(self) -> int:
        return len(self._table)

    def __contains__(self, address: object) -> bool:
        key = address.key if isinstance(address, Address) else str(address).lower()
        return key in self._table

    async def lookup(self, address: Address) -> Destination | None:
        """The expanded destination of ``address`` or None; the RCPT hot path, a dict get."""
        return self._table.get(address.key)


# ---------------------------------------------------------------------- parsing


class _Parser:
    """Turns the raw variables into checked, fully-qualified entries."""

    def __init__(self, domains: tuple[str, ...]) -> None:
        self._domains = domains

    def qualify(self, var: str, name: str) -> str:
        """Give an unqualified name the first domain; refuse malformed addresses."""
        if "@" not in name:
            if not self._domains:
                raise ConfigError(f"{var}: {name!r} has no domain and no MAIL_DOMAIN is set")
            name = f"{name}@{self._domains[0]}"
        local, _, domain = name.rpartition("@")
        if not local or not domain:
            raise ConfigError(f"{var}: not an address: {name!r}")
        return name

    def require_local(self, var: str, address: str) -> None:
        if Address(address).domain.rstrip(".") not in self._domains:
            doms = " ".join(self._domains) or "(none)"
            raise ConfigError(f"{var}: {address!r} is not in a configured domain ({doms})")

    def parse_boxes(self, raw: str) -> dict[str, tuple[str, str]]:
        """key → (address as configured, mailbox path)."""
        boxes: dict[str, tuple[str, str]] = {}
        for token in raw.split():
            name, sep, mailbox = token.partition(":")
            if not name:
                raise ConfigError(f"{_BOXES}: entry without an address: {token!r}")
            address = self.qualify(_BOXES, name)
            self.require_local(_BOXES, address)
            if sep and not mailbox:
                raise ConfigError(f"{_BOXES}: empty mailbox for {address!r}")
            path = mailbox if sep else address
            problem = check_mailbox_path(path)
            if problem:
                raise ConfigError(f"{_BOXES}: {address}: {problem}")
            key = address.lower()
            if key in boxes and boxes[key][1] != path:
                raise ConfigError(f"{_BOXES}: {address!r} is listed twice with different "
                                  f"mailboxes ({boxes[key][1]!r}, {path!r})")
            boxes.setdefault(key, (address, path))
        return boxes

    def parse_aliases(self, raw: str) -> dict[str, tuple[str, list[str]]]:
        """key → (alias as configured, fully-qualified targets in configured order)."""
        aliases: dict[str, tuple[str, list[str]]] = {}
        for token in raw.split():
            name, sep, rest = token.partition(":")
            if not sep:
                raise ConfigError(f"{_ALIASES}: expected alias:target[,target...], got {token!r}")
            if not name:
                raise ConfigError(f"{_ALIASES}: entry without an alias: {token!r}")
            alias = self.qualify(_ALIASES, name)
            self.require_local(_ALIASES, alias)
            targets = [self.qualify(_ALIASES, t) for t in rest.split(",") if t]
            if not targets:
                raise ConfigError(f"{_ALIASES}: alias {alias!r} has no targets")
            key = alias.lower()
            if key in aliases:
                raise ConfigError(f"{_ALIASES}: alias {alias!r} is defined twice")
            aliases[key] = (alias, targets)
        return aliases


# ---------------------------------------------------------------------- expansion


class _Expander:
    """Expands every alias once into its final targets (depth-first, deterministic order)."""

    def __init__(self, domains: tuple[str, ...], boxes: dict[str, tuple[str, str]],
                 aliases: dict[str, tuple[str, list[str]]], other_sources: bool = False) -> None:
        self._domains = frozenset(domains)
        self._boxes = boxes
        self._aliases = aliases
        self._other_sources = other_sources
        for alias, targets in ([] if other_sources else aliases.values()):
            for t in targets:
                key = t.lower()
                if (Address(t).domain.rstrip(".") in self._domains and key not in aliases
                        and key not in boxes):
                    raise ConfigError(f"{_ALIASES}: {alias}: target {t!r} is in a local domain "
                                      "but is neither a mailbox nor an alias")

    def expand_all(self) -> dict[str, Destination]:
        table: dict[str, Destination] = {}
        for key, (address, path) in self._boxes.items():
            table[key] = Destination((Target(address, True, path),))
        for key in self._aliases:  # aliases override mailboxes, as in Postfix
            table[key] = Destination(tuple(self._expand(key)))
        return table

    def _terminal(self, key: str, spelled: str) -> Target | None:
        """The Target a non-alias address stands for (a mailbox, or a forward)."""
        box = self._boxes.get(key)
        if box is not None:
            return Target(box[0], True, box[1])
        if Address(spelled).domain.rstrip(".") not in self._domains:
            return Target(spelled, False, None)
        if self._other_sources:
            return Target(spelled, True, None)  # resolved by the lookup chain
        return None  # unreachable: unknown local targets were refused in __init__

    def _expand(self, root: str) -> list[Target]:
        out: list[Target] = []
        emitted: set[str] = set()
        visited: set[str] = {root}
        loop: list[str] | None = None
        path: list[str] = [root]
        stack: list[Iterator[str]] = [iter(self._aliases[root][1])]

        def emit(target: Target | None) -> None:
            if target is not None and target.address.lower() not in emitted:
                emitted.add(target.address.lower())
                out.append(target)

        while stack:
            current = path[-1]
            spelled = next(stack[-1], None)
            if spelled is None:
                stack.pop()
                path.pop()
                continue
            key = spelled.lower()
            if key == current and key in self._boxes:
                emit(self._terminal(key, spelled))  # self-reference: keep a local copy
            elif key in path:
                if loop is None:
                    loop = [self._aliases[k][0] for k in path[path.index(key):]] + [spelled]
            elif key in visited:
                continue
            elif key in self._aliases:
                visited.add(key)
                path.append(key)
                stack.append(iter(self._aliases[key][1]))
            else:
                visited.add(key)
                emit(self._terminal(key, spelled))
        if not out:
            chain = " -> ".join(loop or [self._aliases[root][0]])
            raise ConfigError(f"{_ALIASES}: alias loop {chain} reaches no mailbox")
        return out
