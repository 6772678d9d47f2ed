"""The SRS reverse lookup: ``RCPT TO:<SRS0=…@srs-domain>`` is a valid recipient that stands
for the original sender of a message we forwarded (PostSRSd's reverse map).

It sits in front of the other recipient lookups. An address outside the SRS domain, or whose
local part does not start with ``SRS0``/``SRS1`` and a separator, is not ours: ``None`` lets
the next source answer. An SRS address is verified (hash with any configured secret, then
the timestamp for SRS0) and resolves to its original as a *remote* Target, so a bounce (null
sender, the usual case) or a reply goes back where the forwarded message came from. A forged
(bad hash) or expired SRS address is refused with ``550 5.1.1`` and a text saying which; it
never falls through to a catch-all. A local part that only starts like SRS but does not have
its fields (``srs0-sales``) is left to the other lookups. If the reversed address is in one
of our own domains, it is resolved through the other lookups.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

from pymta.contracts import RecipientLookup
from pymta.srs import SRS, SRSError, is_srs
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
                 inner: Sequence[RecipientLookup] = ()) -> None:
        self.srs = srs
        self.local_domains = frozenset(d.lower().rstrip(".") for d in local_domains)
        self.inner = list(inner)

    def __repr__(self) -> str:
        return f"SRSLookup({self.srs.domain!r})"

    async def lookup(self, address: Address) -> Destination | None:
        if address.domain.rstrip(".") != self.srs.domain or not is_srs(address.local):
            return None
        try:
            original = self.srs.reverse(address.text)
        except SRSError as exc:
            if exc.reason == "malformed":
                return None  # "srs0-sales@": not one of ours; the other lookups may know it
            log.warning("SRS reverse of <%s> refused: %s", address.text, exc)
            raise SRSReverseRefused(Reply(
                550, "5.1.1", f"<{address.text}>: Recipient address rejected: "
                              f"{_WHY.get(exc.reason, 'invalid SRS address')}")) from None
        target = Address(original)
        if target.domain in self.local_domains:
            for source in self.inner:
                dest = await source.lookup(target)
                if dest is not None:
                    return dest
            return None
        log.debug("SRS reverse: <%s> -> <%s>", address.text, original)
        return Destination((Target(original, local=False),))
