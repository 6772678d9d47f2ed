"""Banned files (issue 12): names, declared types, executable content, zip listings,
encrypted and opaque archives, and the bounds, over messages built as a client sends them
(CRLF, base64 attachments), each rule with a case it must catch and one it must let through.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymta.content.banned import (
    CONTENT,
    ENCRYPTED,
    NAME,
    OPAQUE,
    TOO_COMPLEX,
    TYPE,
    BannedFiles,
    BannedItem,
)

CORPUS = Path(__file__).parent.parent / "corpus" / "malformed"
#: A minimal PE file start: "MZ", e_lfanew = 0x80, "PE\0\0" there.
PE = b"MZ" + b"\x90" * 0x3A + struct.pack("<I", 0x80) + b"\0" * 0x40 + b"PE\0\0" + b"\0" * 200
ELF = b"\x7fELF\x02\x01\x01" + b"\0" * 200


def attachment(name: str | None, data: bytes, ctype: str = "application/octet-stream", *,
               disposition: str | None = "auto", cte: str = "base64") -> bytes:
    """One MIME part as a mail client writes it."""
    head = f"Content-Type: {ctype}"
    if name is not None and disposition is None:
        head += f'; name="{name}"'
    head += "\r\n"
    if disposition == "auto" and name is not None:
        head += f'Content-Disposition: attachment; filename="{name}"\r\n'
    elif disposition not in (None, "auto"):
        head += f"Content-Disposition: {disposition}\r\n"
    body = base64.encodebytes(data).replace(b"\n", b"\r\n") if cte == "base64" else data
    return head.encode() + f"Content-Transfer-Encoding: {cte}\r\n\r\n".encode() + body


def message(*parts: bytes, boundary: str = "b1") -> bytes:
    out = (b"From: a@example.org\r\nTo: b@example.com\r\nDate: Sun, 6 Dec 2026 12:00:00 +0000\r\n"
           b"Subject: test\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=\"" + boundary.encode() + b"\"\r\n\r\n"
           b"This is a multi-part message in MIME format.\r\n")
    delimiter = b"--" + boundary.encode() + b"\r\n"
    body = [delimiter + b"Content-Type: text/plain\r\n\r\nHello.\r\n"]
    body += [delimiter + part + b"\r\n" for part in parts]
    return out + b"".join(body) + b"--" + boundary.encode() + b"--\r\n"


def zipped(*members: tuple[str, bytes], encrypted: tuple[str, ...] = ()) -> bytes:
    """A zip archive; the members named in ``encrypted`` get the encryption flag in their
    central directory entry (zipfile cannot encrypt; the flag is what a reader sees)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members:
            z.writestr(name, data)
    raw = bytearray(buf.getvalue())
    at = raw.find(b"PK\x01\x02")
    while at >= 0:
        (size,) = struct.unpack_from("<H", raw, at + 28)
        if raw[at + 46:at + 46 + size].decode() in encrypted:
            raw[at + 8] |= 0x1
        at = raw.find(b"PK\x01\x02", at + 46)
    return bytes(raw)


def scan(raw: bytes, **kwargs: object) -> list[BannedItem]:
    return BannedFiles(**kwargs).inspect(io.BytesIO(raw))   # type: ignore[arg-type]


def kinds(items: list[BannedItem]) -> list[tuple[str, str]]:
    return [(i.kind, i.filename) for i in items]


# -- names ---------------------------------------------------------------------------------


def test_clean_message_has_no_findings() -> None:
    raw = message(attachment("report.pdf", b"%PDF-1.7\n" + b"x" * 5000, "application/pdf"),
                  attachment("photos.zip", zipped(("a.jpg", b"\xff\xd8\xff"), ("notes.txt",
                                                                          b"hi"))),
                  attachment("executive-summary.doc", b"doc"), attachment("exe.txt", b"t"))
    assert scan(raw) == []


@pytest.mark.parametrize("name, reason", [
    ("setup.exe", "extension .exe"),
    ("SETUP.EXE", "extension .exe"),
    ("run.bat", "extension .bat"),
    ("script.js", "extension .js"),
    ("page.hta", "extension .hta"),
    ("install.msi", "extension .msi"),
    ("link.lnk", "extension .lnk"),
    ("tweak.reg", "extension .reg"),
    ("invoice.pdf.exe", "double extension .pdf.exe"),
    ("invoice.doc.scr", "double extension .doc.scr"),
    ("plugin.txt.dll", "double extension .txt.dll"),
    ("x.exe.", "extension .exe"),
    ("x.exe. .", "extension .exe"),
    ("invoice.pdf .exe", "double extension .pdf.exe"),
    ("C:\\Users\\me\\evil.vbs", "extension .vbs"),
    ("folder.{20D04FE0-3AEA-1069-A2D8-08002B30309D}", "Windows class ID extension"),
])
def test_banned_names(name: str, reason: str) -> None:
    items = scan(message(attachment(name, b"data")))
    assert items == [BannedItem("2", name, NAME, reason)]


