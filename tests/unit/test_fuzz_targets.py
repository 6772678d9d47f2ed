"""The fuzz targets (``fuzz/``) on their seed corpus, without atheris: a target that no longer
imports, or whose contract no longer holds on its seeds, fails here and not hours into a
fuzz run. Also the crash bookkeeping the runner relies on (signatures, reproducer files,
minimising)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz import crashes
from fuzz.harness import Input, Violation, check_address, check_reply_bytes, spool_form
from fuzz.runner import CORPUS
from fuzz.targets import TARGETS, entry

SEEDS = sorted(p for name in TARGETS for p in (CORPUS / name).iterdir() if p.is_file())


def test_every_target_has_seeds():
    for name in TARGETS:
        assert any((CORPUS / name).iterdir()), f"no seed corpus for {name}"
    assert sorted(p.name for p in CORPUS.iterdir()) == sorted(TARGETS)


@pytest.mark.parametrize("path", SEEDS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_target_holds_on_seed(path: Path):
    entry(path.parent.name)(path.read_bytes())


@pytest.mark.parametrize("name", list(TARGETS))
def test_target_survives_odd_inputs(name: str):
    fn = entry(name)
    for data in (b"", b"\x00", b"\xff" * 64, bytes(range(256)), b"\r\n" * 50):
        fn(data)


def test_reply_checker_rejects_what_the_engine_must_never_send():
    assert check_reply_bytes(b"250-a\r\n250 b\r\n") == [(250, False), (250, True)]
    for bad in (b"250 ok", b"250 a\nb\r\n", b"2500ok\r\n", b"250-a\r\n251 b\r\n",
                b"250-a\r\n", b"250 " + b"x" * 600 + b"\r\n", b"250 \xff\r\n"):
        with pytest.raises(Violation):
            check_reply_bytes(bad)


def test_address_checker_rejects_unsafe_addresses():
    check_address("user@example.com", utf8=False, what="t")
    check_address("r\u00e9@example.com", utf8=True, what="t")
    for bad, utf8 in (("\udcff@x.test", True), ("a\u2028b@x.test", True),
                      ("a\x85b@x.test", True), ("r\u00e9@x.test", False), ("a" * 65 + "@x", False)):
        with pytest.raises(Violation):
            check_address(bad, utf8=utf8, what="t")


def test_input_reads_defaults_past_the_end():
    inp = Input(b"\x03abcdef")
    assert inp.chunk() == b"abc" and inp.rest() == b"def"
    assert inp.byte() == 0 and inp.chunk() == b"" and inp.text() == ""
    assert spool_form(b"a\rb\nc\r\nd") == b"a\r\nb\r\nc\r\nd"


def _fails_on_x(data: bytes) -> None:
    if b"x" in data:
        raise ValueError("x")


def test_guard_records_each_signature_once_and_keeps_the_shortest(tmp_path, capsys):
    guarded = crashes.guard("demo", _fails_on_x, tmp_path)
    guarded(b"aaaxbbb")
    guarded(b"xb")
    guarded(b"clean")
    files = sorted((tmp_path / "demo").iterdir())
    assert [p.suffix for p in files] == [".bin", ".txt"]
    assert files[0].read_bytes() == b"xb"
    assert "ValueError" in files[1].read_text()
    assert capsys.readouterr().out.count("new finding") == 1


def test_minimize_keeps_the_signature():
    assert crashes.minimize("demo", _fails_on_x, b"hello x world") == b"x"
    with pytest.raises(ValueError):
        crashes.minimize("demo", _fails_on_x, b"clean")
