"""Measure what a provider's hardware can do: memory, memory bandwidth and matmul rate per device.

The planner places layers by these figures, so they are measured on the spot, in the dtype the
device will serve in, never looked up from a table.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass

import psutil
import torch


@dataclass(frozen=True)
class DeviceProfile:
    kind: str  # cuda, mps or cpu
    index: int
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    mem_bandwidth_gb_per_s: float  # weight bytes read per second by a decode-shaped matrix-vector product
    matmul_tflops: float
    dtype: str
    uuid: str = ""  # a GPU's own id: providers on one GPU take turns on it (coordinator/pool.py `in_flight`)


@dataclass(frozen=True)
class HostProfile:
    cpu_model: str
    cpu_cores: int
    ram_total_bytes: int
    ram_free_bytes: int


@dataclass(frozen=True)
class HardwareProfile:
    host: HostProfile
    devices: tuple[DeviceProfile, ...]

    def to_dict(self) -> dict:
        return {"host": asdict(self.host), "devices": [asdict(d) for d in self.devices]}


def serving_dtype(kind: str) -> torch.dtype:
    # CPUs lack fast half-precision matmuls; accelerators serve in bfloat16.
    return torch.float32 if kind == "cpu" else torch.bfloat16


def hardware_class(device: torch.device) -> str:
    """Devices of one class run the same kernels and land within a rounding step of each other in
    low precision, so a verifier of the stage's own class can re-run its serving recipe
    (verification/layer_compare.py SAME_RECIPE_THRESHOLDS): "<device type>/<model name>"."""
    if device.type == "cuda":
        return f"cuda/{torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return "mps/Apple GPU"
    return f"cpu/{_cpu_model()}/{torch.get_num_threads()} threads"  # the split of a sum follows the threads


def available_devices() -> list[torch.device]:
    devices = [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    if torch.backends.mps.is_available():
        devices.append(torch.device("mps"))
    return devices + [torch.device("cpu")]


def measure(devices: list[torch.device] | None = None, quick: bool = False, progress=None) -> HardwareProfile:
    """Profile the host and each device; `progress(step_name)` is called as steps finish."""
    devices = devices or available_devices()
    host = _host()
    profiles = []
    for device in devices:
        profiles.append(_device(device, host, quick, progress))
    return HardwareProfile(host=host, devices=tuple(profiles))


def _host() -> HostProfile:
    vm = psutil.virtual_memory()
    return HostProfile(
        cpu_model=_cpu_model(),
        cpu_cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        ram_total_bytes=vm.total,
        ram_free_bytes=vm.available,
    )


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device(device: torch.device, host: HostProfile, quick: bool, progress) -> DeviceProfile:
    dtype = serving_dtype(device.type)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
    elif device.type == "mps":
        total = host.ram_total_bytes  # unified memory
        free = host.ram_free_bytes
        name = "Apple GPU (MPS)"
    else:
        total, free, name = host.ram_total_bytes, host.ram_free_bytes, host.cpu_model
    bandwidth = read_bandwidth_gb_per_s(device, dtype, quick)
    if progress:
        progress(f"{device} bandwidth")
    tflops = matmul_tflops(device, dtype, quick)
    if progress:
        progress(f"{device} matmul")
    return DeviceProfile(
        kind=device.type, index=device.index or 0, name=name,
        memory_total_bytes=int(total), memory_free_bytes=int(free),
        mem_bandwidth_gb_per_s=round(bandwidth, 2), matmul_tflops=round(tflops, 4), dtype=str(dtype).removeprefix("torch."),
        uuid=str(getattr(torch.cuda.get_device_properties(device), "uuid", "")) if device.type == "cuda" else "",
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _best_time_s(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: allocation, kernel selection
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth_gb_per_s(device: torch.device, dtype: torch.dtype, quick: bool = False) -> float:
    """Weight bytes read per second by a batch-1 matrix-vector product, as a decode step reads its
    weights. On CPUs this is about half of what a plain copy suggests, so the planner uses this."""
    n_bytes = (64 if quick else 256) * 2**20 if device.type == "cpu" else 1 * 2**30
    cols = 4096
    rows = n_bytes // (cols * torch.tensor([], dtype=dtype).element_size())
    weight = torch.empty(rows, cols, dtype=dtype, device=device).fill_(0.5)
    x = torch.ones(1, cols, dtype=dtype, device=device)
    seconds = _best_time_s(lambda: torch.nn.functional.linear(x, weight), device, repeats=3 if quick else 8)
    return rows * cols * weight.element_size() / seconds / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype, quick: bool = False) -> float:
    n = (512 if quick else 1024) if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    seconds = _best_time_s(lambda: a @ b, device, repeats=3 if quick else 5)
    return 2 * n**3 / seconds / 1e12
