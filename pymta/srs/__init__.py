"""The Sender Rewriting Scheme, PostSRSd's job inside the server: forwarded mail keeps passing
SPF at the next hop, and bounces of it find their way back.

Three modules, one per job, sharing one codec per server (:func:`build`):

* :mod:`~pymta.srs.codec`: the address format (Shevek's, as PostSRSd writes it), its hash,
  timestamp and secrets. No I/O but the secret file, read on first use.
* :mod:`~pymta.srs.rewrite`: the pre-queue stage that rewrites the envelope sender of
  forwarded mail from foreign senders (``alice@origin.test`` becomes
  ``SRS0=…@<SRS domain>``).
* :mod:`~pymta.srs.reverse`: the recipient lookup that takes such an address back to the
  original sender when a bounce (or a reply) comes in, and refuses forged or expired ones.

``pymta.wiring`` builds the codec once per server (``Services``) and gives the same object to
both the stage and the lookup, so what one signs the other verifies.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pymta.srs.codec import SRS, SRSError, load_secrets

if TYPE_CHECKING:
    from pymta.config.model import Config

__all__ = ["SRS", "SRSError", "build", "srs_domain"]


def srs_domain(config: Config) -> str:
    """``SRS_DOMAIN``, else the first ``MAIL_DOMAIN``."""
    return (config.srs_domain or config.first_domain).lower().rstrip(".")


def build(config: Config) -> SRS | None:
    """The SRS codec a Config asks for, or None when ``SRS_ENABLE=no``. With ``SRS_SECRET``
    (space-separated, first signs) the secrets are given; else they come from
    ``<state dir>/srs/secret``, read (or generated) on first use: building touches no file."""
    if not config.srs_enable:
        return None
    domain = srs_domain(config)
    given = config.srs_secret.split()
    if given:
        return SRS(given, domain, max_age=config.srs_max_age)
    path = os.path.join(config.state_dir, "srs", "secret")
    return SRS(lambda: load_secrets(path), domain, max_age=config.srs_max_age)
