"""The PROXY protocol header (HAProxy's ``send-proxy`` v1 and ``send-proxy-v2``), sans-I/O.

A load balancer in front of the SMTP listener opens its own connection to us, so the peer
address asyncio reports is the balancer's. The balancer tells us the real client in a header
sent before anything else; :func:`parse` reads it from the bytes received so far:
``None`` means "not complete yet, read more", a :class:`ProxyHeader` says who the client is
and how many bytes the header took, :class:`ProxyError` means "not a valid header: close".

Bounded by design (the peer is trusted, yet a bug or a misrouted client must not cost us
memory): a v1 line is at most 107 bytes with its CRLF, a v2 header at most 536 bytes in all
(the receive size the specification asks receivers to accept); a longer one is an error as
soon as that much has arrived, never a reason to buffer more.

``LOCAL`` (v2: the balancer's own health check) and ``UNKNOWN`` (v1) or an unspecified or
unix address family (v2) carry no client address: :attr:`ProxyHeader.local` is then True and
the connection's own address is kept, as the specification says.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

V1_PREFIX = b"PROXY "
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX = 536
_V2_FIXED = 16


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header (the connection is to be closed)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """One parsed header. ``length``: bytes it took (what follows is the client's)."""

    version: int
    length: int
    local: bool = False      # no client address: keep the connection's own
    src_ip: str = ""
    src_port: int = 0
    dst_ip: str = ""
    dst_port: int = 0


def parse(buf: bytes) -> ProxyHeader | None:
    """The header at the start of ``buf``; None when more bytes are needed."""
    if not buf:
        return None
    head = bytes(buf[:_V2_FIXED])
    if V2_SIGNATURE.startswith(head[:12]) and head[:1] == b"\r":
        return _parse_v2(bytes(buf)) if len(head) >= 12 else None
    if V1_PREFIX.startswith(head[:6]):
        return _parse_v1(bytes(buf[:V1_MAX]))
    raise ProxyError("not a PROXY protocol header")


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    end = buf.find(b"\r\n")
    if end < 0:
        if b"\n" in buf or b"\r" in buf[:-1]:
            raise ProxyError("v1: line not ended by CRLF")
        if len(buf) >= V1_MAX:
            raise ProxyError(f"v1: no CRLF within {V1_MAX} bytes")
        return None
    try:
        line = buf[:end].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyError("v1: not ASCII") from None
    parts = line.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyError("v1: malformed line")
    proto = parts[1]
    if proto == "UNKNOWN":
        return ProxyHeader(1, end + 2, local=True)
    if proto not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyError(f"v1: malformed line {line[:60]!r}")
    version = 4 if proto == "TCP4" else 6
    src, dst = _v1_address(parts[2], version), _v1_address(parts[3], version)
    return ProxyHeader(1, end + 2, src_ip=src, src_port=_v1_port(parts[4]),
                       dst_ip=dst, dst_port=_v1_port(parts[5]))


def _v1_address(text: str, version: int) -> str:
    """A literal address of the announced family, no scope id, no leading zeros."""
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyError(f"v1: not an address: {text[:45]!r}") from None
    if addr.version != version or "%" in text:
        raise ProxyError(f"v1: not a TCP{version} address: {text[:45]!r}")
    return str(addr)


def _v1_port(text: str) -> int:
    if not (text.isdigit() and len(text) <= 5) or (len(text) > 1 and text[0] == "0"):
        raise ProxyError(f"v1: not a port: {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"v1: not a port: {text!r}")
    return port


def _parse_v2(buf: bytes) -> ProxyHeader | None:
    if len(buf) < _V2_FIXED:
        return None
    if buf[:12] != V2_SIGNATURE:
        raise ProxyError("v2: bad signature")
    ver_cmd, fam = buf[12], buf[13]
    (size,) = struct.unpack(">H", buf[14:16])
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2: unsupported version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command > 1:
        raise ProxyError(f"v2: unknown command {command}")
    total = _V2_FIXED + size
    if total > V2_MAX:
        raise ProxyError(f"v2: header of {total} bytes (at most {V2_MAX})")
    if len(buf) < total:
        return None
    if command == 0:                                   # LOCAL: the balancer's own connection
        return ProxyHeader(2, total, local=True)
    family, transport = fam >> 4, fam & 0x0F
    if family > 3 or transport > 2:
        raise ProxyError(f"v2: unknown address family/protocol 0x{fam:02x}")
    if family in (0, 3):                               # UNSPEC, UNIX: no client address
        return ProxyHeader(2, total, local=True)
    if transport != 1:
        raise ProxyError("v2: not a stream connection")
    body = buf[_V2_FIXED:total]
    width = 4 if family == 1 else 16
    if len(body) < 2 * width + 4:
        raise ProxyError("v2: address block too short")
    src = ipaddress.ip_address(body[:width])
    dst = ipaddress.ip_address(body[width:2 * width])
    sport, dport = struct.unpack(">HH", body[2 * width:2 * width + 4])
    return ProxyHeader(2, total, src_ip=str(src), src_port=sport, dst_ip=str(dst),
                       dst_port=dport)
