"""Intra-op threads for a CPU step, chosen by the step's size.

A decode step of a few rows is a chain of matrix-vector products: bound by memory bandwidth,
which one core streams nearly as fast as two. Each op torch splits over threads ends at a
barrier, and where other processes share the cores the second thread is often descheduled; the
barrier then waits out a scheduler timeslice (milliseconds), hundreds of times a step. Measured
on this project's 2-core machine under load (bench/cpu_decode.py): batch-1 decode of the default
model several times slower on two threads than on one. So small steps run on one thread; larger
ones (prefill, wide batches), where the second core does real work, keep torch's setting.
Serving processes also hand the GIL between their threads sooner than Python's default
(`serve_switch_interval`).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

import torch

# rows (sessions x new tokens) up to which a CPU step runs on one thread
SINGLE_THREAD_MAX_ROWS = 4
# How long a thread keeps the GIL while another waits for it. A stage's eager step (a prompt's rows:
# hundreds of torch ops and kernel launches, each letting the GIL go and taking it back) can wait this
# long at each op while the frame and sealing threads run Python. One stage on an H200, 8B, 8 / 32
# clients, one device call: prefill steps 48.9 / 53.7 ms with Python's 5 ms, 37.7 / 44.0 ms with this,
# 601 / 897 -> 699 / 1,069 tok/s (decode steps replay CUDA graphs: a few handoffs each).
SWITCH_INTERVAL_S = 0.0005


def serve_switch_interval() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)


@contextmanager
def threads_for_step(n_rows: int, device: torch.device):
    """Run the body on one intra-op thread if it is a small CPU step; else leave threads alone.
    torch's setting belongs to the calling thread (OpenMP's and MKL's are per thread), so steps
    in other threads neither see nor undo it."""
    if device.type != "cpu" or n_rows > SINGLE_THREAD_MAX_ROWS:
        yield
        return
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)
