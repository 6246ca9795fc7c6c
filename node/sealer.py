"""Sealing closed sessions off the serving thread.

When a request ends, each stage hashes everything it recorded of it, its layer trace included, for
the receipt it signs (node/stage.py `seal`). On a GPU stage that trace is tens of MB a request (the
8B shape: 65 rows of 4,096 bfloat16 values a token): copying and hashing it took ~85 ms a request,
and done where steps are served it stalled every running stream for that long (46 % of the serving
thread at 32 clients on an H200). Here it runs on a few worker threads (the copy and the hashing
release the GIL; each trace goes through pinned memory and is hashed in its worker's thread, or it
still slowed the serving steps 4x: node/stage.py `_off_device`), and the receipts go to the
coordinator from there: those sealed while a send is under way go together in the next one. Each
send is a request on its own libp2p stream, and taking new streams was about a third of a busy
coordinator's trio thread (py-spy, two stages on an H200 at 32 clients, each request's receipts sent
apart from each stage).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ledger.receipts import StageReceipt
from node.stage import StageWorker, Unsealed
from wire.messages import MAX_RECEIPTS_PER_FRAME

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
        self._lock = threading.Lock()
        self._outbox: list[StageReceipt] = []  # sealed, not yet sent
        self._sending = False  # a thread is sending: it also sends what comes meanwhile

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
        except Exception:  # a bug: its requests go unpaid on this stage, serving goes on
            log.exception("sealing %d request(s) failed", len(unsealed))
            return
        finally:
            self.slots.release()  # the traces are hashed: their memory may go
        self._send(receipts)

    def _send(self, receipts: list[StageReceipt]) -> None:
        """Send `receipts`, or leave them to the thread sending now: it sends until the outbox is empty."""
        with self._lock:
            self._outbox.extend(receipts)
            if self._sending:
                return
            self._sending = True
        while True:
            with self._lock:
                batch = self._outbox[:MAX_RECEIPTS_PER_FRAME]
                del self._outbox[:MAX_RECEIPTS_PER_FRAME]
                if not batch:
                    self._sending = False
                    return
            try:
                self.send_receipts(batch)
            except Exception:  # a bug: these requests go unpaid on this stage, the rest still go
                log.exception("sending %d receipt(s) failed", len(batch))

    @property
    def unsent(self) -> int:
        """Receipts sealed and waiting for the send under way."""
        with self._lock:
            return len(self._outbox)

    def shutdown(self) -> None:
        """Seal what was released (and send its receipts) before returning."""
        self.pool.shutdown(wait=True)
