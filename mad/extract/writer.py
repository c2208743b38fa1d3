"""The writer thread of an extraction: collects results per shard block, writes each block once.

A Zarr shard is rewritten whole on every partial write, and two processes writing
one shard lose data, so a block of `shard_size` videos is written in one call
(`Store.write_block`, status last) when every video scheduled in it is in. A killed
run loses at most the blocks in flight.
"""

from __future__ import annotations

import queue
import threading

from mad.cache.store import Store, VideoResult


class BlockWriter:
    """Collects results per shard block; writes a block when all its scheduled videos are in."""

    def __init__(self, store: Store, scheduled: list[int]):
        self.store = store
        self.shard_size = store.shard_size
        self.expected: dict[int, int] = {}  # block -> videos scheduled in it
        for video in scheduled:
            block = video // self.shard_size
            self.expected[block] = self.expected.get(block, 0) + 1
        self.results: dict[int, list[VideoResult]] = {}
        self.queue: queue.Queue = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="mad-writer", daemon=True)
        self.thread.start()

    def put(self, result: VideoResult) -> None:
        if self.error:
            raise self.error
        self.queue.put(result)

    def close(self) -> None:
        """Write every block that has results (complete or not) and stop."""
        self.queue.put(None)
        self.thread.join()
        if self.error:
            raise self.error

    def _run(self) -> None:
        try:
            while (result := self.queue.get()) is not None:
                block = result.video // self.shard_size
                self.results.setdefault(block, []).append(result)
                if len(self.results[block]) == self.expected[block]:
                    self.store.write_block(block, self.results.pop(block))
            for block in list(self.results):
                self.store.write_block(block, self.results.pop(block))
        except BaseException as e:  # surfaced to the main thread on its next put/close
            self.error = e
