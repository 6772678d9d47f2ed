"""Authentication-Results (issue 6, RFC 8601) in delivered mail: our field with the checks'
results is added; incoming fields that claim our authserv-id are removed from the spooled
message (the spool file is rewritten before the commit), those of other authserv-ids kept,
the body untouched."""

from __future__ import annotations

import os
import re

import pytest

from tests.integration._defences import queue_listing
from tests.integration._senderauth import (
    HOSTNAME,
    auth_mta,
    delivered,
    header_block,
    message,
    send,
)

ZONE = """\
$TTL 300
$ORIGIN sender.test.
@        IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
_dmarc   IN TXT "v=DMARC1; p=quarantine"
"""

BODY = b"\r\nLine one.\r\nAuthentication-Results: mx.example.com; not a header here\r\n"

FORGED = [
    b"Authentication-Results: mx.example.com; spf=pass smtp.mailfrom=bank.test\r\n",
    b"Authentication-Results: MX.Example.COM;\r\n\tdkim=pass header.d=bank.test\r\n",
    b"Authentication-Results: (forged) mx.example.com; dmarc=pass\r\n",
    b'Authentication-Results: "mx.example.com"; arc=pass\r\n',
]
KEPT = [
    b"Authentication-Results: relay.other.test; spf=fail smtp.mailfrom=x.test\r\n",
    b"Authentication-Results: mx.example.com.evil.test; dkim=pass\r\n",
]


@pytest.fixture
def zone(dns_zone):
    dns_zone.set_zone(ZONE)
    return dns_zone


def fields(stored: bytes, name: str) -> list[str]:
    return re.findall(rf"^{name}: (.*)$", header_block(stored), re.M)


async def test_header_added(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@sender.test", message("a@sender.test"))
        assert code == 250, text
        stored = await delivered(mta)
    [ares] = fields(stored, "Authentication-Results")
    assert ares.startswith(f"{HOSTNAME}; spf=pass smtp.mailfrom=sender.test")
    assert "dmarc=pass (p=quarantine) header.from=sender.test" in ares
    # above our Received (a trace field stack: newest on top)
    text = stored.decode()
    assert text.index("Authentication-Results:") < text.index("Received: from")


async def test_forged_ours_removed_others_kept(tmp_path, zone):
    extra = b"".join(FORGED[:2] + KEPT[:1] + FORGED[2:] + KEPT[1:])
    data = message("a@sender.test", extra=extra)
    data = data[:data.index(b"\r\n\r\n") + 2] + BODY
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@sender.test", data)
        assert code == 250, text
        stored = await delivered(mta)
    ares = fields(stored, "Authentication-Results")
    ours = [a for a in ares if a.startswith(f"{HOSTNAME};")]
    assert len(ours) == 1 and "spf=pass" in ours[0]
    assert "bank.test" not in header_block(stored)
    assert "relay.other.test; spf=fail smtp.mailfrom=x.test" in ares
    assert "mx.example.com.evil.test; dkim=pass" in ares
    assert len(ares) == 3
    # the body is untouched, even a line in it that looks like the forged field
    assert stored.replace(b"\r\n", b"\n").endswith(BODY.replace(b"\r\n", b"\n"))


async def test_configured_authserv_id(tmp_path, zone):
    extra = (b"Authentication-Results: auth.example.com; spf=pass\r\n"
             b"Authentication-Results: mx.example.com; spf=pass\r\n")
    async with auth_mta(tmp_path, zone, authserv_id="auth.example.com") as mta:
        code, text = await send(mta, "a@sender.test", message("a@sender.test", extra=extra))
        assert code == 250, text
        ares = fields(await delivered(mta), "Authentication-Results")
    assert ares[0].startswith("auth.example.com; spf=pass smtp.mailfrom=sender.test")
    assert ares[1:] == ["mx.example.com; spf=pass"]     # not ours any more: kept


async def test_spool_file_rewritten_before_commit(tmp_path, zone):
    """A held (quarantined) message shows the rewritten spool: forged field gone, the size in
    the envelope is the file's."""
    data = message("a@sender.test", extra=FORGED[0] + KEPT[0])
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@other.test", data)      # unaligned → quarantine
        assert code == 250, text
        [qid] = mta.store.ids()
        # before body_path: the SQLite store hands an inline body out as a copy in a spool
        # file of its pool, which then is not empty
        assert queue_listing(mta.config)["tmp"] == []     # no half-received message left
        env = mta.store.load(qid)
        with open(mta.store.body_path(qid), "rb") as f:
            spooled = f.read()
        assert env.held
        assert env.size == len(spooled) == os.path.getsize(mta.store.body_path(qid))
        assert b"bank.test" not in spooled and KEPT[0] in spooled
        assert spooled.startswith(b"Received: from ")
        assert spooled.endswith(b"\r\nHello.\r\n")
        assert "Authentication-Results: mx.example.com;" in env.prepend
