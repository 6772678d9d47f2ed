"""clamd replies and client arguments (issue 12): what each of clamd's answers becomes, and
that a bad address or limit is refused when the client is built, not at the first message."""

from __future__ import annotations

import pytest

from pymta.content.clamd import ClamdClient, ClamdStatus, ScannerError, parse_reply


def test_ok_is_clean() -> None:
    result = parse_reply(b"stream: OK\0")
    assert result.status is ClamdStatus.CLEAN
    assert result.signatures == ()
    assert result.text == "stream: OK"


def test_found_names_the_signature() -> None:
    result = parse_reply(b"stream: Win.Test.EICAR_HDB-1 FOUND\0")
    assert result.status is ClamdStatus.INFECTED
    assert result.infected
    assert result.signatures == ("Win.Test.EICAR_HDB-1",)


def test_every_found_line_is_kept_in_order() -> None:
    """All-match scanning: one FOUND line per signature, NUL- or newline-ended."""
    result = parse_reply(b"stream: Sig.One FOUND\0stream: Sig.Two FOUND\n")
    assert result.signatures == ("Sig.One", "Sig.Two")


def test_size_limit_is_too_large_not_a_virus() -> None:
    result = parse_reply(b"INSTREAM size limit exceeded. ERROR\0")
    assert result.status is ClamdStatus.TOO_LARGE
    assert not result.infected
    assert result.signatures == ()


def test_other_clamd_error_keeps_its_text() -> None:
    result = parse_reply(b"stream: Can't allocate memory ERROR\0")
    assert result.status is ClamdStatus.ERROR
    assert result.text == "stream: Can't allocate memory ERROR"


@pytest.mark.parametrize("raw", [
    b"HTTP/1.1 400 Bad Request\r\n\r\n",
    b"stream: \0",                      # neither OK nor a name
    b"stream: FOUND\0",                 # FOUND without a name
    b"stream: OKAY\0",
    b"PONG\0",
])
def test_anything_else_is_a_scanner_error(raw: bytes) -> None:
    with pytest.raises(ScannerError, match="not a clamd reply") as info:
        parse_reply(raw)
    assert info.value.timeout is False


@pytest.mark.parametrize("raw", [b"", b"\0", b"\n\0"])
def test_empty_reply_is_a_scanner_error(raw: bytes) -> None:
    with pytest.raises(ScannerError, match="without a reply"):
        parse_reply(raw)


def test_client_takes_both_address_forms() -> None:
    assert str(ClamdClient("unix:/run/clamav/clamd.ctl").address) == "unix:/run/clamav/clamd.ctl"
    tcp = ClamdClient("clamav.example:3310").address
    assert (tcp.host, tcp.port) == ("clamav.example", 3310)
    assert ClamdClient("[::1]:3310").address.host == "::1"


@pytest.mark.parametrize(("address", "problem"), [
    ("unix:clamd.sock", "absolute"),
    ("localhost", "no port"),
    ("localhost:http", "1-65535"),
    ("localhost:70000", "1-65535"),
    (":3310", "no host"),
    ("::1:3310", r"\[addr\]:port"),
])
def test_bad_address_is_a_clear_value_error(address: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as info:
        ClamdClient(address)
    assert address in str(info.value)


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"timeout": 0}, "timeout"),
    ({"max_in_flight": 0}, "max_in_flight"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_bad_limits_are_value_errors(kwargs: dict[str, float], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        ClamdClient("127.0.0.1:3310", **kwargs)  # type: ignore[arg-type]
