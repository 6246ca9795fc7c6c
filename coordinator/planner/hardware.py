"""Providers and the links between them, as the planner sees them: measured figures, no I/O."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

COORDINATOR = "coordinator"  # the peer id links to and from the coordinator are keyed by


@dataclass(frozen=True)
class ProviderSpec:
    peer_id: str
    memory_bytes: int  # what the provider lets the planner fill: weights + KV cache
    mem_bandwidth_gb_per_s: float  # measured, 1 GB = 1e9 bytes
    matmul_tflops: float  # measured dense matmul rate in the serving dtype
    # bytes of one weight and one KV-cache element in the precision it serves in (bfloat16 2, float32 4);
    # None: the model shape's own figures
    dtype_bytes: int | None = None
    # measured time a step takes on this provider whatever its layers (taking the step in, launching it,
    # handing its output on): a roofline of a few fast layers leaves it out. 0 for a claim.
    step_overhead_ms: float = 0.0

    def __post_init__(self):
        if not self.peer_id or self.peer_id == COORDINATOR:
            raise ValueError(f"bad provider peer id {self.peer_id!r}")
        if self.memory_bytes < 0:
            raise ValueError(f"{self.peer_id}: memory_bytes must be >= 0, got {self.memory_bytes}")
        if self.dtype_bytes is not None and self.dtype_bytes not in (1, 2, 4, 8):
            raise ValueError(f"{self.peer_id}: dtype_bytes must be 1, 2, 4 or 8, got {self.dtype_bytes!r}")
        for name in ("mem_bandwidth_gb_per_s", "matmul_tflops"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{self.peer_id}: {name} must be a positive number, got {value!r}")
        if not (math.isfinite(self.step_overhead_ms) and self.step_overhead_ms >= 0):
            raise ValueError(f"{self.peer_id}: step_overhead_ms must be >= 0, got {self.step_overhead_ms!r}")


@dataclass(frozen=True)
class Link:
    latency_ms: float  # one way
    bandwidth_gbps: float  # Gbit/s

    def __post_init__(self):
        if not (self.latency_ms >= 0 and math.isfinite(self.latency_ms)):
            raise ValueError(f"link latency_ms must be >= 0, got {self.latency_ms!r}")
        if not (self.bandwidth_gbps > 0 and math.isfinite(self.bandwidth_gbps)):
            raise ValueError(f"link bandwidth_gbps must be > 0, got {self.bandwidth_gbps!r}")

    def transfer_s(self, n_bytes: float) -> float:
        """Time the link is busy sending `n_bytes` (without the latency)."""
        return n_bytes * 8 / (self.bandwidth_gbps * 1e9)

    def time_s(self, n_bytes: float) -> float:
        return self.latency_ms * 1e-3 + self.transfer_s(n_bytes)


@dataclass(frozen=True)
class Links:
    """Measured links between peers (symmetric), with a default for pairs not measured yet.

    Keys are (peer_a, peer_b) tuples; the coordinator is `COORDINATOR`.
    """

    default: Link
    pairs: Mapping[tuple[str, str], Link] = field(default_factory=dict)

    def between(self, a: str, b: str) -> Link:
        link = self.pairs.get((a, b))
        if link is None:
            link = self.pairs.get((b, a), self.default)
        return link


class ProfileError(ValueError):
    """A hardware profile the planner cannot turn into a provider."""


MAX_PROFILE_DEPTH = 16  # a profile is a few levels deep: host, devices, one device's figures


def _check_finite(peer_id: str, value, where: str = "profile", depth: int = 0) -> None:
    """Every number anywhere in the profile is finite: a NaN or an infinity is refused at
    registration, so it can never reach the planner, the dashboard or /pool."""
    if depth > MAX_PROFILE_DEPTH:
        raise ProfileError(f"{peer_id}: profile nested deeper than {MAX_PROFILE_DEPTH} levels")
    if isinstance(value, float) and not math.isfinite(value):
        raise ProfileError(f"{peer_id}: {where} must be a finite number, got {value!r}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(peer_id, item, f"{where}.{str(key)[:40]}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_finite(peer_id, item, f"{where}[{i}]", depth + 1)


def provider_spec_from_profile(peer_id: str, profile: dict, max_memory_mb: int | None = None) -> ProviderSpec:
    """A ProviderSpec from the JSON-able hardware profile a provider announces.

    Uses the first device; its free memory (else total) capped by `max_memory_mb`
    (the argument, else the profile's own "max_memory_mb" key). A profile holding NaN or an
    infinity anywhere is refused, whether or not the planner reads that figure.
    """
    if not isinstance(profile, dict):
        raise ProfileError(f"{peer_id}: profile must be a JSON object, got {type(profile).__name__}")
    _check_finite(peer_id, profile)
    devices = profile.get("devices")
    if not isinstance(devices, list) or not devices or not isinstance(devices[0], dict):
        raise ProfileError(f"{peer_id}: profile lists no devices")
    device = devices[0]
    memory = device.get("memory_free_bytes", device.get("memory_total_bytes"))
    bandwidth = device.get("mem_bandwidth_gb_per_s")
    tflops = device.get("matmul_tflops")
    if not _is_int(memory) or memory <= 0:
        raise ProfileError(f"{peer_id}: device 0 memory must be a positive integer of bytes, got {memory!r}")
    for name, value in (("mem_bandwidth_gb_per_s", bandwidth), ("matmul_tflops", tflops)):
        if not _is_number(value) or value <= 0:
            raise ProfileError(f"{peer_id}: device 0 {name} must be a positive number, got {value!r}")
    cap_mb = max_memory_mb if max_memory_mb is not None else profile.get("max_memory_mb")
    if cap_mb is not None:
        if not _is_number(cap_mb) or cap_mb <= 0:
            raise ProfileError(f"{peer_id}: max_memory_mb must be a positive number, got {cap_mb!r}")
        memory = min(memory, int(cap_mb * 2**20))
    return ProviderSpec(peer_id=peer_id, memory_bytes=int(memory),
                        mem_bandwidth_gb_per_s=float(bandwidth), matmul_tflops=float(tflops))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)
