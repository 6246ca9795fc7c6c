"""A coordinator service's loop on a daemon thread, from start() until stop()."""

from __future__ import annotations

import threading


class BackgroundLoop:
    """Runs the subclass's `_run` on a daemon thread named `name`; `_stop` is set once it should end,
    and stop() waits up to `join_timeout_s` (the longest one pass of the loop may block) for it."""

    def __init__(self, name: str, join_timeout_s: float):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._join_timeout_s = join_timeout_s

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=self._join_timeout_s)

    def _run(self) -> None:
        raise NotImplementedError
