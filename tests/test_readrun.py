"""readrun.ReadRun: which reads make one sequential run (the page pusher and the fetcher's
read-ahead act only on those)."""
from __future__ import annotations

from crfs_worker.readrun import ReadRun

KIB = 1 << 10


def test_back_to_back_reads_make_one_run() -> None:
    run = ReadRun()
    assert not run.note(0, 128 * KIB, slack=0)  # the first read starts the run
    for offset in range(128 * KIB, 1024 * KIB, 128 * KIB):
        assert run.note(offset, 128 * KIB, slack=0)
    assert (run.start, run.end, run.length) == (0, 1024 * KIB, 1024 * KIB)


def test_reads_out_of_order_within_the_slack_continue_it() -> None:
    run = ReadRun()
    run.note(256 * KIB, 128 * KIB, slack=512 * KIB)
    assert run.note(0, 128 * KIB, slack=512 * KIB)        # the kernel's earlier readahead, late
    assert run.note(512 * KIB, 128 * KIB, slack=512 * KIB)  # a gap the slack covers
    assert (run.start, run.end) == (0, 640 * KIB)


def test_a_far_read_starts_a_new_run() -> None:
    run = ReadRun()
    run.note(0, 1 << 20, slack=512 * KIB)
    assert not run.note(8 << 20, 4 * KIB, slack=512 * KIB)  # a scattered read (mmap fault)
    assert (run.start, run.end) == (8 << 20, (8 << 20) + 4 * KIB)


def test_reach_lets_a_reader_skip_pages_it_already_has() -> None:
    run = ReadRun()
    run.note(0, 1 << 20, slack=0)
    assert not ReadRun(0, 1 << 20).note(5 << 20, 128 * KIB, slack=0)
    assert run.note(5 << 20, 128 * KIB, slack=0, reach=5 << 20)  # pages up to 5 MiB were pushed
    assert run.length == (5 << 20) + 128 * KIB
