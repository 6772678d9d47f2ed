"""Prometheus metrics of a real ``pymta serve`` (issue 13, item 5): two worker processes,
real SMTP traffic (delivered to maildir, refused recipients, a STARTTLS session, messages
deferred by a dead relay and held with ``pymta queue hold``), ``/metrics`` scraped over HTTP
and parsed with prometheus-client's own parser. Every count must equal the traffic sent,
every worker counted once (the scrape is the sum of each worker's own count files), and the
queue gauges must say what ``pymta queue list`` says. Also: a bad or busy
PYMTA_METRICS_LISTEN stops ``pymta serve`` with one line and exit 2, and an embedded MTA
serves no metrics even when its Config names an address."""

from __future__ import annotations

import dataclasses
import glob
import os
import smtplib
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from pymta import metrics
from pymta.app import MTA
from pymta.config.model import ListenAddress
from tests.conftest import make_config
from tests.integration import serverproc
from tests.integration._support import client_tls_context, maildir_bytes
from tests.integration.serverproc import (
    ServerProc,
    SMTPClient,
    dead_relay,
    free_port,
    make_message,
    queued_id,
    smtp_send,
    wait_until,
)

server_factory = serverproc.server_factory  # the fixture

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
MAX_MESSAGES = 40      # sent one connection each until both workers took some


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def per_worker(srv: ServerProc, kind: str, name: str) -> dict[int, float]:
    """Each worker's own value of ``name``, from its own ``kind`` file (``counter``,
    ``gauge_livesum``) in the multiprocess directory."""
    out = {}
    for path in glob.glob(str(srv.state_dir / "metrics" / f"{kind}_*.db")):
        pid = int(Path(path).stem.rpartition("_")[2])
        for family in MultiProcessCollector.merge([path], accumulate=True):
            for s in family.samples:
                if s.name == name:
                    out[pid] = s.value
    return out


def accepted_per_worker(srv: ServerProc) -> dict[int, float]:
    return per_worker(srv, "counter", "pymta_messages_accepted_total")


def test_two_workers_scrape_counts_the_traffic_once(server_factory) -> None:
    mport = free_port()
    srv: ServerProc = server_factory(
        PYMTA_WORKERS="2", PYMTA_METRICS_LISTEN=f"127.0.0.1:{mport}", SMTPD_USE_TLS="yes",
        SMTP_RELAY_HOSTAUTH=dead_relay(), PYMTA_RETRY_FIRST="600", PYMTA_RETRY_MAX="4000",
        PYMTA_PEERNAME_LOOKUP="no")
    srv.start()
    before = scrape(mport)
    connections = 0

    # N messages to a local maildir, one connection each, until both workers took some
    sent = 0
    while sent < 2 or len([n for n in accepted_per_worker(srv).values() if n]) < 2:
        assert sent < MAX_MESSAGES, f"one worker took all {sent} connections"
        code, text = smtp_send(srv.port, "s@remote.test", ["alice@example.com"],
                               make_message("s@remote.test", "alice@example.com", f"m{sent}"))
        assert code == 250, text
        sent += 1
        connections += 1
    # one more, over STARTTLS
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=30) as smtp:
        smtp.ehlo("client.test")
        smtp.starttls(context=client_tls_context())
        tls_version = smtp.sock.version()   # type: ignore[union-attr]
        smtp.ehlo("client.test")
        smtp.sendmail("s@remote.test", ["alice@example.com"],
                      make_message("s@remote.test", "alice@example.com", "tls"))
    sent += 1
    connections += 1
    # M refused recipients (550 5.1.1), in one session
    refused = 3
    with SMTPClient(srv.port) as client:
        assert client.cmd("EHLO client.test")[0] == 250
        assert client.cmd("MAIL FROM:<s@remote.test>")[0] == 250
        for i in range(refused):
            assert client.cmd(f"RCPT TO:<nobody{i}@example.com>")[0] == 550
    connections += 1
    # three messages for the alias that forwards to a dead relay: deferred; one then held
    forwarded = []
    for i in range(3):
        code, text = smtp_send(srv.port, "s@remote.test", ["fwd@example.com"],
                               make_message("s@remote.test", "fwd@example.com", f"f{i}"))
        assert code == 250, text
        forwarded.append(queued_id(text))
        connections += 1
    wait_until(lambda: len(maildir_bytes(str(srv.mail_dir), "alice")) >= sent, 30,
               what=f"{sent} messages in alice's maildir")

    def all_tried() -> bool:
        entries = srv.queue_json()
        return len(entries) == 3 and all(r["attempts"] >= 1 for e in entries
                                         for r in e["recipients"])

    wait_until(all_tried, 30, what="a first attempt of each forwarded message")
    srv.cli("queue", "hold", forwarded[0], check=True)
    listing = srv.queue_json()
    # the sessions close on the server side a moment after the client's QUIT
    after = wait_until(lambda: (s := scrape(mport))
                       and value(s, "pymta_connections_open") == 0 and s, 10,
                       what="no open session in the scrape")

    accepted = sent + len(forwarded)
    assert delta(after, before, "pymta_messages_accepted_total") == accepted
    # each worker counted once: the scrape is the sum of the workers' own counts
    per_worker = accepted_per_worker(srv)
    assert len(per_worker) == 2 and all(per_worker.values()), per_worker
    assert sum(per_worker.values()) == value(after, "pymta_messages_accepted_total")
    assert delta(after, before, "pymta_connections_total", listener="smtp") == connections
    assert delta(after, before, "pymta_messages_rejected_total", stage="rcpt",
                 **{"class": "5xx"}) == refused
    assert delta(after, before, "pymta_deliveries_total", agent="local",
                 status="sent") == sent
    assert delta(after, before, "pymta_delivery_delay_seconds_count") == sent
    attempts = sum(r["attempts"] for e in listing for r in e["recipients"])
    assert delta(after, before, "pymta_deliveries_total", agent="relay",
                 status="deferred") == attempts
    assert delta(after, before, "pymta_end_of_data_seconds_count") == accepted
    assert delta(after, before, "pymta_commit_batch_size_sum") == accepted
    assert delta(after, before, "pymta_tls_handshakes_total", version=tls_version) == 1
    assert value(after, "pymta_tls_handshake_failures_total") == 0
    # queue gauges: what `pymta queue list` shows, counted by the supervisor
    held = sum(1 for e in listing if e["held"])
    assert held == 1
    assert value(after, "pymta_queue_messages", queue="hold") == held
    assert value(after, "pymta_queue_messages", queue="deferred") == len(listing) - held
    assert value(after, "pymta_queue_messages", queue="active") == 0
    assert value(after, "pymta_queue_messages", queue="quarantine") == 0
    assert srv.stop() == 0


