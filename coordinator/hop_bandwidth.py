"""Hop bandwidth, measured: the coordinator has each provider time its hop to each other one.

The planner prices a hop by latency and bandwidth (coordinator/planner/cost.py). Latency comes from
the coordinator's own timing (round trips, steps); bandwidth came from a default until measured. This
thread asks provider A, for each pair of providers that may be given stages, to time a transfer to B
on the path A's stage frames to B would take (a `LinkTest`, node/link_test.py), and records the
result (coordinator/measurements.py), so the planner prices that hop at what it measured and /pool
shows it under each provider's `links`. A pair is tested as soon as both may serve, and again every
RETEST_S; at most PAIRS_PER_ROUND a round, and none starts while an admission probe runs (each would
slow the other's timing). Bounded: PAYLOAD_BYTES a transfer, TRANSFERS transfers, TEST_TIMEOUT_S a test.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from coordinator.background import BackgroundLoop
from coordinator.measurements import Measurements
from coordinator.registry import Registry
from node.transport import TransportError
from wire.messages import LinkMeasured, LinkTest, Message

log = logging.getLogger("meshpool.coordinator")

PAYLOAD_BYTES = 1 << 20  # a prefill step's hidden states for a few hundred tokens of a small model
TRANSFERS = 3  # the least of three: one transfer that met a busy thread says little
ROUND_INTERVAL_S = 2.0
RETEST_S = 120.0  # links change slowly; a test costs both ends a little CPU and PAYLOAD_BYTES x TRANSFERS
PAIRS_PER_ROUND = 4
TEST_TIMEOUT_S = 30.0  # the provider's own bound is 20 s (node/link_test.py), plus the round trip
FAILED_RETRY_S = 30.0  # a pair whose test failed (a provider that cannot dial the other, say) waits this long


class HopProber(BackgroundLoop):
    """`ask(peer, message, timeout_s)` sends one message on the assign protocol and returns the decoded
    answer (raising on transport errors); `quiet` is held while admission probes are timed."""

    def __init__(self, ask: Callable[[str, Message, float], Message], registry: Registry, measurements: Measurements,
                 quiet: threading.Lock, clock: Callable[[], float] = time.monotonic,
                 interval_s: float = ROUND_INTERVAL_S):
        self.ask, self.registry, self.measurements, self.quiet = ask, registry, measurements, quiet
        self.clock, self.interval_s = clock, interval_s
        self._failed: dict[tuple[str, str], float] = {}  # pair -> when its test last failed
        super().__init__("hop-prober", TEST_TIMEOUT_S)

    def due(self) -> list[tuple[str, str]]:
        """Pairs to test now, never tested first, then the longest untested; at most PAIRS_PER_ROUND."""
        now = self.clock()
        peers = sorted(r.peer for r in self.registry.candidates())
        ages = []
        for a in peers:
            for b in peers:
                if a != b and now - self._failed.get((a, b), -FAILED_RETRY_S) >= FAILED_RETRY_S:
                    at = self.measurements.hop_measured_s(a, b)
                    if at is None or now - at >= RETEST_S:
                        ages.append((float("inf") if at is None else now - at, a, b))
        ages.sort(key=lambda x: -x[0])
        if len(self._failed) > 4 * len(peers) ** 2:  # bounded: forget failures of providers long gone
            self._failed = {pair: at for pair, at in self._failed.items() if now - at < FAILED_RETRY_S}
        return [(a, b) for _, a, b in ages[:PAIRS_PER_ROUND]]

    def test(self, sender: str, receiver: str) -> float | None:
        """Have `sender` time its hop to `receiver`; the bandwidth recorded (Gbit/s), or None."""
        record = self.registry.get(receiver)
        if record is None:
            return None
        try:
            answer = self.ask(sender, LinkTest(receiver, tuple(record.addrs), PAYLOAD_BYTES, TRANSFERS),
                              TEST_TIMEOUT_S)
        except (TransportError, OSError, ValueError) as exc:  # unreachable, malformed answers
            log.info("link test %s -> %s: %s", sender, receiver, exc)
            return None
        if not isinstance(answer, LinkMeasured) or answer.peer != receiver:
            log.info("link test %s -> %s not measured: %s", sender, receiver, getattr(answer, "reason", answer.TYPE))
            return None
        gbps = self.measurements.record_hop(sender, receiver, answer.payload_bytes, answer.rtt_ms,
                                            answer.transfer_ms, answer.path, self.clock())
        log.info("hop %s -> %s: %.3g Gbit/s (%d bytes in %.2f ms, round trip %.2f ms, on the %s)", sender, receiver,
                 gbps, answer.payload_bytes, answer.transfer_ms, answer.rtt_ms, answer.path)
        return gbps

    def round(self) -> int:
        """Test the pairs due; how many were."""
        done = 0
        for a, b in self.due():
            # not while a probe is timed; the lock is not held through the test, though: a test of a hop
            # to a provider that just died may wait out its timeouts, and admissions must not wait for it
            if self._stop.is_set() or not self.quiet.acquire(timeout=self.interval_s):
                break
            self.quiet.release()
            if self.test(a, b) is None:
                self._failed[(a, b)] = self.clock()
            else:
                self._failed.pop((a, b), None)
                done += 1
        return done

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.round()
            except Exception:  # keep measuring whatever one round met
                log.exception("link test round failed")
