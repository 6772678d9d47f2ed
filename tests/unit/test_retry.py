"""Retry schedule: Postfix-style exponential backoff, cap, jitter and lifetime."""

import random

import pytest

from pymta.queue.retry import RetryPolicy


def test_defaults_match_postfix():
    p = RetryPolicy()
    assert (p.first, p.maximum, p.lifetime) == (300.0, 4000.0, 5 * 86400.0)


def test_exponential_schedule_capped():
    p = RetryPolicy(jitter=0)
    assert [p.delay(n) for n in range(1, 7)] == [300, 600, 1200, 2400, 4000, 4000]
    assert p.delay(0) == 300  # "no failures yet" is treated as the first retry
    assert p.delay(10_000) == 4000  # no overflow for absurd counts


def test_jitter_bounded_and_seedable():
    a = RetryPolicy(rng=random.Random(7))
    b = RetryPolicy(rng=random.Random(7))
    seq_a = [a.delay(3) for _ in range(50)]
    assert seq_a == [b.delay(3) for _ in range(50)]
    assert all(1200 * 0.9 <= d <= 1200 * 1.1 for d in seq_a)
    assert len(set(seq_a)) > 1


def test_expired():
    p = RetryPolicy(lifetime=100)
    assert not p.expired(1000.0, 1099.0)
    assert p.expired(1000.0, 1100.0)
    assert RetryPolicy(lifetime=0).expired(5.0, 5.0)  # lifetime 0: one attempt only


def test_rejects_bad_values():
    with pytest.raises(ValueError):
        RetryPolicy(first=-1)
    with pytest.raises(ValueError):
        RetryPolicy(jitter=1.5)
