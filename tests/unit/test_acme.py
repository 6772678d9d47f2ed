"""Traefik's acme.json (``ACME_FILE``): both layouts, several resolvers, the choice of the
certificate for the host name, hostile content as one ConfigError naming ACME_FILE, and the
extraction into the state directory that runs ``ACME_POSTHOOK`` once per change."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from pymta.acme import AcmeFile, parse_acme, select_pairs
from pymta.config.errors import ConfigError
from tests.tlsca import TestCA, acme_json, leaf_subject

HOST = "mx.example.com"


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def certs(ca: TestCA) -> dict[str, tuple[bytes, bytes]]:
    """Leaves made once for the module (RSA keys are the slow part)."""
    return {
        "host": ca.issue((HOST,)),
        "host-ec": ca.issue((HOST,), "ec"),
        "wild": ca.issue(("*.example.com", "example.com"), "ec"),
        "domain": ca.issue(("example.com", "www.example.com"), "ec"),
        "other": ca.issue(("web.other.org",), "ec"),
        "expired": ca.issue((HOST,), "ec", expired=True),
    }


def choose(data: bytes, host: str = HOST) -> list[Any]:
    return select_pairs(parse_acme(data, "acme.json"), host, "acme.json")


def test_v2_several_resolvers(certs: dict[str, tuple[bytes, bytes]]) -> None:
    data = acme_json([("le-staging", ("web.other.org",), *certs["other"]),
                      ("le", (HOST, "smtp.example.com"), *certs["host"])])
    entries = parse_acme(data, "acme.json")
    assert [(e.resolver, e.main) for e in entries] == [("le-staging", "web.other.org"),
                                                       ("le", HOST)]
    assert entries[1].sans == ("smtp.example.com",)
    pairs = choose(data)
    assert [(p.kind, leaf_subject(p.cert_pem)) for p in pairs] == [("RSA", HOST)]
    assert pairs[0].chain_length == 2          # the intermediate travels with the leaf
    assert "ACME_FILE acme.json (resolver 'le' certificate 0" in pairs[0].source


def test_v1_layout(certs: dict[str, tuple[bytes, bytes]]) -> None:
    data = acme_json([("", ("web.other.org",), *certs["other"]),
                      ("", (HOST,), *certs["host-ec"])], v1=True)
    assert [e.resolver for e in parse_acme(data, "acme.json")] == ["", ""]
    assert [(p.kind, leaf_subject(p.cert_pem)) for p in choose(data)] == [("ECDSA", HOST)]


def test_best_match_per_key_type(certs: dict[str, tuple[bytes, bytes]]) -> None:
    """Host name beats wildcard beats parent domain; RSA and ECDSA are both kept."""
    data = acme_json([("a", ("example.com", "www.example.com"), *certs["domain"]),
                      ("a", ("*.example.com", "example.com"), *certs["wild"]),
                      ("b", (HOST,), *certs["host"])])
    pairs = choose(data)
    assert [(p.kind, leaf_subject(p.cert_pem)) for p in pairs] == [
        ("RSA", HOST), ("ECDSA", "*.example.com")]
    # without the wildcard, the parent domain's certificate serves the host
    data = acme_json([("a", ("example.com", "www.example.com"), *certs["domain"])])
    assert [leaf_subject(p.cert_pem) for p in choose(data)] == ["example.com"]
    # a name for another host of the domain is no match
    data = acme_json([("a", ("www.example.com",), *certs["domain"])])
    assert choose(data) == []


def test_broken_candidate_skipped_while_another_serves(
        certs: dict[str, tuple[bytes, bytes]], caplog: pytest.LogCaptureFixture) -> None:
    data = acme_json([("a", (HOST,), *certs["expired"]), ("b", (HOST,), *certs["host-ec"])])
    with caplog.at_level(logging.WARNING, logger="pymta"):
        pairs = choose(data)
    assert [p.fingerprint for p in pairs] != []
    assert leaf_subject(pairs[0].cert_pem) == HOST
    assert "expired" in caplog.text and "(skipped)" in caplog.text
    # alone, the expired one is an error
    with pytest.raises(ConfigError, match=r"^ACME_FILE: the certificate expired on"):
        choose(acme_json([("a", (HOST,), *certs["expired"])]))


def _doc(cert: Any = "", key: Any = "", domain: Any = None) -> bytes:
    entry = {"domain": {"main": HOST, "sans": []} if domain is None else domain,
             "certificate": cert, "key": key}
    return json.dumps({"le": {"Certificates": [entry]}}).encode()


@pytest.mark.parametrize(("data", "message"), [
    (b"{not json", "not JSON"),
    (b"[" * 100_000, "not JSON (nested too deeply)"),    # review: was a RecursionError
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'{"le": 3}', "resolver 'le' is not an object"),
    (b'{"le": {"Certificates": {"a": 1}}}', '"Certificates" of resolver \'le\' is not a list'),
    (b'{"Certificates": "x"}', '"Certificates" of the file is not a list'),
    (b'{"le": {"Certificates": [7]}}', "resolver 'le' certificate 0 is not an object"),
    (_doc(domain="mx"), '"domain" is not an object'),
    (_doc(domain={"main": 5}), '"main" is not a string'),
    (_doc(domain={"main": HOST, "sans": [1]}), '"sans" is not a list of names'),
    (_doc(cert=5), '"certificate" is not a string'),
    (_doc(cert="x", key=None), '"key" is not a string'),
])
def test_hostile_structure(data: bytes, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        choose(data)
    assert str(info.value).startswith("ACME_FILE: "), info.value
    assert message in str(info.value)
    assert "acme.json" in str(info.value)


def test_hostile_content(certs: dict[str, tuple[bytes, bytes]]) -> None:
    cert, key = certs["host"]
    other_key = certs["host-ec"][1]
    b64 = lambda data: base64.b64encode(data).decode()  # noqa: E731
    cases = [
        (_doc("!!!not base64", b64(key)), "the certificate is not base64"),
        (_doc(b64(cert), "abc"), "the key is not base64"),
        (_doc(b64(b"hello"), b64(key)), "not a PEM certificate"),
        (_doc(b64(cert), b64(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")),
         "not a PEM private key"),
        (_doc(b64(cert), b64(other_key)), "key does not match the certificate"),
    ]
    for data, message in cases:
        with pytest.raises(ConfigError) as info:
            choose(data)
        text = str(info.value)
        assert text.startswith("ACME_FILE: ") and message in text, text
        assert "resolver 'le' certificate 0" in text


def test_store_once_and_posthook_once(tmp_path: Path, certs: dict[str, tuple[bytes, bytes]],
                                      caplog: pytest.LogCaptureFixture) -> None:
    """Two processes' views of one state directory: the first to see a change writes the
    files and runs the hook; the other finds them written and runs nothing."""
    acme = tmp_path / "acme.json"
    runs = tmp_path / "runs"
    hook = f"echo ran >> {runs}"
    acme.write_bytes(acme_json([("le", (HOST,), *certs["host"]),
                                ("ec", (HOST,), *certs["host-ec"])]))
    first = AcmeFile(str(acme), HOST, str(tmp_path / "state"), hook)
    second = AcmeFile(str(acme), HOST, str(tmp_path / "state"), hook)
    pairs = first.load()
    assert first.store(pairs) is True
    assert second.store(second.load()) is False
    assert runs.read_text() == "ran\n"
    tls_dir = tmp_path / "state" / "tls"
    assert (tls_dir / "acme.crt").read_bytes() == certs["host"][0]
    assert leaf_subject((tls_dir / "acme-ecdsa.crt").read_bytes()) == HOST
    assert oct((tls_dir / "acme.key").stat().st_mode & 0o777) == "0o600"

    acme.write_bytes(acme_json([("le", (HOST,), *certs["wild"])], v1=True))
    assert second.store(second.load()) is True
    assert first.store(first.load()) is False
    assert runs.read_text() == "ran\nran\n"

    failing = AcmeFile(str(acme), HOST, str(tmp_path / "state2"), "echo oops >&2; exit 3")
    with caplog.at_level(logging.ERROR, logger="pymta"):
        assert failing.store(failing.load()) is True   # the hook's failure is not raised
    assert "ACME_POSTHOOK exited with status 3: oops" in caplog.text


def test_absent_file_is_not_used(tmp_path: Path) -> None:
    acme = AcmeFile(str(tmp_path / "none.json"), HOST, str(tmp_path), "exit 1")
    assert acme.load() == [] and acme.stat_key() is None and not acme.exists()


def test_review_the_posthook_runs_with_sighup_at_its_default(
        tmp_path: Path, certs: dict[str, tuple[bytes, bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 13 review: the hook inherited the ignored SIGHUP of a starting server (an
    ignored signal stays ignored across exec, so a daemon it starts could never be reloaded)
    and the metrics' PROMETHEUS_MULTIPROC_DIR."""
    import signal

    acme = tmp_path / "acme.json"
    seen = tmp_path / "seen"
    acme.write_bytes(acme_json([("le", (HOST,), *certs["host"])]))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        hook = (f"grep SigIgn /proc/self/status > {seen}; "
                f"echo \"dir=${{PROMETHEUS_MULTIPROC_DIR:-unset}}\" >> {seen}")
        store = AcmeFile(str(acme), HOST, str(tmp_path / "state"), hook)
        assert store.store(store.load()) is True
    finally:
        signal.signal(signal.SIGHUP, previous)
    ignored_mask = int(seen.read_text().split()[1], 16)
    assert not ignored_mask & (1 << (signal.SIGHUP - 1)), "SIGHUP ignored in the hook"
    assert "dir=unset" in seen.read_text()
