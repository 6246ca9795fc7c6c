"""Stages that keep failing leave the plan for a while, longer each time.

Without this a stage that refuses every step (a broken device, a bad build) is re-planned into the
same pipeline as soon as that pipeline fails, about every 100 ms, and the pool answers 503 for as
long as it stays registered. Here each pipeline failure a stage is blamed for (the `Failed` report
names the peer at fault) is a strike; after `strikes_to_bench` strikes with no step served between
them it is benched: left out of every plan for `base_s`, doubling with each bench up to `max_s`.
Back from a bench it is on probation: one more strike benches it again. Serving a step clears it.
Pure bookkeeping: the caller passes the clock.
"""

from __future__ import annotations

from dataclasses import dataclass

STRIKES_TO_BENCH = 3  # pipeline failures blamed on a peer, with no step served between, before it is benched
BENCH_BASE_S = 5.0
BENCH_MAX_S = 300.0
MAX_TRACKED_PEERS = 4096  # a bound on the table; registered providers are far fewer


@dataclass
class Strikes:
    failures: int = 0  # pipeline failures blamed on the peer since its last bench (or since it served)
    benches: int = 0  # benches since it last served: sets the next one's length
    until_s: float = 0.0  # benched until this time
    reason: str = ""  # the latest failure it was blamed for


class Backoff:
    def __init__(self, strikes_to_bench: int = STRIKES_TO_BENCH, base_s: float = BENCH_BASE_S,
                 max_s: float = BENCH_MAX_S):
        if strikes_to_bench < 1 or not 0 < base_s <= max_s:
            raise ValueError("strikes_to_bench >= 1 and 0 < base_s <= max_s")
        self.strikes_to_bench, self.base_s, self.max_s = strikes_to_bench, base_s, max_s
        self.peers: dict[str, Strikes] = {}

    def fail(self, peer: str, reason: str, now_s: float) -> float | None:
        """Count a pipeline failure blamed on `peer`; the seconds it is benched for, if this benches it."""
        if peer not in self.peers and len(self.peers) >= MAX_TRACKED_PEERS:
            return None
        strikes = self.peers.setdefault(peer, Strikes())
        strikes.failures += 1
        strikes.reason = reason
        needed = self.strikes_to_bench if strikes.benches == 0 else 1  # on probation after a bench
        if strikes.failures < needed:
            return None
        bench_s = min(self.base_s * 2 ** strikes.benches, self.max_s)
        strikes.until_s, strikes.benches, strikes.failures = now_s + bench_s, strikes.benches + 1, 0
        return bench_s

    def served(self, peer: str) -> None:
        """A pipeline with `peer` served a step: its strikes are forgiven."""
        self.peers.pop(peer, None)

    def forget(self, peer: str) -> None:
        self.peers.pop(peer, None)

    def benched(self, now_s: float) -> set[str]:
        return {peer for peer, s in self.peers.items() if s.until_s > now_s}

    def public(self, now_s: float) -> list[dict]:
        """What /pool and the dashboard show: every peer with strikes, benched or not."""
        return [{"peer": peer, "benched": s.until_s > now_s, "back_in_s": round(max(0.0, s.until_s - now_s), 1),
                 "benches": s.benches, "failures": s.failures, "reason": s.reason}
                for peer, s in sorted(self.peers.items())]
