"""The custom kernels on a real Metal GPU, compared with mx.quantized_matmul.

Every test here skips where `metal_available()` is False. Tolerances are those stated in
lieq_mlx.kernels.KERNEL_TOLERANCE.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from lieq_mlx.kernels import (
    KERNEL_TOLERANCE,
    PackedWeight,
    fused_gate_up,
    fused_qkv,
    quantized_matvec,
)
from lieq_mlx.platform import metal_available

pytestmark = pytest.mark.skipif(not metal_available(), reason="needs a Metal GPU")


def packed_weight(output_dims, input_dims, bits, group_size, dtype, seed):
    weight = mx.random.normal((output_dims, input_dims), key=mx.random.key(seed)) * 0.05
    packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
    return PackedWeight(packed, scales.astype(dtype), biases.astype(dtype))


def matmul(x, packed, bits, group_size):
    return mx.quantized_matmul(
        x, packed.weight, packed.scales, packed.biases,
        transpose=True, group_size=group_size, bits=bits,
    )


def relative_error(got: mx.array, expected: mx.array) -> float:
    got, expected = got.astype(mx.float32), expected.astype(mx.float32)
    scale = max(mx.abs(expected).max().item(), 1e-6)
    return mx.abs(got - expected).max().item() / scale


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_metal_quantized_matvec(rows, bits, group_size, dtype):
    packed = packed_weight(1027, 1152, bits, group_size, dtype, seed=rows)
    x = mx.random.normal((rows, 1152), key=mx.random.key(1)).astype(dtype)

    y = quantized_matvec(
        x, packed.weight, packed.scales, packed.biases,
        group_size=group_size, bits=bits, use_metal=True,
    )

    assert relative_error(y, matmul(x, packed, bits, group_size)) <= KERNEL_TOLERANCE[dtype]


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("rows", [1, 5])
def test_metal_fused_qkv(rows, bits):
    packs = [packed_weight(n, 640, bits, 64, mx.float16, seed=n) for n in (576, 193, 193)]
    x = mx.random.normal((rows, 640), key=mx.random.key(2)).astype(mx.float16)

    outputs = fused_qkv(x, *packs, group_size=64, bits=bits, use_metal=True)

    for output, packed in zip(outputs, packs):
        expected = matmul(x, packed, bits, 64)
        assert relative_error(output, expected) <= KERNEL_TOLERANCE[mx.float16]


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("rows", [1, 8])
def test_metal_fused_gate_up(rows, bits):
    gate, up = (packed_weight(1538, 640, bits, 32, mx.float16, seed=s) for s in (3, 4))
    x = mx.random.normal((rows, 640), key=mx.random.key(3)).astype(mx.float16)

    y = fused_gate_up(x, gate, up, group_size=32, bits=bits, use_metal=True)

    expected = nn.silu(matmul(x, gate, bits, 32)) * matmul(x, up, bits, 32)
    assert relative_error(y, expected) <= KERNEL_TOLERANCE[mx.float16]
