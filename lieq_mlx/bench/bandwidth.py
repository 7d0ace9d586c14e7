"""Memory bandwidth for the decode bound: Apple's published figure, or a measured copy.

On Apple Silicon the chip is read from `sysctl -n machdep.cpu.brand_string` and looked up
in `APPLE_BANDWIDTH_GB_S`. Elsewhere, or for a chip missing from the table, MLX measures
it on a large array. The result is the higher of the read rate (a sum) and the copy rate
(bytes read plus bytes written, divided by the time), each the best of a few runs.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

# Unified memory bandwidth in GB/s (10^9 bytes per second) as Apple publishes it in each
# Mac's tech specs. Reported on the pages checked for this table:
# - M1 Pro 200, M1 Max 400: Apple's October 2021 announcement, as quoted by
#   https://9to5mac.com/2021/10/18/apple-unveils-next-generation-m1-pro-and-m1-max-chips-for-new-macs/
# - M3 Pro 150, M3 Max 300 (14-core CPU, 30-core GPU) or 400 (16-core CPU, 40-core GPU):
#   Apple's MacBook Pro tech specs, as quoted by
#   https://www.macrumors.com/2023/10/31/apple-m3-pro-less-memory-bandwidth/
# - M4 Max 546 (16-core CPU), M4 Pro 273: https://www.macrumors.com/2024/10/30/apple-announces-m4-max-chip/
# - M4 Max 410 (14-core CPU, 32-core GPU), M3 Ultra 819: the March 2025 Mac Studio
#   tech specs, as quoted by https://techpowerup.com/news-tags/Mac%20Studio
# NOTE: M1 (68.25), M2 (100), M2 Pro (200), M2 Max (400), M1 Ultra and M2 Ultra (800),
# M3 (100) and M4 (120) are Apple's published figures but were not checked against a
# page while writing this table.
APPLE_BANDWIDTH_GB_S: dict[str, float] = {
    "M1": 68.25,
    "M1 Pro": 200.0,
    "M1 Max": 400.0,
    "M1 Ultra": 800.0,
    "M2": 100.0,
    "M2 Pro": 200.0,
    "M2 Max": 400.0,
    "M2 Ultra": 800.0,
    "M3": 100.0,
    "M3 Pro": 150.0,
    "M3 Max": 400.0,
    "M3 Ultra": 819.0,
    "M4": 120.0,
    "M4 Pro": 273.0,
    "M4 Max": 546.0,
}

# Binned Max chips with a 14-core CPU have fewer memory channels than the 16-core ones.
BINNED_MAX_BANDWIDTH_GB_S: dict[str, float] = {"M3 Max": 300.0, "M4 Max": 410.0}
BINNED_MAX_CPU_CORES = 14

MEASURE_BYTES = 256 * 1024 * 1024
MEASURE_REPEATS = 5

_CHIP_PATTERN = re.compile(r"\bApple (M\d+)(?: (Pro|Max|Ultra))?\b")


@dataclass(frozen=True)
class Bandwidth:
    """A memory bandwidth and the source it came from."""

    gigabytes_per_second: float
    source: str  # "Apple specification" or "measured"
    detail: str  # the chip and variant, or how it was measured


def _sysctl(name: str) -> str | None:
    try:
        result = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None


def cpu_name() -> str:
    """Return the processor's marketing name (the chip on a Mac, the CPU model on Linux)."""
    if sys.platform == "darwin":
        return _sysctl("machdep.cpu.brand_string") or "unknown Apple chip"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def parse_apple_chip(brand: str) -> str | None:
    """Return the chip name ("M3 Max") in a brand string ("Apple M3 Max"), or None."""
    match = _CHIP_PATTERN.search(brand)
    if match is None:
        return None
    return " ".join(part for part in match.groups() if part)


def apple_chip_bandwidth(chip: str, cpu_cores: int | None) -> float | None:
    """Return Apple's published bandwidth in GB/s of `chip`, or None when it is not in the table."""
    if chip in BINNED_MAX_BANDWIDTH_GB_S and cpu_cores == BINNED_MAX_CPU_CORES:
        return BINNED_MAX_BANDWIDTH_GB_S[chip]
    return APPLE_BANDWIDTH_GB_S.get(chip)


def _best_seconds(operation, source: mx.array, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        output = operation(source)
        mx.eval(output)
        best = min(best, time.perf_counter() - start)
        del output
    return best


def measure_copy_bandwidth(nbytes: int = MEASURE_BYTES, repeats: int = MEASURE_REPEATS) -> float:
    """Measure MLX copy bandwidth in GB/s: (bytes read + bytes written) / time, best of `repeats`."""
    source = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(source)
    return 2 * source.nbytes / _best_seconds(lambda x: x + 1, source, repeats) / 1e9


def measure_read_bandwidth(nbytes: int = MEASURE_BYTES, repeats: int = MEASURE_REPEATS) -> float:
    """Measure MLX read bandwidth in GB/s: bytes summed / time, best of `repeats`."""
    source = mx.ones((nbytes // 4,), dtype=mx.float32)
    mx.eval(source)
    return source.nbytes / _best_seconds(mx.sum, source, repeats) / 1e9


def memory_bandwidth() -> Bandwidth:
    """Return the chip's published bandwidth on a known Apple chip, else a measured one.

    The measured bandwidth is the higher of a read (a sum) and a copy (x + 1) of a
    256 MiB float32 array, each the best of 5 runs. A decode step mostly reads, and a copy
    on a fresh buffer also pays for page faults, so the read is usually the higher.
    """
    if sys.platform == "darwin":
        chip = parse_apple_chip(_sysctl("machdep.cpu.brand_string") or "")
        cores_text = _sysctl("hw.physicalcpu")
        cores = int(cores_text) if cores_text and cores_text.isdigit() else None
        published = apple_chip_bandwidth(chip, cores) if chip else None
        if published is not None:
            return Bandwidth(published, "Apple specification", f"{chip}, {cores}-core CPU")

    read = measure_read_bandwidth()
    copy = measure_copy_bandwidth()
    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    return Bandwidth(
        max(read, copy),
        "measured",
        f"higher of MLX read {read:.2f} GB/s (sum) and copy {copy:.2f} GB/s (x + 1, bytes read "
        f"+ written) of {MEASURE_BYTES // 2**20} MiB float32 on the {device}, best of {MEASURE_REPEATS} each",
    )
