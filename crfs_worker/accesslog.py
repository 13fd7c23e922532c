"""Recording which files a workload opens, for `crfs optimize`.

The worker notes every open of a regular file for its data (crfs.so's `open` requests)
while a recording is active: `(layer number, layer path)` pairs, each once, in the order
of first access. Clients use two IPC requests:

    record_start {}       -> {id}
    record_stop  {id}     -> {opens: [[layer, path, blob digest or nil, location], ...]}

Recordings are bounded (entries each, recordings at once): a client that never stops
its recording costs little, and the oldest recording is dropped for a new one. (Not
recent.Recent: a recording keeps its FIRST entries and says it overflowed, and
recordings go by age of start, never refreshed by use, and are iterated and popped.)
"""
from __future__ import annotations

import errno
import itertools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from .ipc import RequestFailed

MAX_RECORDINGS = 16
MAX_ENTRIES = 1_000_000

Handler = Callable[[dict[str, Any]], tuple[dict[str, Any], int | None]]


@dataclass
class Recording:
    """One recording: first accesses in order (a dict keeps insertion order)."""

    seen: dict[tuple[int, str], None] = field(default_factory=dict)
    overflowed: bool = False

    def note(self, layer: int, path: str) -> None:
        key = (layer, path)
        if key in self.seen:
            return
        if len(self.seen) >= MAX_ENTRIES:
            self.overflowed = True
            return
        self.seen[key] = None


@dataclass
class AccessLog:
    """The worker's active recordings, by id."""

    _recordings: "OrderedDict[int, Recording]" = field(default_factory=OrderedDict, init=False, repr=False)
    _ids: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1), init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def start(self) -> int:
        with self._lock:
            ident = next(self._ids)
            self._recordings[ident] = Recording()
            while len(self._recordings) > MAX_RECORDINGS:
                self._recordings.popitem(last=False)
            return ident

    def stop(self, ident: int) -> Recording:
        with self._lock:
            recording = self._recordings.pop(ident, None)
        if recording is None:
            raise RequestFailed(errno.ENOENT, f"no active recording {ident} (the worker restarted, "
                                              f"or more than {MAX_RECORDINGS} recordings were started)")
        return recording

    def note(self, layer: int, path: str) -> None:
        """Called for every data open of a regular file; cheap when nothing records."""
        if not self._recordings:
            return
        with self._lock:
            for recording in self._recordings.values():
                recording.note(layer, path)

    def handlers(self, describe: Callable[[int], tuple[str | None, str]]) -> dict[str, Handler]:
        """The IPC requests; `describe(layer)` gives a layer's blob digest and location."""

        def record_start(request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
            return {"id": self.start()}, None

        def record_stop(request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
            ident = request.get("id")
            if not isinstance(ident, int) or isinstance(ident, bool):
                raise RequestFailed(errno.EINVAL, "missing integer argument 'id'")
            recording = self.stop(ident)
            known: dict[int, tuple[str | None, str]] = {}
            rows = []
            for layer, path in recording.seen:
                if layer not in known:
                    known[layer] = describe(layer)
                digest, location = known[layer]
                rows.append([layer, os.fsencode(path), digest, location])
            return {"opens": rows, "overflowed": recording.overflowed}, None

        return {"record_start": record_start, "record_stop": record_stop}
