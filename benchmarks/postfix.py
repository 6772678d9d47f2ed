"""A throwaway Postfix for side-by-side runs: same recipient, same maildir layout as pymta.

Postfix is the comparison the project measures itself against (its baseline: Postfix 3.7 from
Debian, virtual maildir delivery, about 1,000 messages/s accepted and delivered on a 2-core
machine under 20 sessions of 4 KiB messages). Each instance lives in its own temporary
directory with its own ``main.cf``/``master.cf`` (``postfix -c DIR``), listens on a loopback
port of its own, and delivers ``box@example.com`` with the ``virtual`` agent into
``DIR/mail/box/`` (a maildir), so "delivered" means the same thing for both servers: a file in
``box/new``. Nothing of the default instance (``/etc/postfix``) is used or touched.

The master runs in the foreground (``master -c DIR -d``) as a child in its own process group,
which is what ``postfix -c DIR start`` starts after its checks; ``postfix -c DIR check`` runs
those checks first (and creates the queue directories). Running it as our child means that
stopping it is a ``SIGTERM`` to one process group, and a crashed benchmark cannot leave a
daemonised Postfix behind.

Configuration choices, all stated in the results: Postfix defaults everywhere (queue files are
fsynced, ``in_flow_delay`` on), except that the per-client connection count and rate limits are
off (every benchmark client is 127.0.0.1) and ``default_process_limit`` is 200 so that the
100-session point of the concurrency sweep is not capped at Postfix's default 100 smtpd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks.scenarios import BenchmarkError, ServerProcess

POSTFIX = Path("/usr/sbin/postfix")
POSTCONF = Path("/usr/sbin/postconf")
MASTER_CF_DIST = Path("/usr/share/postfix/master.cf.dist")
MAIL_UID = 5000
PRESEED = "postfix postfix/main_mailer_type select No configuration\n"

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {T}/spool
data_directory = {T}/data
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = {T}/postfix.log
maillog_file_prefixes = {T}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix-bench.test
mydomain = postfix-bench.test
myorigin = $myhostname
mydestination =
mynetworks = 127.0.0.0/8
smtpd_banner = $myhostname ESMTP
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 200
message_size_limit = {size_limit}
biff = no
"""

# Local delivery: the recipient is a virtual mailbox (maildir) of example.com.
VIRTUAL_CF = """\
virtual_mailbox_domains = example.com
virtual_mailbox_base = {T}/mail
virtual_mailbox_maps = inline:{{ {recipient}=box/ }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{uid}
"""

# Relaying (the relay-through scenarios): no domain is local (mydestination is empty and
# there are no virtual domains), the clients are in mynetworks, so every recipient goes to
# the smart host with the smtp client; no TLS (the sink offers none; said explicitly, as
# pymta's side says SMTP_TLS_SECURITY_LEVEL=none); local delivery refused, should anything
# reach it. Everything else (queue fsync, in_flow_delay, the connection cache on demand,
# destination concurrency 20 after a slow start at 5) stays at Postfix's defaults.
RELAY_CF = """\
relayhost = {relayhost}
default_transport = smtp
local_transport = error:local mail delivery is disabled
smtp_tls_security_level = none
"""


def postfix_installed() -> bool:
    """Postfix, its master and the master.cf template are all there."""
    return POSTFIX.exists() and POSTCONF.exists() and MASTER_CF_DIST.exists()


def ensure_postfix(install: bool = True) -> bool:
    """True when Postfix can be used; install it from apt (no default configuration) if asked.

    The preseed makes the Debian package install without configuring or starting a mail
    system of its own; the benchmark's instance is the only Postfix that runs.
    """
    if postfix_installed():
        return True
    if not install:
        return False
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        print("warning: postfix is not installed and cannot be installed here (needs root and "
              "apt-get); running pymta only", file=sys.stderr)
        return False
    print("postfix not installed: apt-get install postfix (preseeded: no configuration)",
          file=sys.stderr)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["debconf-set-selections"], input=PRESEED.encode(), check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], check=True, env=env,
                       stdout=sys.stderr)
    except (OSError, subprocess.CalledProcessError) as exc:
        # Package lists may be missing on a fresh container: one update, one more try.
        try:
            subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=sys.stderr)
            subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], check=True, env=env,
                           stdout=sys.stderr)
        except (OSError, subprocess.CalledProcessError):
            print(f"warning: installing postfix failed ({exc}); running pymta only",
                  file=sys.stderr)
            return False
    return postfix_installed()


