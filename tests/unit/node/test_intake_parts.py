from node.intake.admission import RateLimiter


def test_rate_limiter_allows_a_burst_then_the_sustained_rate():
    limiter = RateLimiter(per_minute=60, burst=3)
    assert [limiter.allow(b"a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow(b"b", 0.0)  # another submitter has its own bucket
    assert not limiter.allow(b"a", 0.5)
    assert limiter.allow(b"a", 1.6)


def test_rate_limiter_memory_is_bounded():
    limiter = RateLimiter(per_minute=60, burst=1, capacity=10)
    for index in range(100):
        limiter.allow(index.to_bytes(4, "big"), 0.0)
    assert len(limiter._buckets) == 10
