"""Stage receipts on their way to the ledger.

After a request's sessions close, each stage of its last attempt sends a signed receipt
(node/stage.py). Each checked receipt of a request in flight is written to the database
(coordinator/inflight.py) before the provider is acknowledged, so that a restart can still pay on
it. The board keeps them by request id until the request settles, then hands over
those that match what the coordinator saw: the stage's provider and layer range, the number of
tokens the attempt processed, stage 0's input (the token ids sent), and each later stage's input
hash equal to its predecessor's output hash. A receipt that does not match is not paid.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict

import torch

from ledger.errors import ReceiptError
from ledger.receipts import StageReceipt
from verification.commitments import tensor_digest

log = logging.getLogger("meshpool.coordinator")

MAX_OPEN_REQUESTS = 10_000
RECEIPT_WAIT_S = 10.0


class ReceiptBoard:
    def __init__(self, max_requests: int = MAX_OPEN_REQUESTS, persist=None):
        """`persist(receipt)`: called with each checked receipt before it is kept (and acknowledged);
        what it raises refuses the receipt, so the provider is not told it arrived."""
        self.max_requests, self.persist = max_requests, persist
        self._by_request: OrderedDict[str, dict[str, StageReceipt]] = OrderedDict()
        self._cond = threading.Condition()

    def add(self, receipt: StageReceipt, from_peer: str) -> StageReceipt:
        """A receipt a provider sent (well formed: wire/messages.py decoded it); raises ReceiptError
        unless it is its own and signed by it."""
        if receipt.provider_id != from_peer:
            raise ReceiptError(f"receipt names provider {receipt.provider_id}, sent by {from_peer}")
        if not receipt.signature_valid():
            raise ReceiptError("bad receipt signature")
        if self.persist is not None:
            try:
                self.persist(receipt)
            except Exception as exc:  # not stored (the database): then not acknowledged either
                log.error("request %s: receipt from %s not stored: %r", receipt.request_id, from_peer, exc)
                raise ReceiptError("the coordinator could not store the receipt") from exc
        with self._cond:
            held = self._by_request.setdefault(receipt.request_id, {})
            held[from_peer] = receipt
            self._by_request.move_to_end(receipt.request_id)
            while len(self._by_request) > self.max_requests:  # receipts nobody settles do not pile up
                self._by_request.popitem(last=False)
            self._cond.notify_all()
        return receipt

    def collect(self, request, model: str, timeout_s: float = RECEIPT_WAIT_S) -> list[StageReceipt]:
        """Wait (up to `timeout_s`) for a receipt from every stage of the last attempt of `request`
        (a GenerationRequest), then return those that check out, in stage order."""
        request_id, stages = request.request_id, request.stages
        peers = {stage.peer_id for stage in stages}
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not peers <= set(self._by_request.get(request_id, {})):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            got = self._by_request.pop(request_id, {})
        # read after the wait: the stages sign only once the driver has closed the session
        tokens_processed = request.tokens_processed
        if not tokens_processed:
            return []
        ids = (request.prompt_ids + request.tokens)[:tokens_processed]
        paid, expected_input = [], tensor_digest([torch.tensor(ids, dtype=torch.int64)])
        for index, stage in enumerate(stages):
            peer, start, end = stage.peer_id, stage.start, stage.end
            r = got.get(peer)
            if r is None:
                log.warning("request %s: no receipt from stage %d (%s)", request_id, index, peer)
                break
            checks = (("model", r.model == model), ("layers", (r.layer_start, r.layer_end) == (start, end)),
                      ("token count", r.token_count == tokens_processed), ("input hash", r.input_hash == expected_input),
                      ("dtype", not stage.dtype or r.dtype == stage.dtype))
            wrong = [name for name, ok in checks if not ok]
            if wrong:
                # An input hash unlike the predecessor's output hash means one of the two retained
                # something other than what crossed the wire; neither can be told right, neither is paid.
                log.warning("request %s: receipt of stage %d (%s) disagrees on %s", request_id, index, peer,
                            ", ".join(wrong))
                if "input hash" in wrong and paid:
                    paid.pop()
                break
            paid.append(r)
            expected_input = r.output_hash
        return paid
