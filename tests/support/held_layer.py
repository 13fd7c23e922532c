"""One worker layer over a blob held in memory that streams and can stop mid-body on
demand: a registry cannot, and the streaming tests (test_prefetch_stream,
test_ondemand_stream, test_b2_read_ahead) must know that a chunk was served while the rest
of its request had NOT arrived, without timing."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

from crfs_worker.chunkfetch import AheadPolicy
from crfs_worker.chunkstore import ChunkStore
from crfs_worker.errors import RegistryError
from crfs_worker.layerkeys import KeyStore, LayerRecord
from crfs_worker.lowerlayer import LayerTable, LiveLayer
from crfs_worker.prefetch import FetchOptions
from tests import blobgen
from tests.blobgen import MemBlob

DEADLINE = 60.0  # hang guard for waits on other threads; never a measured duration


class HeldStream(MemBlob):
    """A MemBlob that also streams, `piece` bytes at a time; the stream stops before blob
    offset `hold_at` until `release()`, and then goes on, or with `fail` raises
    RegistryError there (a registry that went away mid-body, past every retry)."""

    def __init__(self, data: bytes, name: str, piece: int = 16 << 10) -> None:
        super().__init__(data, name)
        self.piece = piece
        self.hold_at: int | None = None
        self.fail = False
        self.streams: list[tuple[int, int]] = []
        self.holding = threading.Event()
        self._released = threading.Event()

    def release(self, fail: bool = False) -> None:
        self.fail = fail
        self._released.set()

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        self.streams.append((offset, length))
        at, end = offset, offset + length
        while at < end:
            upto = min(at + self.piece, end)
            if self.hold_at is not None and at < self.hold_at <= upto:
                hold, self.hold_at = self.hold_at, None  # holds and breaks once
                yield self.data[at:hold]
                at = hold
                self.holding.set()
                assert self._released.wait(DEADLINE), "the test never released the stream"
                if self.fail:
                    raise RegistryError(f"{self.name}: broke off after {at - offset} bytes (test)")
                continue
            yield self.data[at:upto]
            at = upto


class HeldLayer:
    """A LayerTable (no background fetch) over one layer whose blob is a HeldStream of
    `piece`-byte pieces; `pool` runs reads that must wait in threads."""

    def __init__(self, tmp: Path, blob: blobgen.Blob, ahead: AheadPolicy | None = None,
                 store: ChunkStore | None = None, piece: int = 16 << 10, workers: int = 4) -> None:
        keys = KeyStore(tmp / "rt")
        record = LayerRecord("file", "layer", toc_digest=blob.toc_digest, annotations=dict(blob.annotations))
        self.num = keys.number_for(record)
        self.blob = HeldStream(blob.data, "held-blob", piece)
        self.store = store if store is not None else ChunkStore(tmp / "chunks")
        options = FetchOptions(background=False) if ahead is None else FetchOptions(background=False, ahead=ahead)
        self.table = LayerTable(keys, tmp / "index", self.store, options, blob_opener=lambda record: self.blob)
        self.live: LiveLayer = self.table.get(self.num)
        # Opening reads the footer and the TOC: requests are counted from here.
        self.opened_at = (len(self.blob.reads), len(self.blob.streams))
        self.pool = ThreadPoolExecutor(max_workers=workers)

    def close(self) -> None:
        self.blob.release()
        self.pool.shutdown(wait=True)
        self.table.close()
