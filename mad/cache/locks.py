"""Locks that keep two extractions from writing one local store.

flock, not pid files: the kernel drops a lock when its process dies, SIGKILL included.
Remote stores (URLs) have no locks: one writer per shard block is the caller's contract.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from mad.cache.store import StoreError, is_url


class StoreLocks:
    """flock-based locks on a local store for the length of a run.

    A whole-store run holds `.mad-lock` exclusively; a slice of a sharded run holds
    it shared plus `.mad-lock-I-of-N` exclusively, so slices run side by side but
    never beside a whole-store run or a twin of themselves. Creating or extending
    the store happens under `.mad-create`, one process at a time.
    """

    def __init__(self, out: str, index: int = 0, count: int = 1):
        self.out, self.files = out, []
        if is_url(out):
            return
        Path(out).mkdir(parents=True, exist_ok=True)
        if count == 1:
            self._take(".mad-lock", exclusive=True)
        else:
            self._take(".mad-lock", exclusive=False)
            self._take(f".mad-lock-{index}-of-{count}", exclusive=True)

    def _take(self, name: str, exclusive: bool, wait: bool = False):
        import fcntl

        file = open(Path(self.out) / name, "a+")
        mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB)
        try:
            fcntl.flock(file, mode)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            self.release()
            raise StoreError(f"{self.out}: another extraction is writing to this store ({holder}); "
                             "wait for it to finish or use another --out") from None
        if exclusive:
            file.seek(0)
            file.truncate()
            file.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
            file.flush()
        self.files.append(file)
        return file

    @contextlib.contextmanager
    def creating(self):
        """A context in which this process alone creates or extends the store."""
        if is_url(self.out):
            yield
            return
        file = self._take(".mad-create", exclusive=True, wait=True)
        try:
            yield
        finally:
            self.files.remove(file)
            file.close()

    def release(self) -> None:
        for file in self.files:
            file.close()  # closing drops the flock
        self.files = []