def test_one_process_serves_its_own_counts(server_factory) -> None:
    mport = free_port()
    srv: ServerProc = server_factory(PYMTA_WORKERS="1",
                                     PYMTA_METRICS_LISTEN=f"127.0.0.1:{mport}")
    srv.start()
    before = scrape(mport)
    code, text = smtp_send(srv.port, "s@remote.test", ["bob@example.com"],
                           make_message("s@remote.test", "bob@example.com", "one"))
    assert code == 250, text
    wait_until(lambda: delta(scrape(mport), before, "pymta_deliveries_total", agent="local",
                             status="sent") == 1, 20, what="the delivery in the scrape")
    after = scrape(mport)
    assert delta(after, before, "pymta_messages_accepted_total") == 1
    assert not (srv.state_dir / "metrics").exists()     # counted in memory, no files
    assert srv.stop() == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_busy_metrics_port_is_one_line_and_exit_2(server_factory, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        srv: ServerProc = server_factory(PYMTA_WORKERS=workers,
                                         PYMTA_METRICS_LISTEN=f"127.0.0.1:{port}")
        srv.start(wait=False)
        assert srv.wait(30) == 2
    assert f"PYMTA_METRICS_LISTEN: cannot listen on 127.0.0.1:{port}" in srv.stderr
    assert "Traceback" not in srv.stderr
    assert not serverproc.port_open(srv.port)


def test_bad_metrics_listen_is_a_config_error(server_factory) -> None:
    srv: ServerProc = server_factory(PYMTA_METRICS_LISTEN="127.0.0.1:metrics")
    srv.start(wait=False)
    assert srv.wait(30) == 2
    lines = [line for line in srv.stderr.splitlines() if "PYMTA_METRICS_LISTEN" in line]
    assert lines and lines[0].startswith("pymta: PYMTA_METRICS_LISTEN: "), srv.stderr
    assert "Traceback" not in srv.stderr


async def test_an_embedded_mta_serves_no_metrics(tmp_path: Path) -> None:
    mport = free_port()
    config = dataclasses.replace(make_config(tmp_path),
                                 metrics_listen=ListenAddress("127.0.0.1", mport))
    async with MTA(config) as mta:
        assert mta.addresses["smtp"]
        assert not metrics.enabled()
        assert not serverproc.port_open(mport)
    assert not os.path.exists(os.path.join(config.state_dir, "metrics"))


def worker_pids(srv: ServerProc) -> set[int]:
    path = Path(f"/proc/{srv.pid}/task/{srv.pid}/children")
    return {int(p) for p in path.read_text().split()}


def test_a_killed_worker_keeps_its_counts_and_drops_its_sessions(server_factory) -> None:
    """The supervisor marks a dead worker: its open sessions stop counting at once, what it
    counted stays in the totals, and the worker forked in its place counts on."""
    mport = free_port()
    srv: ServerProc = server_factory(PYMTA_WORKERS="2",
                                     PYMTA_METRICS_LISTEN=f"127.0.0.1:{mport}")
    srv.start()
    for i in range(4):
        code, text = smtp_send(srv.port, "s@remote.test", ["bob@example.com"],
                               make_message("s@remote.test", "bob@example.com", f"k{i}"))
        assert code == 250, text
    accepted = value(scrape(mport), "pymta_messages_accepted_total")
    idle = [SMTPClient(srv.port) for _ in range(6)]
    try:
        wait_until(lambda: value(scrape(mport), "pymta_connections_open") == len(idle), 10,
                   what="six open sessions in the scrape")
        # the worker with most of them (the other may have none)
        sessions = per_worker(srv, "gauge_livesum", "pymta_connections_open")
        victim = max(worker_pids(srv), key=lambda pid: sessions.get(pid, 0))
        os.kill(victim, 9)
        wait_until(lambda: victim not in worker_pids(srv) and len(worker_pids(srv)) == 2, 20,
                   what="the worker restarted")
        dropped = 0
        for client in idle:
            client.sock.settimeout(0.5)     # a dead worker's are closed already
            try:
                gone = client.sock.recv(1) == b""
            except TimeoutError:
                gone = False                # alive: waiting for its command
            except ConnectionResetError:
                gone = True
            dropped += gone
        assert dropped == sessions[victim] > 0
        after = scrape(mport)
        assert value(after, "pymta_connections_open") == len(idle) - dropped
        assert value(after, "pymta_messages_accepted_total") == accepted
    finally:
        for client in idle:
            client.sock.close()
    code, text = smtp_send(srv.port, "s@remote.test", ["bob@example.com"],
                           make_message("s@remote.test", "bob@example.com", "after"))
    assert code == 250, text
    assert value(scrape(mport), "pymta_messages_accepted_total") == accepted + 1
    assert srv.stop() == 0
