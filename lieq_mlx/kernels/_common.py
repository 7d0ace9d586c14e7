"""Shared parts of the 1- and 2-bit Metal kernel wrappers.

Each wrapper module plans a dispatch as a `KernelLaunch` (inputs, template parameters,
grid, threadgroup, outputs) in plain Python, then either hands that plan to
`mx.fast.metal_kernel` or, where Metal kernels are off, computes the same result with
`mx.quantized_matmul`. The test emulator in tests/emulation runs the very same plans.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import mlx.core as mx

from lieq_mlx.platform import metal_available

NO_KERNELS_ENV = "LIEQ_NO_KERNELS"

# Widths and group sizes the kernels are written for. A packed word contains 32 / bits codes,
# and a group size that is a multiple of 32 keeps every word inside one group.
KERNEL_BITS = (1, 2)
KERNEL_GROUP_SIZES = (32, 64, 128)

# Rows of x (tokens) a kernel handles in one dispatch. Longer inputs, such as a prompt,
# go to mx.quantized_matmul, whose matrix-matrix kernels suit them better.
MAX_KERNEL_ROWS = 8

# SIMD groups, and so output rows, per threadgroup: threadgroups are (32, R, 1).
SIMD_WIDTH = 32
ROWS_PER_THREADGROUP = 4

# MLX passes an input with fewer than 8 elements in the `constant` address space, while the
# kernels read `device` pointers, so smaller inputs take the fallback path.
MIN_KERNEL_INPUT_SIZE = 8

COMMON_HEADER_FILE = "low_bit_common.h"

# Largest difference from mx.quantized_matmul, relative to the largest magnitude of the
# reference output, that the kernels are tested to stay within (emulated runs in
# tests/test_kernels_emulated.py). The kernels accumulate in float32, in another order than
# MLX, and round once at the end. In float16 MLX's own rounding dominates (measured up to
# 0.4% of the largest output on MLX 0.32.4's CPU backend), so float16 gets 1%.
KERNEL_TOLERANCE = {mx.float32: 1e-5, mx.float16: 1e-2}


def kernels_disabled_by_env() -> bool:
    """Return True when LIEQ_NO_KERNELS is set to anything but empty or 0."""
    return os.environ.get(NO_KERNELS_ENV, "") not in ("", "0")


def metal_kernels_enabled() -> bool:
    """Return True when the custom Metal kernels can run: Metal present and not turned off."""
    return metal_available() and not kernels_disabled_by_env()


def read_metal_file(filename: str) -> str:
    """Read one file of the `lieq_mlx.metal` package (a kernel body or a shared header)."""
    return resources.files("lieq_mlx.metal").joinpath(filename).read_text(encoding="utf-8")


@dataclass(frozen=True)
class KernelLaunch:
    """One planned dispatch of a custom Metal kernel, in `mx.fast.metal_kernel` terms."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str
    inputs: tuple[mx.array, ...]
    template: tuple[tuple[str, Any], ...]
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: tuple[tuple[int, ...], ...]
    output_dtypes: tuple[mx.Dtype, ...]


@dataclass
class KernelSpec:
    """A kernel body file with its input and output names; builds the kernel object once."""

    name: str
    source_file: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    _kernel: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def source(self) -> str:
        """Read the kernel body from the package."""
        return read_metal_file(self.source_file)

    def header(self) -> str:
        """Read the helper header that every low-bit kernel body uses."""
        return read_metal_file(COMMON_HEADER_FILE)

    def kernel(self) -> Any:
        """Build the `mx.fast.metal_kernel` object on first use and return it."""
        with self._lock:
            if self._kernel is None:
                self._kernel = mx.fast.metal_kernel(
                    name=self.name,
                    input_names=list(self.input_names),
                    output_names=list(self.output_names),
                    source=self.source(),
                    header=self.header(),
                )
            return self._kernel

    def plan(
        self,
        inputs: tuple[mx.array, ...],
        template: tuple[tuple[str, Any], ...],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        output_shapes: tuple[tuple[int, ...], ...],
        output_dtypes: tuple[mx.Dtype, ...],
    ) -> KernelLaunch:
        """Bundle one dispatch of this kernel into a `KernelLaunch`."""
        return KernelLaunch(
            name=self.name,
            input_names=self.input_names,
            output_names=self.output_names,
            source=self.source(),
            header=self.header(),
            inputs=inputs,
            template=template,
            grid=grid,
            threadgroup=threadgroup,
            output_shapes=output_shapes,
            output_dtypes=output_dtypes,
        )

    def run(self, launch: KernelLaunch) -> list[mx.array]:
        """Dispatch a planned launch on the Metal GPU and return its outputs."""
        return self.kernel()(
            inputs=list(launch.inputs),
            template=list(launch.template),
            grid=launch.grid,
            threadgroup=launch.threadgroup,
            output_shapes=list(launch.output_shapes),
            output_dtypes=list(launch.output_dtypes),
        )


