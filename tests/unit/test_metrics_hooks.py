"""Metrics: off unless asked (pymta.metrics), PYMTA_METRICS_LISTEN, the queue census, the
in-process exporter over real HTTP."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pymta import exporter, metrics
from pymta.config.errors import ConfigError
from pymta.config.load import load_config
from pymta.config.model import Config, ListenAddress
from pymta.queue import quarantine
from pymta.queue.census import QueueCensus
from pymta.queue.choice import KINDS, detect, make_store
from pymta.queue.store import QueueStore
from pymta.types import Envelope, Recipient, Reply

BASE = {"MAIL_DOMAIN": "example.com"}


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """Metrics on, in a registry of this test's own; off again afterwards."""
    assert not metrics.enabled(), "a previous test left metrics on"
    reg = metrics.enable(CollectorRegistry())
    try:
        yield reg
    finally:
        metrics.disable()


# ------------------------------------------------------------------------------ off


def test_off_by_default_and_every_hook_is_a_no_op() -> None:
    import pymta
    import pymta.app  # importing the server must not turn metrics on

    assert pymta.MTA is not None
    assert not metrics.enabled()
    answer = Reply(550, "5.1.1", "no")
    assert metrics.replied("rcpt", answer) is answer
    assert metrics.end_of_data(metrics.clock(), answer) is answer
    metrics.connection("smtp")
    metrics.refused("total")
    metrics.session_opened()
    metrics.session_closed()
    metrics.tls_handshake(None)
    metrics.tls_failed()
    metrics.error("lookup")
    metrics.commit_batch(3)
    metrics.delivered("local", ["delivered"], metrics.clock(), time.time())
    assert not metrics.enabled()


def test_hooks_count_into_the_registry(registry: CollectorRegistry) -> None:
    def value(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    metrics.connection("smtp")
    metrics.connection("smtp")
    metrics.connection("submissions")
    metrics.refused("per_ip")
    metrics.replied("rcpt", Reply(550, "5.1.1", "unknown"))
    metrics.replied("rcpt", Reply(451, "4.3.0", "lookup"))
    metrics.replied("rcpt", Reply(250, "2.1.5", "Ok"))         # not a rejection
    started = metrics.clock()
    metrics.end_of_data(started, Reply(250, "2.0.0", "Ok: queued as X"))
    metrics.end_of_data(started, Reply(554, "5.4.6", "too many hops"))
    metrics.error("lookup")
    metrics.error("lookup", Reply(550, "5.1.1", "verdict"))    # a verdict is no fault
    metrics.error("lookup", Reply(451, "4.3.0", "down"))
    metrics.commit_batch(5)
    metrics.delivered("smtp:example.org", ["delivered", "temporary", "permanent"], started,
                      time.time() - 2)
    metrics.delivered("local", ["delivered"], started)

    assert value("pymta_connections_total", listener="smtp") == 2
    assert value("pymta_connections_total", listener="submissions") == 1
    assert value("pymta_connections_refused_total", limit="per_ip") == 1
    assert value("pymta_messages_rejected_total", stage="rcpt", **{"class": "5xx"}) == 1
    assert value("pymta_messages_rejected_total", stage="rcpt", **{"class": "4xx"}) == 1
    assert value("pymta_messages_rejected_total", stage="end_of_data",
                 **{"class": "5xx"}) == 1
    assert value("pymta_messages_accepted_total") == 1
    assert value("pymta_end_of_data_seconds_count") == 1
    assert value("pymta_errors_total", kind="lookup") == 2
    assert value("pymta_commit_batch_size_sum") == 5
    # the router's key per destination domain is cut to the agent: no label per domain
    assert value("pymta_deliveries_total", agent="smtp", status="sent") == 1
    assert value("pymta_deliveries_total", agent="smtp", status="deferred") == 1
    assert value("pymta_deliveries_total", agent="smtp", status="bounced") == 1
    assert value("pymta_deliveries_total", agent="local", status="sent") == 1
    assert value("pymta_delivery_seconds_count", agent="smtp") == 1
    # only the delivered recipient with a known arrival has a delay, of about 2 s
    assert value("pymta_delivery_delay_seconds_count") == 1
    assert value("pymta_delivery_delay_seconds_bucket", le="1.0") == 0
    assert value("pymta_delivery_delay_seconds_bucket", le="5.0") == 1
    names = {s.name for family in registry.collect() for s in family.samples}
    assert not [n for n in names if not n.startswith("pymta_")]


def test_the_open_sessions_gauge_follows_sessions(registry: CollectorRegistry) -> None:
    metrics.session_opened()
    metrics.session_opened()
    metrics.session_closed()
    assert registry.get_sample_value("pymta_connections_open") == 1


# ------------------------------------------------------------------------------ setting


@pytest.mark.parametrize(("value", "expected"), [
    ("", None),
    ("none", None),
    ("127.0.0.1:9325", ListenAddress("127.0.0.1", 9325)),
    ("[::1]:9325", ListenAddress("::1", 9325)),
    ("9325", ListenAddress("0.0.0.0", 9325)),
])
def test_metrics_listen_values(value: str, expected: ListenAddress | None) -> None:
    config = load_config({**BASE, "PYMTA_METRICS_LISTEN": value})
    assert config.metrics_listen == expected


def test_metrics_listen_is_off_by_default() -> None:
    assert load_config(BASE).metrics_listen is None


@pytest.mark.parametrize("value", ["localhost", "127.0.0.1:port", "127.0.0.1:70000",
                                   "::1:9325", "127.0.0.1:9325 127.0.0.1:9326"])
def test_bad_metrics_listen_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, "PYMTA_METRICS_LISTEN": value})
    assert str(info.value).startswith("PYMTA_METRICS_LISTEN: ")


