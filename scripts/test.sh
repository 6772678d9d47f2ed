#!/usr/bin/env bash
# The project's one test command: ./scripts/test.sh [--fuzz-seconds N] [pytest args...]
#
# Works on a fresh Debian 12 machine (root, python3 3.11, network only to apt and PyPI) and is
# cheap on a second run: every step first checks whether it is already done.
#   1. Debian packages the tests drive (swaks, openssl, postfix for smtp-source/smtp-sink);
#      apt is not touched at all when they are installed already.
#   2. .venv with the package in editable mode plus test extras (re-installed only when
#      pyproject.toml changed since the last install).
#   3. ruff check ., then the import contracts of pyproject.toml (scripts/lint_imports.py:
#      Import Linter over the installed layout, where pymta.backends/delivery exist), then
#      mypy over the same layout (scripts/typecheck.py; its errors name the checkout's files).
#      Each fails the command. The same three run as pre-commit hooks
#      (.pre-commit-config.yaml; `pre-commit install` once to have them on every commit).
#   4. pytest; "no tests collected" (5) is a failure, not a pass.
#   5. fuzzing: every fuzz/ target for N seconds (--fuzz-seconds N, else $PYMTA_FUZZ_SECONDS,
#      else 5: under a minute for all targets); 0 skips it. A finding fails the command and
#      its reproducer is printed; the seed is fixed (PYMTA_FUZZ_SEED, default 1) so a run is
#      repeatable. N is exported as PYMTA_FUZZ_SECONDS to pytest too, for
#      the property and torture tests that scale with it. Hours: see fuzz/README.md.
# The exit status is pytest's, or 1 when pytest passed and fuzzing found something.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

FUZZ_SECONDS="${PYMTA_FUZZ_SECONDS:-5}"
PYTEST_ARGS=()
while (($#)); do
    case "$1" in
        --fuzz-seconds) FUZZ_SECONDS="${2:?--fuzz-seconds needs a number}"; shift 2 ;;
        --fuzz-seconds=*) FUZZ_SECONDS="${1#*=}"; shift ;;
        *) PYTEST_ARGS+=("$1"); shift ;;
    esac
done
if [[ ! "$FUZZ_SECONDS" =~ ^[0-9]+$ ]]; then
    echo "--fuzz-seconds / PYMTA_FUZZ_SECONDS must be a whole number of seconds" >&2
    exit 2
fi
export PYMTA_FUZZ_SECONDS="$FUZZ_SECONDS"

step() { printf '\n==> %s\n' "$*"; }

# --- 1. Debian packages ---------------------------------------------------------------------
# libnet-ssleay-perl: swaks needs it for STARTTLS / TLS-on-connect (only Recommends in Debian,
# and we install without recommends to keep the install small and predictable).
# slapd ... dovecot-lmtpd: real services the integration tests start themselves (tests/services;
# never the packaged instances, which the policy-rc.d below keeps from starting). opendkim: the
# independent DKIM verifier of what pymta signs (its test mode, `opendkim -t`). postfix also
# serves as a throwaway peer / smart host there (its SASL is Dovecot's: no Cyrus packages).
APT_PACKAGES=(swaks libnet-ssleay-perl openssl postfix
              slapd ldap-utils mariadb-server mariadb-client dovecot-core dovecot-imapd dovecot-lmtpd
              opendkim)
