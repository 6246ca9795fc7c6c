"""One peer id serves from one process: an exclusive lock on a file beside the key.

Two processes with one key would be one peer to everybody else: libp2p picks either connection for
a stream, so steps meant for one land in the other and wait for a timeout. The second process that
tries to serve from a data directory is therefore refused before it dials anyone. The lock is
`flock(LOCK_EX | LOCK_NB)`, held for the process's life and released by the kernel however the
process ends (kill -9 included), so a restart never finds a stale lock. The file names the pid that
holds it, for the error message only.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = "serving.lock"


class AlreadyServing(RuntimeError):
    """Another live process holds this data directory's key."""


class InstanceLock:
    def __init__(self, data_dir: str | os.PathLike[str]):
        self.path = Path(data_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> "InstanceLock":
        """Take the lock or raise AlreadyServing naming the holder's pid."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyServing(f"another process (pid {holder}) already serves with the key in "
                                 f"{self.path.parent}; one peer id serves from one process") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
