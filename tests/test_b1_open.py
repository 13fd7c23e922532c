"""B1 cold start: opening a layer without waiting where it need not.

- A registry layer's TOC (64 KiB or more) is ONE streamed ranged GET, parsed as it arrives
  (toc._BlobRange over `stream_range`), not a series of `read_size` ranges read whole
  before the parse starts. Counted from a real docker-registry's access log, and by a
  blob that holds its last piece back until the parse has produced something.
- The TOC digest is still checked before the layer is used: a streamed TOC that does not
  match its digest refuses the open, as before.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator

import pytest

from crfs_worker.blobtail import TailKeepingBlob
from crfs_worker.errors import VerificationError
from crfs_worker.footer import read_footer
from crfs_worker.layer import Layer, LayerSource
from crfs_worker.reference import ImageReference
from crfs_worker.registry import RegistryClient
from crfs_worker.toc import TocLimits, TocSource
from tests import blobgen
from tests.blobgen import MemBlob, reg
from tests.support.registry import LoggedRegistry, sha256_digest

PIECE = 4096


def _many_files(count: int) -> list[blobgen.Spec]:
    # Distinct names and contents: a TOC of ~count x 300 bytes that gzip cannot shrink to nothing.
    return [reg(f"d{i % 17}/file-{i:05d}-{i * 7919 % 100003}", f"{i}\n".encode() * (1 + i % 5)) for i in range(count)]


BLOB = blobgen.estargz(_many_files(3000))


class HeldBackStream:
    """A streaming blob over bytes that delivers a range in PIECE-sized pieces but holds
    the LAST one back until `release` is set (a TOC still on the wire). `read_range`
    (a whole range at once) waits for it too: a reader that needs all the bytes before
    it parses cannot get them early. A wait that runs out is recorded, not hidden."""

    def __init__(self, data: bytes) -> None:
        self.mem = MemBlob(data, "held-back")
        self.release = threading.Event()
        self.ran_out = False
        self.streams = 0

    @property
    def size(self) -> int:
        return self.mem.size

    @property
    def name(self) -> str:
        return self.mem.name

    def _wait(self) -> None:
        if not self.release.wait(20):  # only a broken (non-streaming) reader gets here
            self.ran_out = True

    def read_range(self, offset: int, length: int) -> bytes:
        if length > PIECE:
            self._wait()
        return self.mem.read_range(offset, length)

    def stream_range(self, offset: int, length: int) -> Iterator[bytes]:
        self.streams += 1
        data = self.mem.read_range(offset, length)
        for start in range(0, length, PIECE):
            if start + PIECE >= length:
                self._wait()
            yield data[start:start + PIECE]


def test_the_toc_is_parsed_while_its_last_bytes_are_still_coming() -> None:
    blob = HeldBackStream(BLOB.data)
    footer = read_footer(blob)
    assert footer.toc_length > 4 * PIECE  # else there is nothing to overlap
    toc = TocSource(blob, footer, TocLimits())
    try:
        pieces = toc.pieces()
        first = next(pieces)   # arrives while the stream still holds its last piece
        blob.release.set()
        rest = b"".join(pieces)
    finally:
        toc.close()
    assert not blob.ran_out and blob.streams == 1
    assert first + rest == BLOB.toc_json
    assert toc.digest() == BLOB.toc_digest


def test_a_layer_opened_through_a_kept_tail_streams_its_toc(tmp_path: Path) -> None:
    # The worker opens registry layers through TailKeepingBlob (blobtail.py): it must pass
    # the stream on, not fall back to one whole-range read.
    blob = HeldBackStream(BLOB.data)
    blob.release.set()
    layer = Layer.open(LayerSource(TailKeepingBlob(blob, tmp_path / "tail"), BLOB.toc_digest), tmp_path / "idx")
    try:
        assert blob.streams == 1
        assert layer.read("d3/file-00003-23757", 0, 100) == BLOB.files["d3/file-00003-23757"]
    finally:
        layer.close()


def test_a_streamed_toc_that_does_not_match_its_digest_is_refused(tmp_path: Path) -> None:
    blob = HeldBackStream(BLOB.data)
    blob.release.set()
    wrong = "sha256:" + "0" * 64
    with pytest.raises(VerificationError, match="TOC does not match its digest"):
        Layer.open(LayerSource(blob, wrong), tmp_path)
    assert blob.streams == 1
    assert list(tmp_path.iterdir()) == []  # no index of an unverified TOC


@pytest.fixture(scope="module")
def logged_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedRegistry]:
    with LoggedRegistry.start(tmp_path_factory.mktemp("b1-open-registry")) as running:
        yield running


def test_a_registry_toc_is_one_request_whatever_the_read_size(logged_registry: LoggedRegistry,
                                                                tmp_path: Path) -> None:
    digest = sha256_digest(BLOB.data)
    with RegistryClient() as client:
        ref = ImageReference.parse(f"{logged_registry.host}/b1/open")
        client.put_blob(ref, digest, BLOB.data)
        client_ref = client.blob(ref, digest, len(BLOB.data))
        mark = logged_registry.mark()
        footer = read_footer(client_ref)
        limits = TocLimits(read_size=PIECE)  # the TOC is many times this
        assert footer.toc_length > 4 * PIECE
        layer = Layer.open(LayerSource(client_ref, BLOB.toc_digest), tmp_path, limits=limits)
        try:
            fetched = logged_registry.fetched_since(mark, "b1/open")
            # footer (read twice: above and by the open) + the TOC in one ranged GET
            assert fetched.blob_requests == 3
            assert layer.read("d5/file-00005-39595", 0, 100) == BLOB.files["d5/file-00005-39595"]
        finally:
            layer.close()


@pytest.mark.parametrize("raw", ["./", "./etc/", "./etc/passwd", "./usr/lib/x86_64-linux-gnu/libc.so.6",
                                 "./.hidden", "./a/.b", "./a//b", "./a/./b/", ".//x", "./x/", "./ü/n",
                                 "./" + "n" * 255, "./" + "n" * 256, "etc/passwd", "./x.", "./.wh..wh..opq"])
def test_tar_style_names_parse_as_normalize_name_cleans_them(raw: str) -> None:
    # The parser's fast path for "./NAME" must agree with normalize_name, entry by entry.
    import json

    from crfs_worker.toc import TocParser, normalize_name

    typ = "dir" if raw.endswith("/") else "reg"
    doc = {"version": 1, "entries": [{"name": raw, "type": typ, "mode": 0o755}]}
    try:
        expected = normalize_name(raw)
    except ValueError:
        expected = None
    parser = TocParser([json.dumps(doc).encode()])
    if expected is None or (expected == "" and typ != "dir"):
        with pytest.raises(Exception):
            list(parser.entries())
        return
    assert [e.name for e in parser.entries()] == [expected]
