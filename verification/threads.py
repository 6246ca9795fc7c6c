"""Worker threads for the CPU work around a step that can run beside it: drawing sampling noise
(verification/sampling.py), which releases the GIL in C, so the threads run in parallel with the
caller; no task waits on another task."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor


@functools.cache
def worker_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="verification")
