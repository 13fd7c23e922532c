"""A randomised corruption campaign: thousands of damaged blobs, zero wrong bytes.

Each round damages one copy of a real layer blob (a flipped bit, a run of garbage, a
truncation or a zeroed range, anywhere: payload, TOC, footer), opens it and reads every
file whole. A read returns exactly the original bytes or raises VerificationError /
FormatError / UnverifiableError; anything else (wrong bytes, another exception) fails the
campaign. Blobs live in memory; an index built from the intact TOC is reused when the
damage cannot have touched the TOC (as a worker with a warm cache would), and a fresh one
is built when it may have.

Legacy stargz runs only in its documented trust modes: with the TOC digest given, and
`allow_unverified` with every file carrying a whole-file digest (files without one are
served unverified by design, so they are not part of the claim).

The seed is random per run and printed with any failure; set CRFS_CAMPAIGN_SEED to replay.
"""
from __future__ import annotations

import functools
import hashlib
import os
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from crfs_worker.errors import FormatError, UnverifiableError, VerificationError
from crfs_worker.layer import Layer, LayerSource
from tests import blobgen
from tests.blobgen import MemBlob, Spec, dir_, hardlink, reg, symlink

SEED = int(os.environ.get("CRFS_CAMPAIGN_SEED") or random.SystemRandom().randrange(2**32))
ROUNDS = 600  # per mode: 5 modes, 3000 corruptions (about 15 s)
EXPECTED = (VerificationError, FormatError, UnverifiableError)
KINDS = ("flip", "garbage", "truncate", "zeros")


def _specs() -> list[Spec]:
    rng = random.Random(5)
    small = [reg(f"lib/small{i}", rng.randbytes(rng.randrange(1, 900))) for i in range(8)]
    return [
        dir_("etc"), reg("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n" * 4),
        reg("big.bin", rng.randbytes(40_000)),
        reg("holes.bin", rng.randbytes(3000) + b"\0" * 9000 + rng.randbytes(500)),
        *small, hardlink("lib/again", "lib/small3"), symlink("bin", "lib"),
        reg("text", b"the quick brown fox " * 200),
    ]


@dataclass(frozen=True)
class Mode:
    name: str
    blob: blobgen.Blob
    toc_digest: str | None
    annotations: dict
    allow_unverified: bool


@functools.cache
def modes() -> dict[str, Mode]:
    specs = _specs()
    est = blobgen.estargz(specs, chunk_size=8 << 10, min_chunk_size=2048)  # innerOffset packing
    zc = blobgen.zstd_chunked(specs, chunk_size=4 << 10, zeros_min=1024)
    old = blobgen.zstdchunked_old(specs, chunk_size=8 << 10)
    legacy = blobgen.stargz(specs, chunk_size=8 << 10, digests=True)
    legacy_digest = "sha256:" + hashlib.sha256(legacy.toc_json).hexdigest()
    return {m.name: m for m in (
        Mode("estargz", est, est.toc_digest, est.annotations, False),
        Mode("zstd:chunked", zc, None, zc.annotations, False),  # trusted through its annotation
        Mode("zstdchunked-estargz", old, old.toc_digest, old.annotations, False),
        Mode("stargz+toc-digest", legacy, legacy_digest, {}, False),
        Mode("stargz+allow-unverified", legacy, None, {}, True),
    )}


def _toc_region(layer: Layer, size: int) -> tuple[int, int]:
    """Where damage can change what the TOC says: the TOC, what follows it, the footer."""
    return layer.footer.payload_end, size


def corrupt(data: bytes, rng: random.Random, toc_start: int) -> tuple[bytes, str, int]:
    """One random damage; returns the blob, a description and the first damaged offset."""
    kind = rng.choice(KINDS)
    # Aim a third of the damage at the (small) TOC and footer, the rest anywhere.
    if rng.random() < 0.33:
        pos = rng.randrange(toc_start, len(data))
    else:
        pos = rng.randrange(len(data))
    buf = bytearray(data)
    if kind == "flip":
        buf[pos] ^= 1 << rng.randrange(8)
        return bytes(buf), f"flip bit at {pos}", pos
    if kind == "garbage":
        n = rng.randrange(1, 65)
        buf[pos:pos + n] = rng.randbytes(n)
        return bytes(buf[:len(data)]), f"{n} garbage bytes at {pos}", pos
    if kind == "truncate":
        return bytes(buf[:pos]), f"truncate to {pos}", pos
    n = rng.randrange(1, 4097)
    buf[pos:pos + n] = bytes(len(buf[pos:pos + n]))
    return bytes(buf), f"zero {n} bytes at {pos}", pos


def _open(mode: Mode, data: bytes, index_dir: Path) -> Layer:
    source = LayerSource(MemBlob(data, f"damaged-{mode.name}"), mode.toc_digest, mode.annotations,
                         mode.allow_unverified)
    return Layer.open(source, index_dir)


@pytest.mark.parametrize("mode_name", list(modes()))
def test_damaged_blobs_never_serve_wrong_bytes(mode_name: str, tmp_path: Path) -> None:
    mode = modes()[mode_name]
    files = mode.blob.files
    rng = random.Random(f"{SEED}-{mode_name}")
    warm = tmp_path / "warm"
    with _open(mode, mode.blob.data, warm) as intact:  # the index of the intact TOC
        toc_start, _ = _toc_region(intact, len(mode.blob.data))
        for path, data in files.items():
            assert intact.read(path, 0, len(data) + 1) == data
    outcome: Counter[str] = Counter()
    for round_number in range(ROUNDS):
        damaged, what, pos = corrupt(mode.blob.data, rng, toc_start)
        case = f"seed {SEED} (CRFS_CAMPAIGN_SEED), {mode_name} round {round_number}: {what}"
        # Damage in the payload cannot change the TOC: reuse the warm index. Elsewhere a
        # fresh one is built, so that the TOC itself is read and checked.
        fresh = pos >= toc_start or len(damaged) != len(mode.blob.data)
        index_dir = Path(tempfile.mkdtemp(dir=tmp_path)) if fresh else warm
        region = "payload" if pos < toc_start else "TOC/footer"
        try:
            layer = _open(mode, damaged, index_dir)
        except EXPECTED:
            outcome[f"refused at open ({region})"] += 1
            continue
        except Exception as e:  # noqa: BLE001 (the point: nothing else may escape)
            pytest.fail(f"{case}: open raised {type(e).__name__}: {e}")
        caught = 0
        with layer:
            for path, data in files.items():
                try:
                    got = layer.read(path, 0, len(data) + 1)
                except EXPECTED:
                    caught += 1
                    continue
                except Exception as e:  # noqa: BLE001
                    pytest.fail(f"{case}: read of {path} raised {type(e).__name__}: {e}")
                assert got == data, f"{case}: WRONG BYTES served for {path}"
        outcome[f"caught at read ({region})" if caught else f"harmless ({region}, every read exact)"] += 1
    print(f"\n{mode_name}: {ROUNDS} corruptions, seed {SEED}: {dict(outcome)}")
    assert sum(outcome.values()) == ROUNDS
    # The campaign is not vacuous: damage was both refused at open and caught at read.
    assert outcome["refused at open (TOC/footer)"] > ROUNDS // 20, (SEED, outcome)
    assert outcome["caught at read (payload)"] > ROUNDS // 20, (SEED, outcome)
