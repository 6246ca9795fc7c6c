"""What a provider is doing, for the person running it: one live line on a terminal, and
DATA_DIR/status.json for `provider status` (and any script) to read.

`ProviderStats` holds the counters; the provider's threads update it through its methods (each
takes the lock). `StatusWriter` rewrites status.json atomically (temporary file, fsync, rename)
every `interval_s` from its own thread, and redraws the `StatusLine` if one is given. `StatusLine`
keeps one line on a TTY (carriage return, clear to end of line) and does nothing elsewhere, so
logs and pipes (the LocalPool reads stdout) stay clean.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

STATUS_FILE = "status.json"
WRITE_INTERVAL_S = 1.0
MAX_STATUS_BYTES = 64 * 1024
STALE_AFTER_S = 5.0  # `provider status` calls a file older than this stale (the provider is not running)
FIELDS = ("peer", "state", "stages", "tokens_processed", "steps", "credits_earned_units", "reputation",
          "audits_done", "retained_requests", "retained_bytes", "updated_ms")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class ProviderStats:
    peer: str = ""
    # starting | newcomer | serving | idle | reconnecting | leaving | stopped (what the provider knows)
    state: str = "starting"
    stages: list[list[int]] = field(default_factory=list)  # [start, end) served now
    tokens_processed: int = 0  # token positions run through this provider's layers
    steps: int = 0
    credits_earned_units: int = 0
    reputation: int = 0
    audits_done: int = 0  # audits this provider ran as a verifier
    retained_requests: int = 0  # requests whose tensors it keeps for an audit drawn on them
    retained_bytes: int = 0
    updated_ms: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    # -- updates (any thread) -------------------------------------------------------------

    def add_step(self, tokens: int) -> None:
        """One step served: `tokens` positions (prompt tokens for a prefill, one per session for a decode)."""
        with self._lock:
            self.steps += 1
            self.tokens_processed += int(tokens)
            self.updated_ms = _now_ms()

    def add_audit(self, credits_units: int = 0) -> None:
        with self._lock:
            self.audits_done += 1
            self.credits_earned_units += int(credits_units)
            self.updated_ms = _now_ms()

    def add_credits(self, units: int) -> None:
        with self._lock:
            self.credits_earned_units += int(units)
            self.updated_ms = _now_ms()

    def update(self, **values) -> None:
        """Set fields by name: state, stages, reputation, credits_earned_units (as the ledger says), peer."""
        unknown = set(values) - set(FIELDS)
        if unknown:
            raise TypeError(f"ProviderStats has no field {sorted(unknown)}")
        with self._lock:
            for name, value in values.items():
                setattr(self, name, [list(map(int, s)) for s in value] if name == "stages" else value)
            self.updated_ms = _now_ms()

    def add_stage(self, start: int, end: int) -> None:
        with self._lock:
            if [start, end] not in self.stages:
                self.stages = self.stages + [[int(start), int(end)]]
            self.updated_ms = _now_ms()

    def remove_stage(self, start: int, end: int) -> None:
        with self._lock:
            self.stages = [s for s in self.stages if s != [start, end]]
            self.updated_ms = _now_ms()

    # -- reading --------------------------------------------------------------------------

    def to_dict(self) -> dict:
        with self._lock:
            data = {name: getattr(self, name) for name in FIELDS}
            data["stages"] = [list(s) for s in self.stages]
            return data

    @classmethod
    def from_dict(cls, data: dict) -> "ProviderStats":
        return cls(**{name: data[name] for name in FIELDS if name in data})

    def line(self) -> str:
        """The one-line summary: `serving [0, 12) · 1,234 tokens · 56 steps · 789 credits · 3 audits`."""
        d = self.to_dict()
        stages = " ".join(f"[{a}, {b})" for a, b in d["stages"]) or "no stage"
        return (f"{d['state']} {stages} · {d['tokens_processed']:,} tokens · {d['steps']:,} steps · "
                f"{d['credits_earned_units']:,} credits · reputation {d['reputation']} · "
                f"{d['audits_done']:,} audits")


def write_status(data_dir: str | os.PathLike, stats: ProviderStats) -> Path:
    """Write DATA_DIR/status.json atomically: readers see the old file or the new one, never half."""
    path = Path(data_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
    data = json.dumps(stats.to_dict(), sort_keys=True).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_status(data_dir: str | os.PathLike) -> dict:
    """status.json as a dict, plus `age_s` and `running` (updated within STALE_AFTER_S).
    Raises FileNotFoundError if the provider never ran there, ValueError if the file is bad."""
    path = Path(data_dir) / STATUS_FILE
    raw = path.read_bytes()[:MAX_STATUS_BYTES + 1]
    if len(raw) > MAX_STATUS_BYTES:
        raise ValueError(f"{path} is over {MAX_STATUS_BYTES} bytes")
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    age_s = max(0.0, (_now_ms() - int(data.get("updated_ms", 0) or 0)) / 1000)
    mtime_age_s = max(0.0, time.time() - path.stat().st_mtime)  # rewritten every second while running
    return {**{name: data.get(name) for name in FIELDS}, "age_s": round(age_s, 1),
            "running": mtime_age_s < STALE_AFTER_S}


class StatusLine:
    """One line on a terminal, redrawn in place; a no-op when the stream is not a TTY."""

    def __init__(self, stream: TextIO | None = None, width: int | None = None):
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.enabled = bool(self.stream.isatty())
        except (AttributeError, ValueError):
            self.enabled = False
        self.width = width
        self._lock = threading.Lock()
        self._shown = False

    def _columns(self) -> int:
        if self.width:
            return self.width
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, AttributeError, ValueError):
            return 120

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        text = text.replace("\n", " ")[: max(10, self._columns() - 1)]
        with self._lock:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
            self._shown = True

    def update(self, stats: ProviderStats) -> None:
        self.show(stats.line())

    def log_filter(self, _record) -> bool:
        """A logging filter that erases the line before a log record is printed (the next tick
        redraws it): `for h in logging.getLogger().handlers: h.addFilter(line.log_filter)`."""
        self.clear()
        return True

    def clear(self) -> None:
        """Erase the line (before printing something else, and at exit)."""
        if not self.enabled:
            return
        with self._lock:
            if self._shown:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
                self._shown = False


class StatusWriter:
    """A daemon thread: every `interval_s`, status.json and the status line; once more at stop()."""

    def __init__(self, data_dir: str | os.PathLike, stats: ProviderStats, line: StatusLine | None = None,
                 interval_s: float = WRITE_INTERVAL_S):
        self.data_dir, self.stats, self.line, self.interval_s = Path(data_dir), stats, line, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="provider-status", daemon=True)

    def start(self) -> "StatusWriter":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.tick()
        self._thread.start()
        return self

    def tick(self) -> None:
        try:
            write_status(self.data_dir, self.stats)
        except OSError as exc:  # a full disk must not stop the provider
            print(f"provider: cannot write {self.data_dir / STATUS_FILE}: {exc}", file=sys.stderr)
        if self.line is not None:
            self.line.update(self.stats)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.tick()

    def stop(self, final_state: str | None = "stopped") -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if final_state:
            self.stats.update(state=final_state)
        self.tick()
        if self.line is not None:
            self.line.clear()
