"""DKIM keys, result classification and A-R fragments (issue 6): pure logic, no sockets (key
records come from a dict through the prefetched ``dnsfunc``)."""

from __future__ import annotations

import base64
import re
import threading
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization

from pymta.config.errors import ConfigError
from pymta.config.load import load_config
from pymta.pipeline import CannotEvaluate, Transaction
from pymta.pipeline.arc import forwarded, render_aar_input
from pymta.pipeline.dkimkeys import (
    DkimKey,
    KeyStore,
    generate_key,
    key_path,
    parse_private_key,
    private_pem,
)
from pymta.pipeline.dkimsign import DkimSign, from_domain, sign_message
from pymta.pipeline.dkimverify import (
    TEMPFAIL,
    DkimSignature,
    parse_signatures,
    quote_value,
    verify_all,
)
from pymta.pipeline.dmarc import DkimSignatureResult
from pymta.pipeline.headers import strict_view
from pymta.types import Recipient

MSG = (b"Received: from x by y; Mon, 1 Jan 2024 10:00:00 +0000\r\nFrom: A <a@example.com>\r\n"
       b"To: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n")
RSA = generate_key("rsa", 1024)


def _verify(message: bytes, records: dict) -> list[DkimSignature]:
    header = message.split(b"\r\n\r\n", 1)[0] + b"\r\n"
    return verify_all(message, parse_signatures(header), records)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
def test_sign_then_verify_pass_fail_permerror_temperror(algorithm: str) -> None:
    key = DkimKey("example.com", "s1", RSA if algorithm == "rsa" else generate_key("ed25519"))
    signed = sign_message(MSG, key) + MSG
    good = {key.record_name: key.txt_value().encode()}
    (res,) = _verify(signed, good)
    assert isinstance(res, DkimSignatureResult)  # what DMARC reads
    assert (res.domain, res.selector, res.result) == ("example.com", "s1", "pass")
    assert res.algorithm == f"{algorithm}-sha256"
    assert res.auth_result() == (f"dkim=pass header.d=example.com header.s=s1 "
                                 f"header.b={quote_value(res.b_prefix)}")
    assert _verify(signed.replace(b"body", b"bodY"), good)[0].result == "fail"
    assert _verify(signed.replace(b"Subject: hi", b"Subject: ho"), good)[0].result == "fail"
    assert _verify(signed, {})[0].result == "permerror"
    assert _verify(signed, {key.record_name: TEMPFAIL})[0].result == "temperror"
    assert _verify(signed, {key.record_name: b"v=DKIM1; p=garbage!"})[0].result == "permerror"
    assert _verify(signed, {key.record_name: b"v=DKIM1; k=rsa; p="})[0].result == "permerror"


def test_broken_signature_fields_are_neutral_and_sha1_permerror() -> None:
    key = DkimKey("example.com", "s1", RSA)
    records = {key.record_name: key.txt_value().encode()}
    signed = sign_message(MSG, key) + MSG
    expired = re.sub(rb"t=\d+;", b"t=1000; x=2000;", signed)
    assert _verify(expired, records)[0].result == "neutral"
    bad_i = signed.replace(b"i=@example.com", b"i=@evil.example")
    assert _verify(bad_i, records)[0].result == "neutral"
    syntax = b"DKIM-Signature: v=1; a=rsa-sha256; ===\r\n" + MSG
    assert _verify(syntax, records)[0].result == "neutral"
    sha1 = signed.replace(b"a=rsa-sha256", b"a=rsa-sha1")
    assert _verify(sha1, records)[0].result == "permerror"


def test_every_signature_gets_its_own_result_top_first() -> None:
    a = DkimKey("example.com", "a", RSA)
    b = DkimKey("example.org", "b", generate_key("ed25519"))
    signed = sign_message(MSG, a) + MSG
    signed = sign_message(signed, b) + signed
    results = _verify(signed, {b.record_name: b.txt_value().encode()})
    assert [(r.domain, r.result) for r in results] == [("example.org", "pass"),
                                                       ("example.com", "permerror")]


def test_quote_value() -> None:
    assert quote_value("AbCd1234") == "AbCd1234"
    assert quote_value("Ab/d+12=") == '"Ab/d+12="'
    # no quoted-pairs: dkimpy re-prints our A-R into the AAR and would double them
    # (pymta.headervalue); a quote, backslash or "@" in a quoted value becomes "?"
    assert quote_value('a"b\\c@d') == '"a?b?c?d"'