# ------------------------------------------------------------------------------ exporter


def _config(tmp_path: Path, listen: str) -> Config:
    return load_config({**BASE, "PYMTA_METRICS_LISTEN": listen,
                        "PYMTA_STATE_DIR": str(tmp_path / "state")})


def test_port_in_use_is_a_config_error_naming_the_variable(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _config(tmp_path, f"127.0.0.1:{port}")
        with pytest.raises(ConfigError) as info:
            exporter.for_config(config)
    assert str(info.value).startswith(f"PYMTA_METRICS_LISTEN: cannot listen on "
                                      f"127.0.0.1:{port}: ")
    assert not metrics.enabled()        # a failed start leaves nothing on


def test_off_means_no_exporter(tmp_path: Path) -> None:
    assert exporter.for_config(load_config(BASE)) is None


async def test_one_process_exporter_serves_counts_and_queue_over_http(tmp_path: Path) -> None:
    config = _config(tmp_path, "127.0.0.1:0")
    (tmp_path / "state").mkdir()
    store = QueueStore(tmp_path / "state" / "queue")
    store.open()
    await store.start()
    try:
        env = _envelope()
        env.held = True
        await _commit(store, env)
        exp = exporter.for_config(config)
        assert exp is not None
        try:
            exp.start()
            assert metrics.enabled()
            metrics.connection("smtp")
            text = _get(f"http://127.0.0.1:{exp.port}/metrics")
            with pytest.raises(urllib.error.HTTPError) as info:
                _get(f"http://127.0.0.1:{exp.port}/")
            assert info.value.code == 404
        finally:
            exp.close()
    finally:
        await store.aclose()
    assert not metrics.enabled()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("pymta_connections_total", (("listener", "smtp"),))] == 1
    assert samples[("pymta_queue_messages", (("queue", "hold"),))] == 1
    assert samples[("pymta_queue_messages", (("queue", "active"),))] == 0


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


# ------------------------------------------------------------------------------ census


def _envelope(n: int = 0) -> Envelope:
    now = time.time()
    return Envelope(sender="sender@example.com",
                    recipients=[Recipient(f"rcpt{n}@example.com", f"rcpt{n}@example.com")],
                    received_at=now, next_attempt=now, client_ip="192.0.2.1")


async def _commit(store: Any, env: Envelope) -> str:
    spool = store.new_spool()
    spool.write(b"Subject: x\r\n\r\nbody\r\n")
    return await store.commit(spool, env)


