"""The SRS reverse lookup: ``RCPT TO:<SRS0=…@srs-domain>`` is a valid recipient that stands
for the original sender of a message we forwarded (PostSRSd's reverse map).

It wraps the server's recipient lookup (the outermost layer: SRS reverse, then
``REGEX_ALIAS``, then the lookup chain; see ``pymta.wiring``). An address outside the SRS
domain, or whose local part does not start with ``SRS0``/``SRS1`` and a separator, is not
ours: it goes to the wrapped lookup as it is. An SRS address is verified (hash with any
configured secret, then the timestamp for SRS0) and resolves to its original as a *remote*
Target, so a bounce (null sender, the usual case) or a reply goes back where the forwarded
message came from. A forged (bad hash) or expired SRS address is refused with ``550 5.1.1``
and a text saying which; it never falls through to a catch-all. A local part that only
starts like SRS but does not have its fields (``srs0-sales``) is left to the wrapped lookup.
If the reversed address is in one of our own domains, it is resolved through the wrapped
lookup.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pymta.contracts import Closeable, RecipientLookup
from pymta.srs.codec import SRS, SRSError, is_srs
from pymta.types import Address, Destination, Reply, SMTPError, Target

log = logging.getLogger("pymta.srs")

_WHY = {
    "forged": "invalid SRS signature",
    "expired": "SRS address expired",
}


class SRSReverseRefused(SMTPError):
    """A permanent refusal of an SRS address (forged, expired, malformed)."""


class SRSLookup:
    """A :class:`~pymta.contracts.RecipientLookup` that reverses SRS addresses (module doc)."""

    def __init__(self, srs: SRS, local_domains: Iterable[str] = (),
                 inner: RecipientLookup | None = None) -> None:
        """``inner``: the lookup every other address goes to (None: nobody else knows
        anything)."""
        self.srs = srs
        self.local_domains = frozenset(d.lower().rstrip(".") for d in local_domains)
        self.inner = inner

    def __repr__(self) -> str:
        return f"SRSLookup({self.srs.domain!r}, {self.inner!r})"

    async def _inner(self, address: Address) -> Destination | None:
        return None if self.inner is None else await self.inner.lookup(address)

    async def lookup(self, address: Address) -> Destination | None:
        if address.domain.rstrip(".") != self.srs.domain or not is_srs(address.local):
            return await self._inner(address)
        try:
            original = self.srs.reverse(address.text)
        except SRSError as exc:
            if exc.reason == "malformed":
                return await self._inner(address)  # "srs0-sales@": not one of ours
            log.warning("SRS reverse of <%s> refused: %s", address.text, exc)
            raise SRSReverseRefused(Reply(
                550, "5.1.1", f"<{address.text}>: Recipient address rejected: "
                              f"{_WHY.get(exc.reason, 'invalid SRS address')}")) from None
        target = Address(original)
        if target.domain in self.local_domains:
            return await self._inner(target)
        log.debug("SRS reverse: <%s> -> <%s>", address.text, original)
        return Destination((Target(original, local=False),))

    async def aclose(self) -> None:
        """Close the wrapped lookup (its sources' pools and threads)."""
        if isinstance(self.inner, Closeable):
            await self.inner.aclose()
