"""Run a shard's kernels on the device its tensors live on.

CUDA's current device is per host thread and starts at cuda:0 in every thread. Triton launches a
kernel on the current device, and CUDA streams, events and graphs are made on it too, so a
provider on cuda:1 whose steps run in a transport worker thread would launch on cuda:0 against
tensors on cuda:1 ("Pointer argument cannot be accessed from Triton"). Every entry point that
launches kernels or makes streams, events or graphs enters its device first.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def device_scope(device: torch.device | str):
    """Make `device` the current CUDA device for the block; nothing on other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_own_device(method):
    """A method of an object with `.device` that runs entirely on that device."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with device_scope(self.device):
            return method(self, *args, **kwargs)

    return wrapper
