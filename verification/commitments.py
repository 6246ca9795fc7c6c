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
        h.update(f"{_DTYPE_NAMES[t.dtype]}{list(t.shape)}\x00".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of a large trace
    return h.hexdigest()
