"""The PROXY protocol header parser: what HAProxy sends, incomplete input, hostile input."""

from __future__ import annotations

import socket
import struct

import pytest

from pymta.receiving.proxyproto import V1_MAX, V2_MAX, V2_SIGNATURE, ProxyError, parse


def v2(command: int = 1, fam: int = 0x11, body: bytes | None = None) -> bytes:
    if body is None:
        body = socket.inet_aton("192.0.2.7") + socket.inet_aton("10.0.0.1") + \
            struct.pack(">HH", 40000, 25)
    return V2_SIGNATURE + bytes([0x20 | command, fam]) + struct.pack(">H", len(body)) + body


# ------------------------------------------------------------------ v1

def test_v1_tcp4_and_what_follows_is_not_consumed() -> None:
    line = b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\n"
    h = parse(line + b"EHLO x\r\n")
    assert h is not None
    assert (h.version, h.length, h.local) == (1, len(line), False)
    assert (h.src_ip, h.src_port, h.dst_ip, h.dst_port) == ("192.0.2.7", 40000, "10.0.0.1", 25)


def test_v1_tcp6_normalised() -> None:
    h = parse(b"PROXY TCP6 2001:DB8:0:0::7 2001:db8::1 1 65535\r\n")
    assert h is not None and (h.src_ip, h.src_port, h.dst_port) == ("2001:db8::7", 1, 65535)


def test_v1_unknown_keeps_the_connection_address() -> None:
    h = parse(b"PROXY UNKNOWN ffff:f...f:ffff 1 2\r\n")
    assert h is not None and h.local and h.length == 35
    assert parse(b"PROXY UNKNOWN\r\n") is not None


@pytest.mark.parametrize("partial", [b"P", b"PROX", b"PROXY ", b"PROXY TCP4 192.0.2.7 10.0.",
                                     b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\r"])
def test_v1_incomplete_needs_more(partial: bytes) -> None:
    assert parse(partial) is None


@pytest.mark.parametrize("bad", [
    b"EHLO client\r\n",                                   # a direct client, no header
    b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\n",          # bare LF
    b"PROXY TCP4 192.0.2.7 10.0.0.1 40000\r\n",           # a field missing
    b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25 x\r\n",      # one too many
    b"PROXY TCP5 192.0.2.7 10.0.0.1 40000 25\r\n",
    b"PROXY TCP4 2001:db8::7 10.0.0.1 40000 25\r\n",      # family mismatch
    b"PROXY TCP6 192.0.2.7 2001:db8::1 40000 25\r\n",
    b"PROXY TCP4 192.0.2.07 10.0.0.1 40000 25\r\n",       # leading zero in an octet
    b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 25\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 040000 25\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 -1 25\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 \xd9\xa1 25\r\n",     # non-ASCII digit
    b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n",           # scope id
    b"PROXY  TCP4 192.0.2.7 10.0.0.1 1 2\r\n",            # double space
    b"proxy TCP4 192.0.2.7 10.0.0.1 1 2\r\n",
    b"PROXY TCP4 192.0.2.7 10.0.0.1 1 2\rX\n",
])
def test_v1_malformed(bad: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(bad)


def test_v1_without_crlf_is_refused_at_the_limit_not_buffered() -> None:
    assert parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15)) is None
    with pytest.raises(ProxyError):
        parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14))
    with pytest.raises(ProxyError):
        parse(b"PROXY UNKNOWN " + b"x" * 100_000 + b"\r\n")


# ------------------------------------------------------------------ v2

def test_v2_inet() -> None:
    data = v2()
    h = parse(data + b"EHLO x\r\n")
    assert h is not None and h.version == 2 and h.length == len(data) and not h.local
    assert (h.src_ip, h.src_port, h.dst_ip, h.dst_port) == ("192.0.2.7", 40000, "10.0.0.1", 25)


def test_v2_inet6_with_tlvs() -> None:
    body = socket.inet_pton(socket.AF_INET6, "2001:db8::7") + \
        socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack(">HH", 1, 25) + \
        b"\x04\x00\x03abc"                            # a TLV (NOOP) after the addresses
    h = parse(v2(fam=0x21, body=body))
    assert h is not None and (h.src_ip, h.src_port) == ("2001:db8::7", 1)


def test_v2_local_and_unspecified_keep_the_connection_address() -> None:
    for data in (v2(command=0, fam=0, body=b""), v2(command=0), v2(fam=0x00, body=b""),
                 v2(fam=0x31, body=b"\x00" * 216)):
        h = parse(data)
        assert h is not None and h.local and h.length == len(data)


def test_v2_incomplete_needs_more() -> None:
    data = v2()
    for cut in range(1, len(data)):
        assert parse(data[:cut]) is None, cut


@pytest.mark.parametrize("bad", [
    V2_SIGNATURE[:11] + b"X" + b"\x21\x11\x00\x0c",             # signature broken late
    V2_SIGNATURE + b"\x11\x11\x00\x00",                           # version 1 in a v2 header
    V2_SIGNATURE + b"\x22\x11\x00\x00",                           # command 2
    V2_SIGNATURE + b"\x21\x41\x00\x00",                           # family 4
    V2_SIGNATURE + b"\x21\x13\x00\x00",                           # protocol 3
    V2_SIGNATURE + b"\x21\x12\x00\x0c" + b"\x00" * 12,            # UDP
    V2_SIGNATURE + b"\x21\x11\x00\x08" + b"\x00" * 8,             # address block too short
    V2_SIGNATURE + b"\x21\x21\x00\x0c" + b"\x00" * 12,            # too short for IPv6
    V2_SIGNATURE + b"\x21\x11\xff\xff",                           # announces 64 KiB
])
def test_v2_malformed(bad: bytes) -> None:
    with pytest.raises(ProxyError):
        parse(bad)


def test_v2_length_cap() -> None:
    assert parse(v2(body=b"\x00" * 12 + b"\x04" + b"\x00" * (V2_MAX - 16 - 13))) is not None
    with pytest.raises(ProxyError):
        parse(v2(body=b"\x00" * (V2_MAX - 16 + 1)))


def test_garbage_and_empty() -> None:
    assert parse(b"") is None
    for junk in (b"\x16\x03\x01\x02\x00", b"\r\n\r\nGET", b"\x00" * 16, b"GET / HTTP/1.0\r\n"):
        with pytest.raises(ProxyError):
            parse(junk)
