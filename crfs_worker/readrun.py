"""Sequential-read detection, shared by the view's page pusher (fileview.ReadAheadPusher)
and the fetcher's read-ahead (chunkfetch.ChunkFetcher): both act only when a file is read
back to back, never on scattered reads (a loader's headers, mmap faults)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ReadRun:
    """The byte range a run of (nearly) back-to-back reads of one file covers."""

    start: int = 0
    end: int = 0

    @property
    def length(self) -> int:
        return self.end - self.start

    def note(self, offset: int, size: int, slack: int, reach: int = 0) -> bool:
        """Records a read of `size` bytes at `offset`; returns whether it continued the run
        (else it starts a new one). A read within `slack` bytes of the run continues it:
        the kernel keeps several readahead reads in flight and they arrive out of order.
        `reach` extends the run's end for that test: a reader skips over pages it already
        has (pushed into its page cache) and asks again only where they end."""
        continued = self.length > 0 and self.start - slack <= offset <= max(self.end, reach) + slack
        if continued:
            self.start, self.end = min(self.start, offset), max(self.end, offset + size)
        else:
            self.start, self.end = offset, offset + size
        return continued