# clamav-daemon: clamd for the content-filter tests (a custom EICAR .ndb, no freshclam run).
APT_PACKAGES+=(clamav-daemon)
# spamd spamc rspamd: the spam scanners of the content-filter tests (SpamAssassin with its
# shipped rules and --local, no sa-update; rspamd without redis). No debconf questions.
APT_PACKAGES+=(spamd spamc rspamd)
# zip: a real password-protected archive (zip -P) for the banned-files tests.
APT_PACKAGES+=(zip)
# redis-server: rspamd's Bayes store in the learning tests (its own throwaway instance).
APT_PACKAGES+=(redis-server)
# haproxy: a real load balancer sending the PROXY protocol header (v1, v2) to pymta.
APT_PACKAGES+=(haproxy)
# dovecot-pop3d dovecot-ldap: the demo's Dovecot (demo/dovecot) serving over IMAP and POP3 what
# pymta delivered, with its passwords in LDAP (tests/integration/test_dovecot_demo.py).
APT_PACKAGES+=(dovecot-pop3d dovecot-ldap)
# pflogsumm fail2ban: the real log readers that must parse pymta's Postfix-style log unchanged
# (tests/integration/test_postfix_logs.py runs pflogsumm and fail2ban-regex on it).
APT_PACKAGES+=(pflogsumm fail2ban)
# Debian's python3 ships without ensurepip; `python3 -m venv` then fails until python3-venv is in.
if [[ ! -x .venv/bin/python ]] && ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    APT_PACKAGES+=(python3-venv)
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    if ! dpkg -s "$pkg" 2>/dev/null | grep -q '^Status: install ok installed'; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    step "apt: installing ${missing[*]}"
    SUDO=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
        SUDO=(sudo)
    fi
    # Never let package installation start daemons (postfix would grab port 25).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee /usr/sbin/policy-rc.d >/dev/null
        "${SUDO[@]}" chmod 755 /usr/sbin/policy-rc.d
    fi
    # Postfix: "No configuration" leaves the packaged instance unconfigured (tests run their own
    # with `postfix -c DIR`). slapd: no_configuration = no database, no questions (tests run
    # their own with `slapd -f`). clamav-freshclam (a dependency of clamav-daemon): manual = no
    # update daemon (tests run their own clamd on a test signature, never freshclam).
    printf '%s\n' \
        "postfix postfix/main_mailer_type select No configuration" \
        "slapd slapd/no_configuration boolean true" \
        "clamav-freshclam clamav-freshclam/autoupdate_freshclam select manual" \
        | "${SUDO[@]}" debconf-set-selections
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
else
    step "apt: all of ${APT_PACKAGES[*]} already installed"
fi

# --- 2. virtualenv ----------------------------------------------------------------------------
if [[ ! -x .venv/bin/python ]]; then
    step "venv: creating .venv"
    python3 -m venv .venv
fi

# The stamp holds the hash of pyproject.toml at the last successful install, so a second run
# skips pip (several seconds) unless dependencies may have changed.
STAMP=.venv/.pymta-test-deps
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [[ "$(cat "$STAMP" 2>/dev/null || true)" != "$want" ]]; then
    step "pip: installing -e '.[test]'"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'
    echo "$want" >"$STAMP"
else
    step "pip: dependencies up to date"
fi

# --- 3. lint ----------------------------------------------------------------------------------
step "ruff check ."
.venv/bin/ruff check .
step "import contracts (scripts/lint_imports.py)"
.venv/bin/python scripts/lint_imports.py
step "types (scripts/typecheck.py: mypy on pymta, pymta.backends, pymta.delivery)"
.venv/bin/python scripts/typecheck.py

# --- 4. tests ---------------------------------------------------------------------------------
step "pytest -q ${PYTEST_ARGS[*]}"
rc=0
.venv/bin/python -m pytest -q ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"} || rc=$?
if ((rc == 5)); then
    echo "ERROR: pytest collected no tests (exit 5); that is a failure here." >&2
elif ((rc != 0)); then
    echo "ERROR: pytest failed with exit status $rc" >&2
fi

# --- 5. fuzzing -------------------------------------------------------------------------------
# atheris ships wheels for x86_64 Linux only (pyproject's marker); elsewhere the targets still
# run on their seed corpus, without coverage guidance.
if ((FUZZ_SECONDS == 0)); then
    step "fuzz: skipped (--fuzz-seconds 0)"
elif .venv/bin/python -c 'import atheris' >/dev/null 2>&1; then
    # A fixed seed (PYMTA_FUZZ_SEED, default 1; 0 = a new one each run) makes the short run
    # repeatable: what it finds on a CI machine it finds here too. Hours: fuzz/README.md.
    FUZZ_SEED="${PYMTA_FUZZ_SEED:-1}"
    step "fuzz: every target ${FUZZ_SECONDS}s (python -m fuzz all --seconds $FUZZ_SECONDS --seed $FUZZ_SEED)"
    frc=0
    .venv/bin/python -m fuzz all --seconds "$FUZZ_SECONDS" --seed "$FUZZ_SEED" \
        --log-dir fuzz/logs/test || frc=$?
    if ((frc != 0)); then
        echo "ERROR: fuzzing found something (reproducers above, logs in fuzz/logs/test)" >&2
        ((rc != 0)) || rc=1
    fi
else
    step "fuzz: atheris is not available here; targets on their seed corpus only"
    .venv/bin/python -m fuzz check || { ((rc != 0)) || rc=1; }
fi
exit "$rc"
