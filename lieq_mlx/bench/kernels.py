"""Per-layer timing of lieq-mlx's 1- and 2-bit Metal kernels against `mx.quantized_matmul`.

For every decoder layer whose projections are 1- or 2-bit, one decode-time input row is
multiplied at the layer's own shapes. The fused q, k and v kernel runs against three
built-in calls, and the fused gate and up kernel (SwiGLU included) against two calls and
the product. The o and down projections are single matrix-vector products. The timings
only mean something where Metal runs the custom kernels.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn

from lieq_mlx.kernels import KERNEL_BITS, PackedWeight, fused_gate_up, fused_qkv, quantized_matvec

KERNEL_REPEATS = 50
KERNEL_WARMUP = 3


@dataclass(frozen=True)
class KernelTiming:
    """Median microseconds per call of a custom kernel and of its built-in equivalent."""

    layer: int
    operation: str  # "qkv", "gate_up", "o_proj" or "down_proj"
    bits: int
    kernel_us: float
    reference_us: float


def _packed(layer: nn.QuantizedLinear) -> PackedWeight:
    return PackedWeight(layer.weight, layer.scales, layer.biases)


def _reference(x: mx.array, layer: nn.QuantizedLinear) -> mx.array:
    return mx.quantized_matmul(
        x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=layer.group_size, bits=layer.bits
    )


def median_call_us(call: Callable[[], object], repeats: int = KERNEL_REPEATS) -> float:
    """Time `call` with an eval after each call; return the median in microseconds."""
    for _ in range(KERNEL_WARMUP):
        mx.eval(call())
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(call())
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def _low_bit(*layers: object) -> bool:
    return all(isinstance(layer, nn.QuantizedLinear) and layer.bits in KERNEL_BITS for layer in layers)


def compare_layer_kernels(model: nn.Module, repeats: int = KERNEL_REPEATS) -> list[KernelTiming]:
    """Time each 1- or 2-bit projection group of each decoder layer, kernel against built-in."""
    # NOTE: this has not run on a Mac yet. Tests on Linux only cover models without 1- or
    # 2-bit layers, where nothing is timed.
    timings = []
    for index, layer in enumerate(model.layers):
        attention = getattr(layer, "self_attn", None)
        mlp = getattr(layer, "mlp", None)
        if attention is None or mlp is None:
            continue
        q, k, v, o = (getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj", "o_proj"))
        gate, up, down = (getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj"))

        if _low_bit(q, k, v):
            x = mx.random.normal((1, q.weight.shape[1] * 32 // q.bits)).astype(q.scales.dtype)  # (1, K)
            options = {"group_size": q.group_size, "bits": q.bits, "use_metal": True}
            kernel = median_call_us(lambda: fused_qkv(x, _packed(q), _packed(k), _packed(v), **options), repeats)
            reference = median_call_us(lambda: [_reference(x, p) for p in (q, k, v)], repeats)
            timings.append(KernelTiming(index, "qkv", q.bits, kernel, reference))

        if _low_bit(gate, up):
            x = mx.random.normal((1, gate.weight.shape[1] * 32 // gate.bits)).astype(gate.scales.dtype)  # (1, K)
            options = {"group_size": gate.group_size, "bits": gate.bits, "use_metal": True}
            kernel = median_call_us(lambda: fused_gate_up(x, _packed(gate), _packed(up), **options), repeats)
            reference = median_call_us(lambda: nn.silu(_reference(x, gate)) * _reference(x, up), repeats)
            timings.append(KernelTiming(index, "gate_up", gate.bits, kernel, reference))

        for name, projection in (("o_proj", o), ("down_proj", down)):
            if not _low_bit(projection):
                continue
            x = mx.random.normal((1, projection.weight.shape[1] * 32 // projection.bits))  # (1, K)
            x = x.astype(projection.scales.dtype)
            options = {"group_size": projection.group_size, "bits": projection.bits, "use_metal": True}
            packed = _packed(projection)
            kernel = median_call_us(lambda: quantized_matvec(x, packed.weight, packed.scales, packed.biases, **options), repeats)
            reference = median_call_us(lambda: _reference(x, projection), repeats)
            timings.append(KernelTiming(index, name, projection.bits, kernel, reference))
    return timings