@pytest.fixture(params=KINDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A running queue store of either kind: the census counts the file layout's ``env/``
    and the SQLite database's rows alike."""
    s = make_store(str(tmp_path / "queue"), request.param)
    s.open()
    await s.start()
    yield s
    await s.aclose()


async def test_census_counts_each_state_and_reads_only_what_changed(store: Any) -> None:
    census = QueueCensus(store.root)
    assert census.count() == {"active": 0, "deferred": 0, "hold": 0, "quarantine": 0,
                              "unread": 0}
    await _commit(store, _envelope(1))                          # new: active
    tried = _envelope(2)
    tried.recipients[0].attempts = 1                            # tried once: deferred
    tried_qid = await _commit(store, tried)
    held = _envelope(3)
    held.held = True
    await _commit(store, held)
    blocked = _envelope(4)
    quarantine.mark(blocked, "Q", "virus found", "virus")
    await _commit(store, blocked)
    expected = {"active": 1, "deferred": 1, "hold": 1, "quarantine": 1, "unread": 0}
    assert census.count() == expected
    assert census.reads == 4
    assert census.count() == expected
    assert census.reads == 4                    # nothing changed: nothing read again
    # a held message: the envelope is saved (replaced); only that one is read again
    tried.held = True
    store.save_sync(tried_qid, tried)
    assert census.count() == {**expected, "deferred": 0, "hold": 2}
    assert census.reads == 5
    await store.remove(tried_qid)
    assert census.count() == {**expected, "deferred": 0}


async def test_census_reads_at_most_max_reads_per_count(store: Any) -> None:
    for i in range(5):
        await _commit(store, _envelope(i))
    census = QueueCensus(store.root, max_reads=2)
    assert census.count() == {"active": 2, "deferred": 0, "hold": 0, "quarantine": 0,
                              "unread": 3}
    assert census.count()["unread"] == 1
    assert census.count() == {"active": 5, "deferred": 0, "hold": 0, "quarantine": 0,
                              "unread": 0}


async def test_census_skips_what_is_not_an_envelope_and_changes_nothing(store: Any) -> None:
    qid = await _commit(store, _envelope())
    other = await _commit(store, _envelope(2))
    if isinstance(store, QueueStore):
        env_path = Path(store.env_dir) / qid
        env_path.write_bytes(b"not an envelope")

        def stored() -> bytes:
            return env_path.read_bytes()
    else:
        db = Path(store.root) / "queue.db"
        with contextlib.closing(sqlite3.connect(db)) as con, con:
            con.execute("UPDATE messages SET envelope = ? WHERE qid = ?",
                        (b"not an envelope", qid))

        def stored() -> bytes:
            with contextlib.closing(sqlite3.connect(db)) as con:
                row = con.execute("SELECT envelope FROM messages WHERE qid = ?",
                                  (qid,)).fetchone()
            assert row is not None, "the census set the row aside"
            return bytes(row[0])
    census = QueueCensus(store.root)
    assert census.count() == {"active": 1, "deferred": 0, "hold": 0, "quarantine": 0,
                              "unread": 0}
    assert stored() == b"not an envelope"       # not set aside, not "repaired"
    assert sorted(store.ids()) == sorted([qid, other])


def test_census_of_a_queue_not_made_yet(tmp_path: Path) -> None:
    assert sum(QueueCensus(str(tmp_path / "none")).count().values()) == 0


async def test_census_follows_the_queue_into_the_database(tmp_path: Path) -> None:
    """The exporter's census may start on the file layout; the server converts it into
    ``queue.db`` at its first start with PYMTA_QUEUE_STORE=sqlite, and the counts follow,
    read-only: the census's open connection keeps no server from committing."""
    root = str(tmp_path / "queue")
    files = QueueStore(root)
    await files.start()
    try:
        for i in range(3):
            await _commit(files, _envelope(i))
    finally:
        await files.aclose()
    census = QueueCensus(root)
    assert census.count() == {"active": 3, "deferred": 0, "hold": 0, "quarantine": 0,
                              "unread": 0}
    assert detect(root) == "files"
    sql = make_store(root, "sqlite")
    await sql.start()                       # converts env/ + data/ into rows
    try:
        assert detect(root) == "sqlite" and not os.path.exists(os.path.join(root, "env"))
        expected = {"active": 3, "deferred": 0, "hold": 0, "quarantine": 0, "unread": 0}
        assert census.count() == expected
        held = _envelope(9)
        held.held = True
        qid = await _commit(sql, held)      # committed while the census's connection is open
        assert census.count() == {**expected, "hold": 1}
        await sql.remove(qid)
        assert census.count() == expected
    finally:
        await sql.aclose()
    census.close()



def test_review_idle_connections_cannot_pile_up_threads(tmp_path: Path) -> None:
    """Issue 13 review: anyone reaching the endpoint could open connections and send nothing,
    one thread each, without bound. Now at most MAX_SCRAPERS are served at once; more are
    closed unanswered."""
    exp = exporter.for_config(_config(tmp_path, "127.0.0.1:0"))
    assert exp is not None
    idle: list[socket.socket] = []
    try:
        exp.start()
        for _ in range(exporter.MAX_SCRAPERS):
            idle.append(socket.create_connection(("127.0.0.1", exp.port), timeout=5))
        # once the server has taken every idle one, a further connection is closed unanswered
        deadline = time.monotonic() + 5
        while True:
            with socket.create_connection(("127.0.0.1", exp.port), timeout=5) as extra:
                if _closed_unanswered(extra):
                    break
            assert time.monotonic() < deadline, "a connection beyond the cap was served"
            time.sleep(0.05)
        for conn in idle:        # the idle ones go: scraping works again
            conn.close()
        deadline = time.monotonic() + 5
        while True:
            try:
                assert "pymta_connections_total" in _get(f"http://127.0.0.1:{exp.port}/metrics")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "no scrape after the idle ones left"
                time.sleep(0.05)
    finally:
        for conn in idle:
            conn.close()
        exp.close()


def test_review_an_idle_scraper_is_dropped(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """... and one that sends nothing is closed after SCRAPE_TIMEOUT (shortened here)."""
    monkeypatch.setattr(exporter._Quiet, "timeout", 0.5)
    exp = exporter.for_config(_config(tmp_path, "127.0.0.1:0"))
    assert exp is not None
    try:
        exp.start()
        with socket.create_connection(("127.0.0.1", exp.port), timeout=5) as conn:
            started = time.monotonic()
            assert conn.recv(100) == b""      # closed by the server, not by our timeout
            assert time.monotonic() - started < 4
    finally:
        exp.close()


def _closed_unanswered(conn: socket.socket) -> bool:
    try:
        conn.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        return conn.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
