"""PYMTA_CONNECTION_RATE_LIMIT: the per-client connection rate counter (Postfix's anvil) and
the connection refusals of the listener (issue 10)."""

from __future__ import annotations

from pymta.backends.chain import LookupChain
from pymta.receiving.listener import ConnectionRateLimit, ListenerContext
from pymta.receiving.session import ReceiveContext, network_matcher
from pymta.smtp.engine import EngineConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_per_address_within_the_window_and_restarts_after_it() -> None:
    clock = Clock()
    limit = ConnectionRateLimit(3, window=60, clock=clock)
    assert [limit.hit("192.0.2.1") for _ in range(5)] == [1, 2, 3, 4, 5]
    assert limit.hit("192.0.2.2") == 1             # another client has its own count
    clock.now += 59.9
    assert limit.hit("192.0.2.1") == 6             # refused ones count too, as in anvil
    clock.now += 0.2                               # the window of .1 started at 1000
    assert limit.hit("192.0.2.1") == 1


def test_table_is_bounded_and_expired_windows_are_dropped() -> None:
    clock = Clock()
    limit = ConnectionRateLimit(3, window=60, max_entries=100, clock=clock)
    for i in range(1000):
        limit.hit(f"10.0.{i // 256}.{i % 256}")
        assert len(limit) <= 100
    clock.now += 61
    for i in range(50):                            # each new window drops two expired ones
        limit.hit(f"10.9.0.{i}")
    assert len(limit) == 50


def _listener(rate: int, mynetworks: tuple[str, ...] = (), per_ip: int = 50,
              total: int = 2000) -> ListenerContext:
    receive = ReceiveContext(hostname="mx.example.com", local_domains=frozenset({"x.test"}),
                             first_domain="x.test", lookup=LookupChain([]),
                             intake=None,  # type: ignore[arg-type]  # never reached
                             relay_allowed=network_matcher(mynetworks))
    return ListenerContext(receive=receive, engine_config=EngineConfig("mx.example.com"),
                           ssl_context=None, max_per_ip=per_ip, max_connections=total,
                           rate_limit=ConnectionRateLimit(rate) if rate else None)


def test_refusal_reply_and_mynetworks_exemption() -> None:
    ctx = _listener(2, mynetworks=("192.0.2.0/24",))
    assert ctx.refusal("198.51.100.7") is None
    assert ctx.refusal("198.51.100.7") is None
    reply = ctx.refusal("198.51.100.7")
    assert reply is not None
    assert reply.render() == b"421 4.7.0 Error: too many connections from 198.51.100.7\r\n"
    assert all(ctx.refusal("192.0.2.9") is None for _ in range(10))


def test_no_rate_limit_by_default_and_count_limit_spares_mynetworks() -> None:
    ctx = _listener(0, mynetworks=("192.0.2.9/32",), per_ip=1)
    assert all(ctx.refusal("198.51.100.7") is None for _ in range(100))
    ctx.per_ip["198.51.100.7"] = 1
    ctx.per_ip["192.0.2.9"] = 1
    assert ctx.refusal("198.51.100.7") is not None
    assert ctx.refusal("192.0.2.9") is None
