"""Seeded frame faults, for chaos tests: frames dropped, delayed or duplicated as they arrive.

Off unless the process's environment holds MESHPOOL_FAULTS (or a TransportConfig is given
`faults`); when off, a received frame costs one `is None` check more. The value is

    SEED:drop=P,dup=P,delay=P,delay_ms=MS[,protocols=NAME+NAME]

e.g. `MESHPOOL_FAULTS=7:drop=0.01,dup=0.01,delay=0.05,delay_ms=200,protocols=stage+result` (`delay_ms`
without `delay` holds back every frame, each uniformly up to that long).
Each stream draws from its own RNG, seeded by the seed, the stream's protocol and its ordinal
among this node's streams of that protocol, and always draws three numbers a frame: a stream
meets the same faults at the same frames whenever the seed is the same (which frames those are
still depends on the traffic). A frame is faulted after it was read and checked, before it is
handed to whoever reads the stream, so a delay holds back the frames behind it too, as a slow
link would; a duplicate is the same frame handed over twice.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
from collections import defaultdict
from dataclasses import dataclass

ENV_VAR = "MESHPOOL_FAULTS"
PASS, DROP, DUP = "pass", "drop", "dup"
MAX_DELAY_MS = 60_000.0  # a longer delay is a partition, which kill/SIGSTOP faults model better


class FaultSpecError(ValueError):
    pass


@dataclass(frozen=True)
class FaultSpec:
    seed: int
    drop: float = 0.0  # probability a frame is dropped
    dup: float = 0.0  # probability a frame is handed over twice
    delay: float = 0.0  # probability a frame is held back, uniformly up to delay_ms
    delay_ms: float = 0.0
    protocols: tuple[str, ...] = ()  # protocol names (`stage` for /meshpool/stage/1); empty: all

    def __post_init__(self) -> None:
        for name in ("drop", "dup", "delay"):
            p = getattr(self, name)
            if not 0.0 <= p <= 1.0:
                raise FaultSpecError(f"{ENV_VAR}: {name}={p} is not a probability in [0, 1]")
        if self.drop + self.dup > 1.0:
            raise FaultSpecError(f"{ENV_VAR}: drop + dup = {self.drop + self.dup} exceeds 1")
        if not 0.0 <= self.delay_ms <= MAX_DELAY_MS:
            raise FaultSpecError(f"{ENV_VAR}: delay_ms={self.delay_ms} outside [0, {MAX_DELAY_MS:.0f}]")

    @classmethod
    def parse(cls, text: str) -> "FaultSpec":
        seed_text, _, rest = text.strip().partition(":")
        try:
            seed = int(seed_text)
        except ValueError:
            raise FaultSpecError(f"{ENV_VAR}={text!r}: expected SEED:key=value,..., the seed an integer") from None
        fields: dict = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, eq, value = item.partition("=")
            if not eq or key not in ("drop", "dup", "delay", "delay_ms", "protocols") or key in fields:
                raise FaultSpecError(f"{ENV_VAR}: {item!r} is not one of drop=, dup=, delay=, delay_ms=, protocols=")
            if key == "protocols":
                fields[key] = tuple(filter(None, value.split("+")))
                continue
            try:
                fields[key] = float(value)
            except ValueError:
                raise FaultSpecError(f"{ENV_VAR}: {key}={value!r} is not a number") from None
        if "delay_ms" in fields and "delay" not in fields:  # `delay_ms` alone: every frame, up to that long
            fields["delay"] = 1.0
        return cls(seed, **fields)

    def format(self) -> str:
        """The MESHPOOL_FAULTS value that parses back to this spec."""
        text = f"{self.seed}:drop={self.drop},dup={self.dup},delay={self.delay},delay_ms={self.delay_ms}"
        return text + (f",protocols={'+'.join(self.protocols)}" if self.protocols else "")


class StreamFaults:
    """The faults of one stream, drawn in the order its frames arrive."""

    def __init__(self, spec: FaultSpec, rng: random.Random):
        self.spec, self.rng = spec, rng

    def next(self) -> tuple[str, float]:
        """(PASS, DROP or DUP, seconds to hold the frame back first)."""
        what, late, late_ms = self.rng.random(), self.rng.random(), self.rng.random() * self.spec.delay_ms
        action = DROP if what < self.spec.drop else DUP if what < self.spec.drop + self.spec.dup else PASS
        return action, (late_ms / 1000.0 if late < self.spec.delay else 0.0)


class FrameFaults:
    """One node's faults: hands each new stream its StreamFaults (None for a protocol left alone)."""

    def __init__(self, spec: FaultSpec):
        self.spec = spec
        self._ordinals: dict[str, itertools.count] = defaultdict(itertools.count)
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "FrameFaults | None":
        text = os.environ.get(ENV_VAR, "")
        return cls(FaultSpec.parse(text)) if text.strip() else None

    def for_stream(self, protocol: str) -> StreamFaults | None:
        name = protocol.strip("/").split("/")[1] if protocol.count("/") >= 2 else protocol
        if self.spec.protocols and name not in self.spec.protocols:
            return None
        with self._lock:
            ordinal = next(self._ordinals[protocol])
        return StreamFaults(self.spec, random.Random(f"{self.spec.seed}/{protocol}/{ordinal}"))