@pytest.mark.parametrize("name", ["library.dll", "report.pdf", "exe", "notes.exe.txt",
                                  "archive.tar.gz", "picture.jpeg", "noextension"])
def test_allowed_names(name: str) -> None:
    assert scan(message(attachment(name, b"data"))) == []


def test_name_from_content_type_only() -> None:
    raw = message(attachment("setup.exe", b"data", disposition=None))
    assert kinds(scan(raw)) == [(NAME, "setup.exe")]


def test_banned_name_in_either_header_counts() -> None:
    part = (b'Content-Type: application/octet-stream; name="payload.scr"\r\n'
            b'Content-Disposition: attachment; filename="harmless.txt"\r\n\r\nxyz')
    assert kinds(scan(message(part))) == [(NAME, "payload.scr")]


def test_rfc2231_names() -> None:
    encoded = (b"Content-Type: application/octet-stream\r\n"
               b"Content-Disposition: attachment; filename*=UTF-8''%E2%82%AC%20invoice.pdf.exe"
               b"\r\n\r\nxyz")
    continued = (b"Content-Type: application/octet-stream\r\n"
                 b"Content-Disposition: attachment;\r\n filename*0*=UTF-8''Rechnung%20;\r\n"
                 b" filename*1=M%C3%A4rz;\r\n filename*2=.cmd\r\n\r\nxyz")
    items = scan(message(encoded, continued))
    assert items == [BannedItem("2", "\u20ac invoice.pdf.exe", NAME, "double extension .pdf.exe"),
                     BannedItem("3", "Rechnung M%C3%A4rz.cmd", NAME, "extension .cmd")]


def test_rfc2047_name_and_right_to_left_override() -> None:
    word = base64.b64encode(b"Rechnung.exe").decode()
    trick = base64.b64encode("invoice\u202efdp.scr".encode()).decode()  # shows "invoice rcs.pdf"
    raw = message(attachment(f"=?UTF-8?B?{word}?=", b"x"),
                  attachment(f"=?UTF-8?B?{trick}?=", b"x"),
                  attachment("=?unknown-charset?B?" + word + "?=", b"x"))
    assert [(i.part, i.reason) for i in scan(raw)] == [
        ("2", "extension .exe"), ("3", "extension .scr"), ("4", "extension .exe")]


def test_configurable_extensions_and_types() -> None:
    raw = message(attachment("setup.exe", b"x"), attachment("tool.ps1", b"x"),
                  attachment("a.bin", b"x", "application/x-custom-exec"))
    assert kinds(scan(raw)) == [(NAME, "setup.exe")]
    rules = {"allowed_extensions": [".EXE"], "extra_extensions": ["ps1"],
             "extra_types": ["application/x-custom-exec"]}
    assert kinds(scan(raw, **rules)) == [(NAME, "tool.ps1"), (TYPE, "a.bin")]


# -- declared types and content ------------------------------------------------------------


def test_declared_type() -> None:
    raw = message(attachment("file.bin", b"x", "application/x-msdownload"),
                  attachment("doc.pdf", b"%PDF", "application/pdf"))
    assert scan(raw) == [BannedItem("2", "file.bin", TYPE,
                                    "declared type application/x-msdownload")]
    assert scan(message(attachment("f", b"x", "application/x-msdownload")), allowed_types=[
        "application/x-msdownload"]) == []


def test_executable_content_whatever_the_name() -> None:
    raw = message(attachment("holiday.jpg", PE, "image/jpeg"), attachment("data.bin", ELF),
                  attachment("plain.txt", b"MZ is how this text starts\r\n" * 10, "text/plain",
                             cte="7bit"))
    assert [(i.part, i.kind, i.reason) for i in scan(raw)] == [
        ("2", CONTENT, "Windows executable (PE header)"), ("3", CONTENT, "ELF executable")]
    assert scan(raw, ban_executable_content=False) == []


def test_quoted_printable_part_is_decoded() -> None:
    import quopri
    raw = message(attachment("x.dat", quopri.encodestring(ELF).replace(b"\n", b"\r\n"),
                             cte="quoted-printable"))
    assert kinds(scan(raw)) == [(CONTENT, "x.dat")]


