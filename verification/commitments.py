"""What a stage commits to in its receipt: digests of the tensors it took and sent, as they travel."""

from __future__ import annotations

import hashlib

import torch

from wire.frames import DTYPES

_DTYPE_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}


def tensor_digest(tensors: list[torch.Tensor]) -> str:
    """Hex SHA-256 of tensors as they travel: dtype name, shape, then the raw little-endian bytes."""
    h = hashlib.sha256(b"meshpool-tensors/1\x00")
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(_header(t))
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of a large trace
    return h.hexdigest()


def trace_digest(trace: torch.Tensor) -> str:
    """The layer trace's commitment (a receipt's `layers_hash`): SHA-256 over its dtype and shape and the
    `tensor_digest` of each of its rows (the input, then each layer's updates). The rows are hashed in
    the calling thread: a provider seals several requests at once on its sealer threads (node/sealer.py),
    and fanning one trace's rows out to more threads made every hand-off of the GIL a wait for the
    serving thread (H200, 8B, batch-32 decode steps while requests were sealed, bench/seal_contention.py:
    10.1 ms a step with the rows on 8 threads, 6.8 ms in the sealer's thread, 5.8 ms with no sealing)."""
    trace = trace.detach().to("cpu").contiguous()
    h = hashlib.sha256(b"meshpool-trace/2\x00")
    h.update(_header(trace))
    for row in trace:
        h.update(bytes.fromhex(tensor_digest([row])))
    return h.hexdigest()


def trace_matches(trace: torch.Tensor, layers_hash: str) -> bool:
    """Whether `layers_hash` commits to `trace`: as `trace_digest`, or as one `tensor_digest` of the
    whole trace (receipts signed before the rows were hashed apart). Both bind the same bytes."""
    return trace_digest(trace) == layers_hash or tensor_digest([trace]) == layers_hash


def _header(t: torch.Tensor) -> bytes:
    """What a digest takes of a tensor before its bytes: its dtype's wire name and its shape."""
    return f"{_DTYPE_NAMES[t.dtype]}{list(t.shape)}\x00".encode()
