"""Unexpected exceptions the coordinator survived: each is logged with its traceback where it was
caught and counted here, by where, for /metrics (`meshpool_unexpected_errors_total{where}`)."""

from __future__ import annotations

import logging
import threading
from collections import Counter

log = logging.getLogger("meshpool.coordinator")

_lock = threading.Lock()
_counts: Counter[str] = Counter()


def record(where: str) -> None:
    """Call from an `except` block: logs the exception being handled and counts it."""
    log.exception("unexpected error in %s", where)
    with _lock:
        _counts[where] += 1


def counts() -> dict[str, int]:
    with _lock:
        return dict(_counts)
