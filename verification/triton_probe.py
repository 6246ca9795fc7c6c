"""Whether Triton kernels can run here, for the node's fused kernels and verification's greedy pick
(one test, below both). Triton is optional: the CPU build of torch ships without it."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

# The Triton interpreter (TRITON_INTERPRET=1) runs the kernels on the CPU, for tests
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_usable(device: torch.device) -> bool:
    return triton is not None and (device.type == "cuda" or INTERPRET)