def postfix_version() -> str:
    """``mail_version`` of the installed Postfix, or "" if it cannot be asked."""
    try:
        out = subprocess.run([str(POSTCONF), "-d", "-h", "mail_version"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip()


def _daemon_directory() -> Path:
    out = subprocess.run([str(POSTCONF), "-d", "-h", "daemon_directory"], capture_output=True,
                         text=True, timeout=10)
    return Path(out.stdout.strip() or "/usr/lib/postfix/sbin")


def _run_checked(argv: list[str], what: str) -> None:
    """Run a postfix command; on failure rerun it under ``script`` to see why.

    ``postfix`` writes its fatal errors only to a terminal (performance-baseline.md), so a plain
    subprocess sees a silent exit 1.
    """
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return
    detail = proc.stdout + proc.stderr
    if shutil.which("script"):
        tty = subprocess.run(["script", "-qec", " ".join(argv), "/dev/null"],
                             capture_output=True, text=True, timeout=60)
        detail = (tty.stdout + tty.stderr) or detail
    raise BenchmarkError(f"{what} failed (exit {proc.returncode}): {detail.strip()}")


# Delivery paused, for the accept figure: every message goes to the hold queue (the HOLD
# action, as pymta's PYMTA_HOLD_INCOMING). in_flow_delay must then be off: it throttles
# smtpd while deliveries lag behind arrivals, and with delivery paused they always do.
HOLD_CF = """\
smtpd_data_restrictions = check_client_access static:HOLD
in_flow_delay = 0s
"""


def prepare_postfix(work: Path, port: int, *, recipient: str = "box@example.com",
                    size_limit: int = 10240000, hold: bool = False, relayhost: str = ""
                    ) -> tuple[ServerProcess, Path]:
    """Write a Postfix instance into ``work``; return its (unstarted) master and maildir.

    The maildir is ``work/mail/box`` (delivered messages appear in its ``new``), the same
    layout as the pymta scenarios' ``work/mail/box``. ``hold``: accept into the hold queue,
    deliver nothing. ``relayhost`` (``[127.0.0.1]:PORT``): no local domain at all, every
    message relayed there (``RELAY_CF``); the maildir then stays empty.
    """
    if not postfix_installed():
        raise BenchmarkError("postfix is not installed (Debian package postfix)")
    os.chmod(work, 0o755)  # the virtual agent runs as uid 5000 and must reach work/mail
    etc, spool, mail = work / "etc", work / "spool", work / "mail"
    for d in (etc, spool, mail):
        d.mkdir(exist_ok=True)
    os.chown(mail, MAIL_UID, MAIL_UID)
    shutil.copy(MASTER_CF_DIST, etc / "master.cf")
    delivery = (RELAY_CF.format(relayhost=relayhost) if relayhost
                else VIRTUAL_CF.format(T=work, recipient=recipient, uid=MAIL_UID))
    (etc / "main.cf").write_text(MAIN_CF.format(T=work, size_limit=size_limit) + delivery
                                 + (HOLD_CF if hold else ""))
    postconf = [str(POSTCONF), "-c", str(etc)]
    _run_checked([*postconf, "-F", "*/*/chroot = n"], "postconf -F")
    _run_checked([*postconf, "-MX", "smtp/inet"], "postconf -MX")
    _run_checked([*postconf, "-Me",
                  f"127.0.0.1:{port}/inet = 127.0.0.1:{port} inet n - n - - smtpd"],
                 "postconf -Me")
    _run_checked([str(POSTFIX), "-c", str(etc), "check"], "postfix check")
    master = _daemon_directory() / "master"
    env = {**os.environ, "MAIL_CONFIG": str(etc)}
    server = ServerProcess("postfix", [str(master), "-c", str(etc), "-d"], env, port,
                           work / "master.out")
    return server, mail / "box"