def test_parse_private_key_forms_and_errors() -> None:
    pem = private_pem(RSA).decode()
    bare = "".join(pem.strip().splitlines()[1:-1])
    pkcs8 = RSA.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()
    for text in (pem, bare, pkcs8, pem.replace("\n", "\\n")):
        assert parse_private_key(text).private_numbers() == RSA.private_numbers()
    ed = generate_key("ed25519")
    assert isinstance(parse_private_key(private_pem(ed)), type(ed))
    for bad, why in (("MIIEpAIBAAKCAQEAnot-a-key", "not a PEM"),
                     (base64.b64encode(b"\x30\x03\x02\x01\x00").decode(), "not a PEM"),
                     ("", "empty")):
        with pytest.raises(ConfigError, match=f"^DKIM_PRIVATEKEY: {why}"):
            parse_private_key(bad)


def test_config_variables(tmp_path: Path) -> None:
    env = {"MAIL_DOMAIN": "example.com", "DKIM_SELECTOR": "Sel-2024", "DKIM_KEYBITS": "3072",
           "DKIM_ALGORITHM": "ED25519", "PYMTA_DKIM_SIGN": "no", "PYMTA_ARC": "no"}
    config = load_config(env)
    assert (config.dkim_selector, config.dkim_keybits, config.dkim_algorithm) == (
        "sel-2024", 3072, "ed25519")
    assert not config.dkim_sign and not config.arc and config.dkim_verify
    for name, value, msg in (("DKIM_KEYBITS", "512", "at least 1024"),
                             ("DKIM_ALGORITHM", "dsa", "rsa or ed25519"),
                             ("DKIM_SELECTOR", "a b", "not a selector"),
                             ("DKIM_PRIVATEKEY", "xyz", "not a PEM")):
        with pytest.raises(ConfigError, match=f"^{name}: .*{msg}"):
            load_config({"MAIL_DOMAIN": "example.com", name: value})
    secret = "".join(private_pem(RSA).decode().strip().splitlines()[1:-1])
    config = load_config({"MAIL_DOMAIN": "example.com", "DKIM_PRIVATEKEY": secret})
    assert secret not in repr(config)


