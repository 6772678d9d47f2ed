"""``pymta passwd hash`` and hash interoperability with Dovecot's ``doveadm pw`` both ways."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from pymta.backends.passwd import HASH_SCHEMES, verify_password

DOVEADM = shutil.which("doveadm")


@pytest.fixture
def require_doveadm() -> None:
    """A missing tool must fail the run, not skip it: scripts/test.sh installs it."""
    if DOVEADM is None:
        pytest.fail("doveadm (dovecot-core) is not installed (scripts/test.sh installs it)")


needs_doveadm = pytest.mark.usefixtures("require_doveadm")
PASSWORD = "pässwörd with spaces & $ymbols"


def pymta_hash(password: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pymta", "passwd", "hash", *args],
                          input=password + "\n", capture_output=True, text=True, timeout=60)


def test_cli_prints_a_scheme_hash_from_stdin() -> None:
    result = pymta_hash(PASSWORD)
    assert result.returncode == 0, result.stderr
    line = result.stdout.strip()
    assert line.startswith("{SHA512-CRYPT}$6$") and "\n" not in line
    assert PASSWORD not in result.stdout + result.stderr
    assert verify_password(PASSWORD, line)
    result = pymta_hash(PASSWORD, "--scheme", "ssha512")
    assert result.stdout.startswith("{SSHA512}")


def test_cli_refuses_unknown_scheme_and_empty_password() -> None:
    result = pymta_hash("x", "--scheme", "PBKDF2")
    assert result.returncode == 2 and "PBKDF2" in result.stderr
    assert pymta_hash("").returncode == 2


@needs_doveadm
@pytest.mark.parametrize("scheme", ["SHA512-CRYPT", "SHA256-CRYPT", "BLF-CRYPT", "ARGON2ID",
                                    "SSHA512", "PLAIN-MD5", "CRYPT", "MD5-CRYPT"])
def test_doveadm_hash_verifies_in_pymta(scheme: str) -> None:
    made = subprocess.run([DOVEADM, "pw", "-s", scheme, "-p", PASSWORD], capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()
    assert made.startswith("{" + scheme + "}")
    assert verify_password(PASSWORD, made)
    assert not verify_password(PASSWORD + "!", made)


@needs_doveadm
@pytest.mark.parametrize("scheme", HASH_SCHEMES)
def test_pymta_hash_verifies_with_doveadm(scheme: str) -> None:
    made = pymta_hash(PASSWORD, "--scheme", scheme).stdout.strip()
    ok = subprocess.run([DOVEADM, "pw", "-t", made, "-p", PASSWORD], capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0 and "(verified)" in ok.stdout, (made, ok.stderr)
    bad = subprocess.run([DOVEADM, "pw", "-t", made, "-p", PASSWORD + "!"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode != 0
