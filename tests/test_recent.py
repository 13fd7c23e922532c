"""crfs_worker/recent.py: the bounded most-recently-used map behind the worker's small caches."""
from __future__ import annotations

from crfs_worker.recent import Recent


def test_the_least_recently_used_go_first_by_weight() -> None:
    cache: Recent[str, bytes] = Recent(10, len)
    cache.put("a", b"xxxx")
    cache.put("b", b"yyyy")
    assert cache.get("a") == b"xxxx"  # a is now the most recent
    cache.put("c", b"zzzz")            # 12 > 10: b goes, not a
    assert cache.get("b") is None
    assert cache.get("a") == b"xxxx" and cache.get("c") == b"zzzz"


def test_a_value_heavier_than_the_limit_is_not_kept_and_a_replaced_one_is_reweighed() -> None:
    cache: Recent[str, bytes] = Recent(10, len)
    cache.put("big", b"x" * 11)
    assert cache.get("big") is None
    cache.put("a", b"x" * 8)
    cache.put("a", b"x")               # 1, not 9: room for 9 more
    cache.put("b", b"y" * 9)
    assert cache.get("a") == b"x" and cache.get("b") == b"y" * 9


def test_by_count_by_default() -> None:
    cache: Recent[int, str] = Recent(2)
    for n in range(3):
        cache.put(n, str(n))
    assert [cache.get(n) for n in range(3)] == [None, "1", "2"]
