"""DMARC (issue 6) over SMTP against the real test DNS server: policies reject, quarantine and
none, with SPF aligned or not (the client is 127.0.0.1, every ``*.test`` sender domain below
authorizes it), relaxed and strict alignment, ``sp=`` for subdomains, ``pct``, DNS failure,
and ``DMARC_ENFORCE=no``."""

from __future__ import annotations

import asyncio
import io
import re

import pytest

from pymta.cli.queue import cmd_hold
from tests.conftest import wait_for
from tests.integration._senderauth import auth_mta, delivered, header_block, message, send

SPF_OK = '"v=spf1 ip4:127.0.0.0/8 -all"'
ZONE = f"""\
$TTL 300
$ORIGIN reject.test.
@        IN TXT {SPF_OK}
_dmarc   IN TXT "v=DMARC1; p=reject; rua=mailto:dmarc@reject.test"
bounce   IN TXT {SPF_OK}
$ORIGIN strict.test.
@        IN TXT {SPF_OK}
_dmarc   IN TXT "v=DMARC1; p=reject; aspf=s"
bounce   IN TXT {SPF_OK}
$ORIGIN quarantine.test.
@        IN TXT {SPF_OK}
_dmarc   IN TXT "v=DMARC1; p=quarantine"
$ORIGIN nonepolicy.test.
@        IN TXT {SPF_OK}
_dmarc   IN TXT "v=DMARC1; p=none"
$ORIGIN org.test.
@        IN TXT {SPF_OK}
_dmarc   IN TXT "v=DMARC1; p=none; sp=reject"
$ORIGIN spffail.test.
@        IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
_dmarc   IN TXT "v=DMARC1; p=reject"
$ORIGIN sampled.test.
@        IN TXT {SPF_OK}
_dmarc   IN TXT "v=DMARC1; p=reject; pct=0"
$ORIGIN dnsfail.test.
@        IN TXT {SPF_OK}
$ORIGIN other.test.
@        IN TXT {SPF_OK}
"""


@pytest.fixture
def zone(dns_zone):
    dns_zone.set_zone(ZONE)
    return dns_zone


def auth_results(stored: bytes) -> str:
    m = re.search(r"^Authentication-Results: (.*)$", header_block(stored), re.M)
    assert m, stored
    return m.group(1)


async def test_reject_policy_aligned_spf_passes(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@reject.test", message("a@reject.test"))
        assert code == 250, text
        ares = auth_results(await delivered(mta))
    assert "spf=pass smtp.mailfrom=reject.test" in ares
    assert "dmarc=pass (p=reject) header.from=reject.test" in ares


async def test_reject_policy_unaligned_spf_is_refused(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        # SPF passes, but for other.test: not the author's domain
        code, text = await send(mta, "a@other.test", message("ceo@reject.test"))
        assert code == 550 and "5.7.1" in text, text
        assert mta.store.ids() == []


async def test_spf_fail_of_the_author_domain_is_refused(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@spffail.test", message("a@spffail.test"))
    assert code == 550 and "5.7.1" in text, text


async def test_relaxed_alignment_accepts_a_subdomain(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "bounces@bounce.reject.test", message("a@reject.test"))
        assert code == 250, text
        assert "dmarc=pass" in auth_results(await delivered(mta))


async def test_strict_alignment_refuses_a_subdomain(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "bounces@bounce.strict.test", message("a@strict.test"))
    assert code == 550 and "5.7.1" in text, text


async def test_subdomain_policy_from_the_organizational_domain(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        # news.org.test has no record: org.test's applies, with sp=reject
        code, text = await send(mta, "a@other.test", message("a@news.org.test"))
        assert code == 550, text
        # org.test itself: p=none → delivered, the failure recorded
        code, text = await send(mta, "a@other.test", message("a@org.test"))
        assert code == 250, text
        assert "dmarc=fail (p=none) header.from=org.test" in auth_results(await delivered(mta))


async def test_quarantine_holds_the_message_until_released(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@other.test", message("a@quarantine.test"))
        assert code == 250, text
        [qid] = mta.store.ids()
        env = mta.store.load(qid)
        assert env.held and "quarantine" in env.extra["quarantine"]
        out, err = io.StringIO(), io.StringIO()
        # in a thread, as a command from outside would run: the server's loop goes on
        assert await asyncio.to_thread(cmd_hold, mta.store, mta.config.state_dir, [qid],
                                       False, out, err) == 0, err.getvalue()
        mta.manager.wake()
        ares = auth_results(await delivered(mta))
        await wait_for(lambda: not mta.store.ids())
    assert "dmarc=fail (p=quarantine) header.from=quarantine.test" in ares


async def test_quarantine_aligned_is_delivered(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@quarantine.test", message("a@quarantine.test"))
        assert code == 250, text
        assert "dmarc=pass (p=quarantine)" in auth_results(await delivered(mta))


async def test_none_policy_unaligned_is_delivered(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@other.test", message("a@nonepolicy.test"))
        assert code == 250, text
        ares = auth_results(await delivered(mta))
    assert "dmarc=fail (p=none) header.from=nonepolicy.test" in ares


async def test_no_record_is_none(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@other.test", message("a@other.test"))
        assert code == 250, text
        assert "dmarc=none header.from=other.test" in auth_results(await delivered(mta))


async def test_pct_zero_applies_the_next_milder_policy(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@other.test", message("a@sampled.test"))
        assert code == 250, text
        [qid] = mta.store.ids()
        assert mta.store.load(qid).held      # reject outside the sample → quarantine


async def test_dns_failure_is_temperror_never_a_refusal(tmp_path, zone):
    zone.fail("_dmarc.dnsfail.test", "SERVFAIL")
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@other.test", message("a@dnsfail.test"))
        assert code == 250, text
        assert "dmarc=temperror header.from=dnsfail.test" in auth_results(
            await delivered(mta))


async def test_enforce_off_only_tags(tmp_path, zone):
    async with auth_mta(tmp_path, zone, dmarc_enforce=False) as mta:
        code, text = await send(mta, "a@other.test", message("ceo@reject.test"))
        assert code == 250, text
        stored = await delivered(mta)
    headers = header_block(stored)
    assert "dmarc=fail (p=reject) header.from=reject.test" in auth_results(stored)
    assert re.search(r"^X-DMARC-Disposition: reject ", headers, re.M), headers


async def test_trusted_clients_are_not_judged(tmp_path, zone):
    async with auth_mta(tmp_path, zone, mynetworks=("127.0.0.1/32",)) as mta:
        code, text = await send(mta, "a@other.test", message("ceo@reject.test"))
    assert code == 250, text


async def test_disabled(tmp_path, zone):
    async with auth_mta(tmp_path, zone, dmarc_check=False) as mta:
        code, text = await send(mta, "a@other.test", message("ceo@reject.test"))
        assert code == 250, text
        assert "dmarc=" not in auth_results(await delivered(mta))