@dataclass(frozen=True)
class PackedWeight:
    """One projection in MLX's affine format: packed `weight`, `scales` and `biases`."""

    weight: mx.array  # (N, K * bits / 32) uint32
    scales: mx.array  # (N, K / group_size)
    biases: mx.array  # (N, K / group_size)

    @property
    def output_dims(self) -> int:
        """Number of output features N."""
        return int(self.weight.shape[0])


def check_packed_weight(
    packed: PackedWeight,
    input_dims: int,
    group_size: int,
    bits: int,
    label: str,
    dtype: mx.Dtype,
) -> None:
    """Raise ValueError unless `packed` is a valid `bits`-bit weight for x (M, input_dims).

    `dtype` is the dtype of x, which the kernels also expect for `scales` and `biases`.
    """
    if bits not in KERNEL_BITS:
        raise ValueError(f"{label}: bits={bits} is not supported by the kernels; use 1 or 2")
    if group_size not in KERNEL_GROUP_SIZES:
        raise ValueError(
            f"{label}: group_size={group_size} is not supported by the kernels; "
            f"use one of {KERNEL_GROUP_SIZES}"
        )
    if input_dims % group_size != 0:
        raise ValueError(
            f"{label}: input width {input_dims} is not a multiple of group_size={group_size}"
        )
    n_out = packed.output_dims
    expected_weight = (n_out, input_dims * bits // 32)
    expected_groups = (n_out, input_dims // group_size)
    if packed.weight.dtype != mx.uint32 or tuple(packed.weight.shape) != expected_weight:
        raise ValueError(
            f"{label}: weight must be uint32 of shape {expected_weight} for K={input_dims}, "
            f"bits={bits}; got {packed.weight.dtype} {tuple(packed.weight.shape)}"
        )
    for name, array in (("scales", packed.scales), ("biases", packed.biases)):
        if tuple(array.shape) != expected_groups:
            raise ValueError(
                f"{label}: {name} must have shape {expected_groups} for K={input_dims}, "
                f"group_size={group_size}; got {tuple(array.shape)}"
            )
        if array.dtype != dtype:
            raise ValueError(
                f"{label}: {name} are {array.dtype} but x is {dtype}; cast one to the other"
            )


def fallback_matmul(x: mx.array, packed: PackedWeight, group_size: int, bits: int) -> mx.array:
    """Compute x @ dequant(weight)^T with MLX's own `mx.quantized_matmul`."""
    return mx.quantized_matmul(
        x,
        packed.weight,
        packed.scales,
        packed.biases,
        transpose=True,
        group_size=group_size,
        bits=bits,
    )


def row_grid(total_rows: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Return (grid, threadgroup) for one SIMD group per row, rows rounded up to R."""
    padded = -(-total_rows // ROWS_PER_THREADGROUP) * ROWS_PER_THREADGROUP
    return (SIMD_WIDTH, padded, 1), (SIMD_WIDTH, ROWS_PER_THREADGROUP, 1)


def kernel_path_ok(x_rows: int, x: mx.array, packs: list[PackedWeight]) -> bool:
    """Return True when a dispatch with these operands suits the kernels.

    The kernels take at most MAX_KERNEL_ROWS rows of x, compute in the dtype of the scales
    (so x must already have it), and read every input as a `device` buffer.
    """
    if not 1 <= x_rows <= MAX_KERNEL_ROWS:
        return False
    dtype = packs[0].scales.dtype
    if dtype not in (mx.float32, mx.float16, mx.bfloat16) or x.dtype != dtype:
        return False
    for packed in packs:
        if packed.scales.dtype != dtype or packed.biases.dtype != dtype:
            return False
        smallest = min(packed.weight.size, packed.scales.size, packed.biases.size)
        if smallest < MIN_KERNEL_INPUT_SIZE:
            return False
    return x.size >= MIN_KERNEL_INPUT_SIZE


def flatten_rows(x: mx.array) -> tuple[mx.array, tuple[int, ...]]:
    """Reshape x (..., K) to (M, K) and return it with the leading shape."""
    leading = tuple(x.shape[:-1])
    rows = 1
    for dim in leading:
        rows *= dim
    return x.reshape(rows, x.shape[-1]), leading  # (M, K)
