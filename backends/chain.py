"""The lookup chain: several recipient sources (table, LDAP, MySQL) answering as one.

Semantics:

* **First source that knows the address wins.** Sources are asked in order (the table from
  ``MAIL_BOXES``/``MAIL_ALIASES`` first, then LDAP, then MySQL); the first non-None answer is
  used and later sources are not asked. A source that raises TemporaryFailure stops the
  lookup with ``451 4.3.0``: a later source must not answer "unknown" for an address the
  failing one might know.
* **Aliases resolve across sources.** By convention a source marks an alias target it did not
  resolve itself as a *local Target without a mailbox* (``Target(addr, True, None)``); the
  chain looks such targets up again from the first source, so an LDAP alias may point at a
  ``MAIL_BOXES`` mailbox or a MySQL user. Targets outside the local domains are forwards
  (remote Targets). A target that is the address its source was asked about is final (a
  source that needs no mailbox, e.g. for LMTP). A target no source knows is kept unresolved:
  the message is accepted and local delivery bounces that one recipient with a DSN, as
  Postfix does for an alias pointing at a missing mailbox.
* **Loops are cut.** A target already on the expansion path is skipped; expansion deeper than
  ``max_depth`` is cut with a warning. An address whose every branch loops resolves to
  nothing and is treated as unknown (logged).
* **Expansion is bounded while it runs**, not after: one resolution stops once it has
  ``max_targets`` distinct final targets (Postfix's ``virtual_alias_expansion_limit``) or has
  made ``max_lookups`` lookups, and runs at most ``max_parallel`` lookups at a time, so a
  wide or deep alias tree costs bounded queries, memory and time; a cut is logged once. The
  targets kept are those found first.
* **Results are cached** per address (case-folded) for ``ttl`` seconds, unknown addresses for
  ``negative_ttl``; temporary failures are never cached. Concurrent lookups of the same
  address share one resolution, so a burst of RCPTs for one address costs one query. The
  cache is bounded (``max_entries``, oldest dropped first).
* **A resolution that does not wait costs no task**: one answered at once (a table, a
  library user's dict) runs in the caller, so the session's time limit costs nothing
  (:mod:`pymta.bounded`). One that waits (a directory) becomes a task the callers share; a
  caller that gives up (its RCPT's time limit, a client gone) leaves it to the others, and
  the last one to give up cancels it, so a source that hangs never keeps a task for ever.

This is the one composition of a server's recipient sources (``pymta.wiring``): whatever
sources there are, configured (``MAIL_BOXES``/``MAIL_ALIASES``, LDAP, MySQL) or given by a
library user (``MTA(config, lookups=[...])``), the session and the DSN resolver ask one
chain; ``REGEX_ALIAS`` and the SRS reverse lookup wrap it. The "first source that knows the
address wins" loop exists here and nowhere else.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from pymta.bounded import step
from pymta.contracts import Closeable, RecipientLookup
from pymta.types import Address, Destination, Target

log = logging.getLogger("pymta.lookup")


@dataclass
class _Budget:
    """What one resolution may still spend, shared by all its branches."""

    targets_left: int
    lookups_left: int
    gate: asyncio.Semaphore
    seen: set[str] = field(default_factory=set)
    cut: bool = False
    made: int = 0           # lookups actually made (a reserved one may be skipped)

    def take(self, target: Target) -> bool:
        """Count ``target`` as found: False (and the expansion is cut) when it is a new one
        and the target limit is reached. Duplicates are free (they are merged anyway)."""
        key = target.address.lower()
        if key in self.seen:
            return True
        if self.targets_left <= 0:
            self.cut = True
            return False
        self.seen.add(key)
        self.targets_left -= 1
        return True

    def reserve_lookup(self) -> bool:
        if self.lookups_left <= 0 or self.targets_left <= 0:
            self.cut = True
            return False
        self.lookups_left -= 1
        return True


class LookupChain:
    """A caching :class:`~pymta.contracts.RecipientLookup` over ordered sources (see module doc)."""

    def __init__(self, sources: Sequence[RecipientLookup],
                 local_domains: Iterable[str] | None = None, *, ttl: float = 60.0,
                 negative_ttl: float = 30.0, max_entries: int = 100_000, max_depth: int = 20,
                 max_targets: int = 1000, max_lookups: int = 2000, max_parallel: int = 8,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sources = list(sources)
        self._domains = (frozenset(d.lower().rstrip(".") for d in local_domains)
                         if local_domains is not None else None)
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self.max_depth = max_depth
        self.max_targets = max_targets
        self.max_lookups = max_lookups
        self.max_parallel = max_parallel
        self._clock = clock
        self._cache: dict[str, tuple[float, Destination | None]] = {}
        self._inflight: dict[str, asyncio.Task[Destination | None]] = {}
        self._waiting: dict[asyncio.Task[Destination | None], int] = {}
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"LookupChain({self.sources!r})"

    # ------------------------------------------------------------------ cache

    def clear_cache(self) -> None:
        self._cache.clear()

    def _cached(self, key: str) -> tuple[bool, Destination | None]:
        entry = self._cache.get(key)
        if entry is None:
            return False, None
        if entry[0] <= self._clock():
            del self._cache[key]
            return False, None
        return True, entry[1]

    def _store(self, key: str, dest: Destination | None) -> None:
        ttl = self.ttl if dest is not None else self.negative_ttl
        if ttl <= 0:
            return
        self._cache.pop(key, None)
        while len(self._cache) >= self.max_entries > 0:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = (self._clock() + ttl, dest)

    # ------------------------------------------------------------------ lookup

    async def lookup(self, address: Address) -> Destination | None:
        key = address.key
        found, dest = self._cached(key)
        if found:
            self.hits += 1
            return dest
        task = self._inflight.get(key)
        if task is None:
            self.misses += 1
            done, rest = step(self._resolve(address))
            if done:            # answered without waiting: no task, nothing to share
                self._store(key, rest)
                return rest
            task = asyncio.ensure_future(rest)
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        return await self._wait(task)

    async def _wait(self, task: asyncio.Task[Destination | None]) -> Destination | None:
        """The shared resolution's result. Shielded: one caller giving up does not cancel
        it for the others; the last caller to give up cancels it (and gives it a moment
        to wind down, so the source's clean-up has run when the caller's time limit
        reports)."""
        self._waiting[task] = self._waiting.get(task, 0) + 1
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._waiting.get(task) == 1 and not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            raise
        finally:
            left = self._waiting.get(task, 1) - 1
            if left > 0:
                self._waiting[task] = left
            else:
                self._waiting.pop(task, None)

    def _done(self, key: str, task: asyncio.Task[Destination | None]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if task.cancelled() or task.exception() is not None:
            return  # temporary failures are never cached
        self._store(key, task.result())

    async def _first(self, address: Address) -> Destination | None:
        for source in self.sources:
            dest = await source.lookup(address)
            if dest is not None:
                return dest
        return None

    def _is_local(self, address: str) -> bool:
        return self._domains is None or Address(address).domain.rstrip(".") in self._domains

    async def _resolve(self, address: Address) -> Destination | None:
        dest = await self._first(address)
        if dest is None:
            return None
        budget = _Budget(self.max_targets, self.max_lookups,
                         asyncio.Semaphore(self.max_parallel))
        targets = await self._expand(dest, (address.key,), budget)
        out: list[Target] = []
        seen: set[str] = set()
        for target in targets:
            tkey = target.address.lower()
            if tkey not in seen:
                seen.add(tkey)
                out.append(target)
        if budget.cut:
            log.warning("<%s>: alias expansion cut at %d targets after %d lookups (limits: %d "
                        "targets, %d lookups)", address.text, len(out), budget.made + 1,
                        self.max_targets, self.max_lookups)
        if not out:
            log.warning("<%s>: every alias branch loops; treated as unknown", address.text)
            return None
        return Destination(tuple(out))

    async def _expand(self, dest: Destination, path: tuple[str, ...],
                      budget: _Budget) -> list[Target]:
        """Final targets of ``dest`` (found for ``path[-1]``), resolving unresolved ones
        within ``budget``; the result keeps the order of the alias tree."""
        pending: list[tuple[int, Target]] = []
        slots: list[list[Target]] = []
        for target in dest.targets:
            if budget.targets_left <= 0 and target.address.lower() not in budget.seen:
                budget.cut = True
                break       # a huge answer is not walked to its end
            slot: list[Target] = []
            slots.append(slot)
            if not target.local or target.mailbox is not None:
                if budget.take(target):
                    slot.append(target)
                continue
            tkey = target.address.lower()
            if tkey == path[-1]:
                if budget.take(target):     # the source's own final answer
                    slot.append(target)
            elif tkey in path:
                log.warning("alias loop cut: %s -> %s", " -> ".join(path), target.address)
            elif not self._is_local(target.address):
                forward = Target(target.address, False, None)
                if budget.take(forward):
                    slot.append(forward)
            elif len(path) > self.max_depth:
                log.warning("alias expansion deeper than %d cut at %s", self.max_depth,
                            " -> ".join(path))
            elif budget.reserve_lookup():
                pending.append((len(slots) - 1, target))
        if pending:
            results = await asyncio.gather(
                *(self._expand_one(t, path, budget) for _, t in pending))
            for (index, _), result in zip(pending, results, strict=True):
                slots[index].extend(result)
        return [t for slot in slots for t in slot]

    async def _expand_one(self, target: Target, path: tuple[str, ...],
                          budget: _Budget) -> list[Target]:
        async with budget.gate:   # at most max_parallel lookups of this resolution at once
            if budget.targets_left <= 0:
                budget.cut = True
                return []         # enough found while this one waited its turn
            budget.made += 1
            sub = await self._first(Address(target.address))
        if sub is None:
            log.info("alias target <%s> of <%s> is known to no source", target.address,
                     path[0])
            return [target] if budget.take(target) else []
        return await self._expand(sub, (*path, target.address.lower()), budget)

    async def aclose(self) -> None:
        """Close every source that holds resources (pools, threads)."""
        for task in list(self._inflight.values()):
            task.cancel()
        for source in self.sources:
            if isinstance(source, Closeable):
                try:
                    await source.aclose()
                except Exception:  # stopping must go on (logged with its traceback)
                    log.exception("closing %r failed", source)
