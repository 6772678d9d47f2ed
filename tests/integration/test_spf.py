"""SPF (issue 6) over SMTP against the real test DNS server: the client is 127.0.0.1, the
sender domains' records say what 127.0.0.1 may do. Results show in ``Received-SPF`` and in
``Authentication-Results`` of the delivered message; ``SPF_REJECT_FAIL=yes`` refuses
``fail`` with 550 5.7.23; DNS failures and timeouts are ``temperror``, never 5xx."""

from __future__ import annotations

import re
import time

import pytest

from tests.integration._senderauth import HOSTNAME, auth_mta, delivered, header_block, message, send

ZONE = """\
$TTL 300
$ORIGIN pass.test.
@   IN TXT "v=spf1 ip4:127.0.0.0/8 -all"
$ORIGIN fail.test.
@   IN TXT "v=spf1 ip4:192.0.2.0/24 -all"
$ORIGIN softfail.test.
@   IN TXT "v=spf1 ip4:192.0.2.0/24 ~all"
$ORIGIN neutral.test.
@   IN TXT "v=spf1 ?all"
$ORIGIN none.test.
@   IN A   127.0.0.1
$ORIGIN perm.test.
@   IN TXT "v=spf1 ip4:127.0.0.0/8 bogus:x -all"
$ORIGIN temp.test.
@   IN A   127.0.0.1
$ORIGIN slow.test.
@   IN A   127.0.0.1
$ORIGIN client.example.net.
@   IN TXT "v=spf1 a:client.example.net -all"
@   IN A   127.0.0.1
"""


@pytest.fixture
def zone(dns_zone):
    dns_zone.set_zone(ZONE)
    return dns_zone


def spf_of(stored: bytes) -> tuple[str, str]:
    """(Received-SPF value, Authentication-Results value) of a delivered message."""
    headers = header_block(stored)
    rspf = re.search(r"^Received-SPF: (.*)$", headers, re.M)
    ares = re.search(r"^Authentication-Results: (.*)$", headers, re.M)
    assert rspf and ares, headers
    return rspf.group(1), ares.group(1)


@pytest.mark.parametrize("domain, result", [
    ("pass.test", "pass"),
    ("fail.test", "fail"),
    ("softfail.test", "softfail"),
    ("neutral.test", "neutral"),
    ("none.test", "none"),
    ("unknown.test", "none"),          # NXDOMAIN
    ("perm.test", "permerror"),
])
async def test_result_recorded(tmp_path, zone, domain, result):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, f"someone@{domain}", message(f"someone@{domain}"))
        assert code == 250, text
        rspf, ares = spf_of(await delivered(mta))
    assert rspf.startswith(f"{result} (")
    assert "client-ip=127.0.0.1;" in rspf and f'envelope-from="someone@{domain}"' in rspf
    assert f"receiver={HOSTNAME};" in rspf and rspf.endswith("identity=mailfrom")
    assert ares.startswith(f"{HOSTNAME}; spf={result} smtp.mailfrom={domain}")


async def test_received_spf_stands_above_our_received(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        await send(mta, "a@pass.test", message("a@pass.test"))
        names = [line.split(":", 1)[0] for line in header_block(await delivered(mta)).split("\n")]
    # local delivery adds Return-Path/Delivered-To; then what the pipeline prepended, then ours
    assert names.index("Authentication-Results") < names.index("Received-SPF") < names.index(
        "Received")


async def test_servfail_is_temperror_not_refusal(tmp_path, zone):
    zone.fail("temp.test", "SERVFAIL")
    async with auth_mta(tmp_path, zone, spf_reject_fail=True) as mta:
        code, text = await send(mta, "a@temp.test", message("a@temp.test"))
        assert code == 250, text
        rspf, ares = spf_of(await delivered(mta))
    assert rspf.startswith("temperror (")
    assert "spf=temperror smtp.mailfrom=temp.test" in ares


async def test_timeout_is_temperror_not_refusal(tmp_path, zone):
    zone.drop("slow.test")
    async with auth_mta(tmp_path, zone, spf_reject_fail=True) as mta:
        started = time.monotonic()
        code, text = await send(mta, "a@slow.test", message("a@slow.test"))
        assert code == 250, text
        assert time.monotonic() - started < 10
        _rspf, ares = spf_of(await delivered(mta))
    assert "spf=temperror smtp.mailfrom=slow.test" in ares


async def test_reject_fail_when_asked(tmp_path, zone):
    async with auth_mta(tmp_path, zone, spf_reject_fail=True) as mta:
        code, text = await send(mta, "a@fail.test", message("a@fail.test"))
        assert code == 550 and "5.7.23" in text, text
        # softfail is never refused, even then
        code, text = await send(mta, "a@softfail.test", message("a@softfail.test"))
        assert code == 250, text


async def test_fail_only_recorded_by_default(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "a@fail.test", message("a@fail.test"))
        assert code == 250, text


async def test_null_sender_checks_helo(tmp_path, zone):
    async with auth_mta(tmp_path, zone) as mta:
        code, text = await send(mta, "", message("MAILER-DAEMON@client.example.net"),
                                helo="client.example.net")
        assert code == 250, text
        rspf, ares = spf_of(await delivered(mta))
    assert rspf.startswith("pass (") and rspf.endswith("identity=helo")
    assert "envelope-from" not in rspf
    assert "spf=pass smtp.helo=client.example.net" in ares


async def test_trusted_clients_are_not_checked(tmp_path, zone):
    async with auth_mta(tmp_path, zone, mynetworks=("127.0.0.0/8",),
                        spf_reject_fail=True) as mta:
        code, text = await send(mta, "a@fail.test", message("a@fail.test"))
        assert code == 250, text
        headers = header_block(await delivered(mta))
    assert "Received-SPF" not in headers
    assert "spf=" not in headers and "dmarc=" not in headers


async def test_disabled(tmp_path, zone):
    async with auth_mta(tmp_path, zone, spf_check=False, spf_reject_fail=True) as mta:
        code, text = await send(mta, "a@fail.test", message("a@fail.test"))
        assert code == 250, text
        headers = header_block(await delivered(mta))
    assert "Received-SPF" not in headers