def test_single_part_message() -> None:
    raw = (b"From: a@example.org\r\nContent-Type: application/octet-stream; name=\"a.exe\"\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(PE))
    assert [(i.part, i.kind) for i in scan(raw)] == [("1", NAME), ("1", CONTENT)]


# -- archives ------------------------------------------------------------------------------


def test_zip_with_executable_inside() -> None:
    raw = message(attachment("docs.zip", zipped(("readme.txt", b"hi"), ("bin/setup.exe", b"x"),
                                                ("photo.png", PE))))
    assert kinds(scan(raw)) == [(NAME, "docs.zip/bin/setup.exe"), (CONTENT, "docs.zip/photo.png")]


def test_zip_found_by_content_not_by_name() -> None:
    raw = message(attachment("harmless.dat", zipped(("run.js", b"x"))))
    assert kinds(scan(raw)) == [(NAME, "harmless.dat/run.js")]


def test_nested_zip_one_level() -> None:
    inner = zipped(("evil.exe", b"x"))
    deeper = zipped(("inner.zip", zipped(("deepest.exe", b"x"))))
    raw = message(attachment("outer.zip", zipped(("inner.zip", inner))),
                  attachment("third.zip", zipped(("deeper.zip", deeper))))
    assert kinds(scan(raw)) == [(NAME, "outer.zip/inner.zip/evil.exe")]
    assert kinds(scan(raw, ban_opaque_archives=True)) == [
        (NAME, "outer.zip/inner.zip/evil.exe"), (OPAQUE, "third.zip/deeper.zip/inner.zip")]


def test_encrypted_zip_flag() -> None:
    raw = message(attachment("secret.zip", zipped(("a.txt", b"x"), ("b.txt", b"y"),
                                                  encrypted=("a.txt", "b.txt"))))
    assert scan(raw) == [BannedItem("2", "secret.zip/a.txt", ENCRYPTED,
                                    "encrypted archive member")]
    assert scan(raw, ban_encrypted=False) == []


def test_encrypted_zip_made_by_zip(tmp_path: Path) -> None:
    assert shutil.which("zip"), "the zip command is missing: scripts/test.sh installs it"
    (tmp_path / "invoice.pdf").write_bytes(b"%PDF-1.4 not really")
    subprocess.run(["zip", "-q", "-P", "infected", "invoice.zip", "invoice.pdf"], cwd=tmp_path,
                   check=True)
    raw = message(attachment("invoice.zip", (tmp_path / "invoice.zip").read_bytes()))
    assert kinds(scan(raw)) == [(ENCRYPTED, "invoice.zip/invoice.pdf")]


def test_7z_and_rar_are_opaque_when_configured() -> None:
    raw = message(attachment("a.7z", b"7z\xbc\xaf\x27\x1c" + b"\0" * 100),
                  attachment("b.rar", b"Rar!\x1a\x07\x01\x00" + b"\0" * 100))
    assert scan(raw) == []
    assert [(i.kind, i.reason) for i in scan(raw, ban_opaque_archives=True)] == [
        (OPAQUE, "7z archive, not looked into"), (OPAQUE, "rar archive, not looked into")]


def test_corrupt_zip_is_no_error() -> None:
    broken = zipped(("setup.exe", b"x"))[:-30]       # central directory cut off
    assert scan(message(attachment("a.zip", broken))) == []


# -- bounds --------------------------------------------------------------------------------


def test_too_many_parts_finishes_quickly() -> None:
    raw = message(*[b"Content-Type: text/plain\r\n\r\nx"] * 100_000)
    start = time.perf_counter()
    items = scan(raw)
    assert time.perf_counter() - start < 2.0
    assert items == [BannedItem("", "", TOO_COMPLEX, "more than 1000 MIME parts")]


def test_deep_nesting_finishes_quickly_and_still_reports() -> None:
    levels = 10_000
    head = b"".join(f"--n{i}\r\nContent-Type: multipart/mixed; boundary=\"n{i + 1}\"\r\n\r\n"
                    .encode() for i in range(levels))
    raw = (b"From: a@example.org\r\nContent-Type: multipart/mixed; boundary=\"n0\"\r\n\r\n" + head
           + b"--n" + str(levels).encode() + b"\r\n" + attachment("deep.exe", b"x") + b"\r\n")
    start = time.perf_counter()
    items = scan(raw)
    assert time.perf_counter() - start < 2.0
    assert [i.kind for i in items] == [TOO_COMPLEX]
    assert items[0].reason == "MIME nesting deeper than 20"


def test_deep_message_rfc822_nesting() -> None:
    raw = b"Content-Type: message/rfc822\r\n\r\n" * 10_000 + attachment("a.exe", b"x")
    start = time.perf_counter()
    items = scan(raw)
    assert time.perf_counter() - start < 2.0
    assert [i.kind for i in items] == [TOO_COMPLEX]


def test_parts_cap_and_archive_caps() -> None:
    raw = message(*[attachment(f"f{i}.exe", b"x") for i in range(5)])
    items = scan(raw, max_parts=4)
    assert [i.kind for i in items] == [NAME, NAME, TOO_COMPLEX]    # parts 2, 3; the rest
    many = zipped(*[(f"f{i}.txt", b"x") for i in range(20)], ("z.exe", b"x"))
    assert kinds(scan(message(attachment("m.zip", many)), max_archive_entries=10)) == [
        (TOO_COMPLEX, "")]
    big = zipped(("a.exe", b"\0" * 100_000))
    assert kinds(scan(message(attachment("b.zip", big)))) == [(NAME, "b.zip/a.exe")]
    items = scan(message(attachment("b.bin", big)), max_archive_bytes=100)
    assert [(i.part, i.kind) for i in items] == [("2", TOO_COMPLEX)]
    assert scan(raw, max_bytes=200)[-1].reason == "more than 200 bytes"


def test_zip_bomb_member_is_bounded() -> None:
    bomb = zipped(("inner.zip", b"PK\x03\x04" + b"\0" * 50_000_000))  # 50 MB, deflates to ~50 KB
    start = time.perf_counter()
    items = scan(message(attachment("bomb.zip", bomb)), max_archive_bytes=1_000_000)
    assert time.perf_counter() - start < 2.0
    assert [i.kind for i in items] == [TOO_COMPLEX]


def test_path_source(tmp_path: Path) -> None:
    spool = tmp_path / "msg"
    spool.write_bytes(message(attachment("a.pif", b"x")))
    assert kinds(BannedFiles().inspect(spool)) == [(NAME, "a.pif")]
    assert kinds(BannedFiles().inspect(str(spool))) == [(NAME, "a.pif")]


# -- totality ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.eml")), ids=lambda p: p.name)
def test_malformed_corpus(path: Path) -> None:
    raw = path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert all(isinstance(i, BannedItem) for i in scan(raw))


def test_lying_multipart_still_finds_the_attachment() -> None:
    # the inner multipart repeats the outer boundary and nothing is closed
    raw = (b"Content-Type: multipart/mixed; boundary=\"X\"\r\n\r\n--X\r\n"
           b"Content-Type: multipart/alternative; boundary=\"X\"\r\n\r\n--X\r\n"
           b"Content-Type: text/plain\r\n\r\nhi\r\n--X\r\n" + attachment("a.exe", b"x"))
    assert kinds(scan(raw)) == [(NAME, "a.exe")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.sampled_from([b"", b"\r\n", b"--b1\r\n", b"--b1--\r\n"]))
def test_never_raises(noise: bytes, tail: bytes) -> None:
    raw = message(attachment("a.zip", zipped(("x.txt", b"x"))))[:400] + noise + tail
    for item in scan(raw) + scan(noise + tail):
        assert isinstance(item, BannedItem)


@pytest.mark.parametrize("shift", range(0, 8))
def test_delimiters_across_read_blocks(shift: int) -> None:
    # the reader takes 256 KiB blocks: put a delimiter (and its "\n--") on each side of a
    # block edge; a large zip in base64 is decoded in blocks, its member still listed
    size = 256 * 1024 - 365 - shift                 # "\n--b1" from 2 after to 5 before the edge
    filler = ((b"y" * 98 + b"\r\n") * 3000)[:size]   # lines: the skip, not a line read, meets it
    big_zip = zipped(("noise.bin", os.urandom(400_000)), ("late.exe", b"x"))
    raw = message(attachment("a.txt", filler, "text/plain", cte="7bit"),
                  attachment("b.com", b"x"), attachment("c.zip", big_zip))
    assert kinds(scan(raw)) == [(NAME, "b.com"), (NAME, "c.zip/late.exe")]


def test_empty_and_unterminated_messages() -> None:
    assert scan(b"") == []
    assert scan(b"\r\n") == []
    assert kinds(scan(b'Content-Type: application/x-msdownload; name="a.bin"')) == [(TYPE, "a.bin")]
