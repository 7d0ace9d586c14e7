"""Platform facts: the fast BLAS on Linux, the compute dtype and Metal availability.

MLX's Linux CPU wheel links the reference BLAS. Preloading a system OpenBLAS makes its
float32 matrix products about 25 times faster with identical results, so the command-line
entry point re-executes itself with `LD_PRELOAD` when one is installed. Set
`LIEQ_NO_OPENBLAS=1` to turn that off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx

NO_OPENBLAS_ENV = "LIEQ_NO_OPENBLAS"
_REEXEC_MARK = "LIEQ_OPENBLAS_REEXEC"

# Debian and Ubuntu paths of the pthread build (package libopenblas0-pthread), then the
# generic alternatives link.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)


def find_openblas() -> str | None:
    """Return the path of a system OpenBLAS library, or None when none is installed."""
    for candidate in OPENBLAS_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    return None


def openblas_wanted() -> bool:
    return sys.platform.startswith("linux") and os.environ.get(NO_OPENBLAS_ENV, "") in ("", "0")


def reexec_with_openblas(argv: list[str] | None = None) -> None:
    """Re-execute the current process with OpenBLAS preloaded, when that helps.

    Does nothing off Linux, when disabled, when no OpenBLAS is installed, or when the
    library is already loaded. The environment mark stops a second re-execution.
    """
    if not openblas_wanted() or os.environ.get(_REEXEC_MARK):
        return
    library = find_openblas()
    if library is None or blas_in_use() == "openblas":
        return
    env = dict(os.environ)
    preload = env.get("LD_PRELOAD", "")
    env["LD_PRELOAD"] = f"{library}:{preload}" if preload else library
    env[_REEXEC_MARK] = "1"
    # sys.orig_argv keeps interpreter options such as `-m module`, which sys.argv drops.
    args = argv if argv is not None else sys.orig_argv[1:]
    os.execve(sys.executable, [sys.executable, *args], env)


def loaded_libraries() -> list[str]:
    """Paths of the shared libraries mapped into this process (Linux only)."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return []
    paths = set()
    for line in maps.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[5].startswith("/"):
            paths.add(parts[5])
    return sorted(paths)


def blas_in_use() -> str:
    """Name the BLAS that MLX's CPU backend calls: openblas, accelerate or reference."""
    if sys.platform == "darwin":
        return "accelerate"
    names = [Path(p).name for p in loaded_libraries()]
    if any(n.startswith("libopenblas") for n in names):
        return "openblas"
    return "reference"


def metal_available() -> bool:
    """True when MLX can run Metal kernels on this machine."""
    try:
        return bool(mx.metal.is_available())
    except (AttributeError, RuntimeError):
        return False


def compute_dtype() -> mx.Dtype:
    """Return the dtype to compute in: float32 on the CPU, float16 on a Metal GPU.

    float16 matrix products are about 100 times slower than float32 on MLX's CPU backend.
    """
    return mx.float16 if metal_available() else mx.float32


def device_name() -> str:
    if metal_available():
        info = mx.metal.device_info() if hasattr(mx.metal, "device_info") else {}
        return f"gpu ({info.get('device_name', 'Metal')})"
    return "cpu"
