"""A bounded map of the most recently used values: the worker's small in-memory caches
(decoded undigested chunks, directory listings, a layer's chunk rows)."""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _one(_: object) -> int:
    return 1


@dataclass
class Recent(Generic[K, V]):
    """At most `limit` in total `weigh(value)` (1 each by default), the least recently used
    out first; a value heavier than the limit is not kept. Safe across threads."""

    limit: int
    weigh: Callable[[V], int] = _one
    _items: "OrderedDict[K, V]" = field(default_factory=OrderedDict, init=False, repr=False)
    _total: int = field(default=0, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        weight = self.weigh(value)
        if weight > self.limit:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._total -= self.weigh(old)
            self._items[key] = value
            self._total += weight
            while self._total > self.limit:
                _, evicted = self._items.popitem(last=False)
                self._total -= self.weigh(evicted)
