"""Sealing closed sessions off the serving thread.

When a request ends, each stage hashes everything it recorded of it, its layer trace included, for
the receipt it signs (node/stage.py `seal`). On a GPU stage that trace is tens of MB a request (the
8B shape: 65 rows of 4,096 bfloat16 values a token): copying and hashing it took ~85 ms a request,
and done where steps are served it stalled every running stream for that long (46 % of the serving
thread at 32 clients on an H200). Here it runs on a few worker threads (the copy and the hashing
release the GIL), and the receipts go to the coordinator from there.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ledger.receipts import StageReceipt
from node.stage import StageWorker, Unsealed

log = logging.getLogger("meshpool.provider")

SEAL_WORKERS = max(1, min(4, (os.cpu_count() or 2) // 2))
# requests released and not yet sealed: beyond this the serving thread waits (their traces hold device memory)
MAX_PENDING = 64


class Sealer:
    def __init__(self, send_receipts: Callable[[list[StageReceipt]], None], workers: int = SEAL_WORKERS,
                 max_pending: int = MAX_PENDING):
        self.send_receipts = send_receipts
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="sealer")
        self.slots = threading.BoundedSemaphore(max_pending)

    def submit(self, worker: StageWorker, unsealed: list[Unsealed]) -> None:
        """Seal `unsealed` and send their receipts, in the background."""
        if not unsealed:
            return
        self.slots.acquire()  # sealing fell this far behind: serving waits for it
        try:
            self.pool.submit(self._seal, worker, unsealed)
        except RuntimeError:  # shut down: leaving
            self.slots.release()

    def _seal(self, worker: StageWorker, unsealed: list[Unsealed]) -> None:
        try:
            receipts = [worker.seal(u) for u in unsealed]
            self.send_receipts(receipts)
        except Exception:  # a bug: its requests go unpaid on this stage, serving goes on
            log.exception("sealing %d request(s) failed", len(unsealed))
        finally:
            self.slots.release()

    def shutdown(self) -> None:
        """Seal what was released (and send its receipts) before returning."""
        self.pool.shutdown(wait=True)