def test_keystore_generates_once_per_domain_and_writes_the_record(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path), "s1", algorithm="ed25519")
    keys = store.ensure(("example.com", "example.org"))
    assert [k.domain for k in keys] == ["example.com", "example.org"]
    assert keys[0].key.private_bytes_raw() != keys[1].key.private_bytes_raw()
    path = key_path(str(tmp_path), "example.com", "s1")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    record = (tmp_path / "dkim" / "example.com.s1._domainkey.txt").read_text()
    assert record == keys[0].zone_line() + "\n"
    again = KeyStore(str(tmp_path), "s1").get("example.com")  # read back, not regenerated
    assert again.key.private_bytes_raw() == keys[0].key.private_bytes_raw()
    # concurrent first starts (several workers) agree on one key
    tmp2 = tmp_path / "race"
    got: list[bytes] = []

    def first_start() -> None:
        got.append(KeyStore(str(tmp2), "s1", algorithm="ed25519").get("example.com")
                   .key.private_bytes_raw())

    threads = [threading.Thread(target=first_start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1


def test_configured_key_signs_for_every_domain(tmp_path: Path) -> None:
    store = KeyStore(str(tmp_path), "default", private_key=private_pem(RSA).decode())
    com, org = store.get("example.com"), store.get("example.org")
    assert com.txt_value() == org.txt_value()
    assert not key_path(str(tmp_path), "example.com", "default").exists()
    assert (tmp_path / "dkim" / "example.org.default._domainkey.txt").exists()
    long_line = com.zone_line()
    assert long_line.startswith('default._domainkey.example.com. IN TXT "v=DKIM1; k=rsa; p=')
    assert all(len(s) <= 255 for s in re.findall(r'"([^"]*)"', long_line))


def _txn(**kw: object) -> Transaction:
    base = dict(qid="Q", sender="a@example.com", recipients=[], peer_ip="192.0.2.1",
                helo="h", hostname="mx.example.com",
                local_domains=frozenset({"example.com", "example.org"}))
    base.update(kw)
    return Transaction(**base)  # type: ignore[arg-type]


def test_signing_domain_policy(tmp_path: Path) -> None:
    signer = DkimSign(KeyStore(str(tmp_path)), "example.com")
    hdr = b"From: X <x@example.org>\r\n"
    assert from_domain(hdr) == "example.org"
    assert signer.signing_domain(_txn(auth_user="u", trusted=True), hdr) == "example.org"
    foreign = b"From: <x@gmail.example>\r\n"
    assert signer.signing_domain(_txn(auth_user="u", trusted=True), foreign) == "example.com"
    assert signer.signing_domain(_txn(auth_user="u", trusted=True,
                                      sender="z@elsewhere.example"), foreign) == "example.com"
    assert signer.signing_domain(_txn(trusted=True), foreign) == "example.com"  # sender local
    assert signer.signing_domain(_txn(trusted=True, sender="z@elsewhere.example"),
                                 foreign) is None
    assert signer.signing_domain(_txn(trusted=False), hdr) is None


def test_forwarded_and_aar_input() -> None:
    local = Recipient("alice@example.com", "alice@example.com", local=True)
    alias = Recipient("rcpt@example.net", "fwd@example.com", local=False)
    relayed = Recipient("rcpt@example.net", "rcpt@example.net", local=False)
    assert forwarded(_txn(recipients=[local, alias]))
    assert not forwarded(_txn(recipients=[local, relayed]))
    assert render_aar_input("mx.example.com", []) == \
        "Authentication-Results: mx.example.com; none\r\n"
    assert render_aar_input("mx", ["spf=pass smtp.mailfrom=a.example", "dkim=none"]) == \
        "Authentication-Results: mx; spf=pass smtp.mailfrom=a.example; dkim=none\r\n"


def test_arc_seal_of_a_signed_message_verifies_offline() -> None:
    key = DkimKey("example.com", "arc", RSA)
    message = (render_aar_input("mx.example.com", ["dkim=pass header.d=example.com"]).encode()
               + MSG)
    from pymta.pipeline.arc import seal

    fields = seal(message, key.dkimpy_private, "arc", "example.com", "mx.example.com")
    assert [f.split(b":")[0] for f in fields] == [b"ARC-Seal", b"ARC-Message-Signature",
                                                  b"ARC-Authentication-Results"]
    sealed = b"".join(fields) + MSG
    records = {"arc._domainkey.example.com.": key.txt_value().encode()}
    cv, _, reason = dkim.arc_verify(sealed, dnsfunc=lambda name, timeout=5: records.get(
        name.decode() if isinstance(name, bytes) else name))
    assert cv == dkim.CV_Pass, reason


# ------------------------------------------------------------ issue 10, defect 9: malformed

def _dnsfunc(records: dict):
    def dnsfunc(name, timeout=5):
        key = name.decode() if isinstance(name, bytes) else name
        return records.get(key.rstrip(".")) or records.get(key)
    return dnsfunc


def test_issue10_defect9_obsolete_field_above_a_signature_still_verifies() -> None:
    key = DkimKey("example.com", "s1", RSA)
    records = {key.record_name: key.txt_value().encode()}
    signed = sign_message(MSG, key) + MSG
    with pytest.raises(dkim.MessageFormatError):      # what made the stage raise before
        dkim.DKIM(b"Received : from relay.example by mx.example; x\r\n" + signed)
    relayed = b"Received : from relay.example by mx.example; x\r\n" + signed
    assert [r.result for r in _verify(relayed, records)] == ["pass"]
    # the blanks are removed only for dkimpy: a relaxed signature over "Subject :" verifies
    obs = MSG.replace(b"Subject: hi", b"Subject :  hi")
    relaxed = sign_message(strict_view(obs).data, key) + obs
    assert [r.result for r in _verify(relaxed, records)] == ["pass"]


def test_issue10_defect9_simple_canonicalization_over_an_obsolete_field_is_permerror() -> None:
    key = DkimKey("example.com", "s1", RSA)
    records = {key.record_name: key.txt_value().encode()}
    sig = dkim.sign(MSG, b"s1", b"example.com", key.dkimpy_private,
                    canonicalize=(b"simple", b"simple"), include_headers=[b"from", b"subject"])
    obs = (sig + MSG).replace(b"Subject: hi", b"Subject : hi")
    (res,) = _verify(obs, records)
    assert res.result == "permerror" and "obsolete" in res.reason
    # unsigned obsolete field, simple canonicalization: verifies
    unsigned = sig + MSG.replace(b"To: b@example.net", b"To : b@example.net")
    assert [r.result for r in _verify(unsigned, records)] == ["pass"]


def test_issue10_defect9_no_empty_line_and_first_line_not_a_field_are_results() -> None:
    key = DkimKey("example.com", "s1", RSA)
    records = {key.record_name: key.txt_value().encode()}
    signed = sign_message(MSG, key) + MSG
    # the body begins where Postfix says it does: here that is what was signed
    joined = signed.replace(b"Subject: hi\r\n\r\n", b"Subject: hi\r\n")
    assert [r.result for r in _verify(joined, records)] == ["pass"]
    not_a_field = signed.replace(b"Subject: hi\r\n", b"Subject: hi\r\nnot a field\r\n")
    assert [r.result for r in _verify(not_a_field, records)] == ["fail"]


def test_issue10_defect9_unparseable_even_as_postfix_reads_it_is_permerror(monkeypatch) -> None:
    key = DkimKey("example.com", "s1", RSA)
    signed = sign_message(MSG, key) + MSG

    def refuse(*args, **kwargs):
        raise dkim.MessageFormatError("nothing parses")

    monkeypatch.setattr(dkim, "DKIM", refuse)
    (res,) = _verify(signed, {key.record_name: key.txt_value().encode()})
    assert (res.result, res.reason) == ("permerror", "message cannot be parsed")


def test_issue10_defect9_signing_obsolete_syntax_and_refusing_a_guess(tmp_path: Path) -> None:
    key = DkimKey("example.com", "s1", RSA)
    records = {key.record_name: key.txt_value().encode()}
    signer = DkimSign(KeyStore(str(tmp_path), "s1", private_key=private_pem(RSA).decode()),
                      "example.com")
    obs = MSG.replace(b"Subject: hi", b"Subject : hi")
    field = signer._sign(obs, "example.com")
    assert dkim.verify(field + strict_view(obs).data, dnsfunc=_dnsfunc(records))
    with pytest.raises(CannotEvaluate):
        signer._sign(MSG.replace(b"Subject: hi\r\n\r\n", b"Subject: hi\r\nbody line\r\n"),
                     "example.com")


def test_issue10_defect9_arc_seal_of_messages_it_cannot_seal() -> None:
    from pymta.pipeline.arc import seal

    key = DkimKey("example.com", "arc", RSA)
    ar = render_aar_input("mx.example.com", ["spf=none smtp.helo=a.example", "arc=none"]).encode()

    def sealing(message: bytes) -> list[bytes]:
        return seal(ar + message, key.dkimpy_private, "arc", "example.com", "mx.example.com")

    obs = MSG.replace(b"Subject: hi", b"Subject : hi")
    fields = sealing(obs)
    records = {"arc._domainkey.example.com": key.txt_value().encode()}
    cv, _, reason = dkim.arc_verify(b"".join(fields) + strict_view(obs).data,
                                    dnsfunc=_dnsfunc(records))
    assert cv == dkim.CV_Pass, reason
    no_from = MSG.replace(b"From: A <a@example.com>\r\n", b"")
    forged_i50 = b"ARC-Seal: i=50; cv=none; a=rsa-sha256; d=evil.test; s=x; b=AAAA\r\n" + MSG
    no_blank = MSG.replace(b"Subject: hi\r\n\r\n", b"Subject: hi\r\nbody line\r\n")
    for message in (no_from, forged_i50, no_blank):
        with pytest.raises(CannotEvaluate):
            sealing(message)
    with pytest.raises(dkim.KeyFormatError):           # our key: a fault, stays temporary
        seal(ar + MSG, b"not a key", "arc", "example.com", "mx.example.com")


def test_issue10_defect9_header_readers_accept_what_postfix_accepts() -> None:
    assert from_domain(b"Received: x\r\nFrom :  A <a@example.org>\r\n") == "example.org"
    assert from_domain(b"not a field\r\nFrom: A <a@example.org>\r\n") == ""
    sigs = parse_signatures(b"Received : x\r\nDKIM-Signature : v=1; a=rsa-sha256; d=a.test;"
                            b" s=s; h=from; bh=x; b=y\r\n")
    assert len(sigs) == 1 and sigs[0].tags is not None and sigs[0].text(b"d") == "a.test"
