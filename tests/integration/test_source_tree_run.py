"""``python -m pymta`` started in the repository root after a plain (not editable) install.

There the source tree's ``pymta/`` shadows the installed package, and the adapters live beside
it (``backends/``, ``delivery/``) instead of inside it as installed. The interpreter is run with
``-S`` and the venv's site-packages on ``PYTHONPATH``: the dependencies are importable, but no
``.pth`` file (the editable install's finder) is read, which is what a ``pip install .`` gives.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from serverproc import free_port

REPO = Path(__file__).resolve().parents[2]


def _plain_install_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "PYTHONPATH": sysconfig.get_paths()["purelib"],
           "MAIL_DOMAIN": "example.com", "MAIL_BOXES": "info@example.com",
           "PYMTA_STATE_DIR": str(tmp_path / "state"), "PYMTA_MAIL_DIR": str(tmp_path / "mail"),
           "PYMTA_WORKERS": "1"}
    env.update(extra)
    return env


def test_issue11_python_m_pymta_check_config_from_the_repository_root(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-S", "-m", "pymta", "check-config"], cwd=REPO,
                          env=_plain_install_env(tmp_path), capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "No module named" not in done.stderr


def test_issue11_python_m_pymta_serve_from_the_repository_root(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-S", "-m", "pymta", "serve"], cwd=REPO,
        env=_plain_install_env(tmp_path, PYMTA_SMTP_LISTEN=f"127.0.0.1:{port}"),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        greeting = b""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    greeting = s.recv(512)
                    break
            except OSError:
                time.sleep(0.1)
        assert greeting.startswith(b"220 "), (greeting, proc.poll())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert b"No module named" not in err, err
