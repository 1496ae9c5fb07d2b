"""Retry-After from the queue's depth and drain rate: pure, no NATS."""

from services.edge.bus.queue_gauge import DrainRate, retry_after_seconds


def test_retry_after_is_depth_over_drain_rate_within_bounds():
    assert retry_after_seconds(1000, 100.0) == 10
    assert retry_after_seconds(1000, 3.0) == 60  # capped
    assert retry_after_seconds(5, 100.0) == 1
    assert retry_after_seconds(1000, 0.0) == 60


def test_drain_rate_follows_the_queue():
    d = DrainRate(alpha=0.5)
    d.sample(0.0, drained=0, depth=1000)
    assert d.retry_after() == 60  # no rate known yet
    d.sample(1.0, drained=50, depth=1000)
    assert d.rate == 50 and d.retry_after() == 20
    d.sample(2.0, drained=150, depth=1000)  # faster now: the estimate moves towards 100/s
    assert d.rate == 75 and d.retry_after() == 14
    d.sample(3.0, drained=150, depth=1000)  # stalled
    assert d.rate == 37.5
