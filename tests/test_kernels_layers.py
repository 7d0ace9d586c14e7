"""Kernel wrappers and kernel modules on their mx.quantized_matmul path, and install_kernels.

On a machine without Metal the wrappers compute with MLX's own ops, and these tests check
that the module code around them (reshapes, fusion bookkeeping, bias, SwiGLU) gives the
stock mlx-lm results. Only `metal_available` is replaced, where a test needs to see what
install_kernels reports on a Mac; such tests never call the model afterwards.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama

import lieq_mlx.kernel_layers as kernel_layers
from lieq_mlx.kernel_layers import (
    FusedQKVProjection,
    FusedSwiGLUMLP,
    KernelQuantizedLinear,
    install_kernels,
    kernels_active,
    kernels_status,
)
from lieq_mlx.kernels import (
    MAX_KERNEL_ROWS,
    NO_KERNELS_ENV,
    PackedWeight,
    fused_gate_up,
    fused_qkv,
    plan_fused_gate_up,
    plan_quantized_matvec,
    quantized_matvec,
)
from lieq_mlx.kernels._common import kernel_path_ok
from lieq_mlx.platform import metal_available

no_metal = pytest.mark.skipif(metal_available(), reason="checks the path without Metal")


@pytest.fixture(autouse=True)
def kernels_not_disabled(monkeypatch):
    monkeypatch.delenv(NO_KERNELS_ENV, raising=False)


def packed_weight(output_dims: int, input_dims: int, bits: int, group_size: int, seed: int):
    weight = mx.random.normal((output_dims, input_dims), key=mx.random.key(seed)) * 0.05
    return PackedWeight(*mx.quantize(weight, group_size=group_size, bits=bits))


def matmul(x: mx.array, packed: PackedWeight, bits: int, group_size: int) -> mx.array:
    return mx.quantized_matmul(
        x, packed.weight, packed.scales, packed.biases,
        transpose=True, group_size=group_size, bits=bits,
    )


def tiny_llama(bits: int = 2, group_size: int = 64, layers: int = 2) -> llama.Model:
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=128,
        num_hidden_layers=layers,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=97,
    )
    mx.random.seed(3)
    model = llama.Model(args)
    nn.quantize(
        model,
        group_size=group_size,
        bits=bits,
        class_predicate=lambda path, module: isinstance(module, nn.Linear) and "layers" in path,
    )
    return model


# ---- Wrapper functions -------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("shape", [(384,), (3, 384), (2, 5, 384), (12, 384)])
def test_quantized_matvec_fallback_equals_mlx(bits, shape):
    packed = packed_weight(21, 384, bits, 64, seed=bits)
    x = mx.random.normal(shape, key=mx.random.key(11))

    y = quantized_matvec(
        x, packed.weight, packed.scales, packed.biases,
        group_size=64, bits=bits, use_metal=False,
    )

    expected = matmul(x, packed, bits, 64)
    assert y.shape == (*shape[:-1], 21)
    assert mx.array_equal(y, expected).item()


def test_fused_qkv_fallback_equals_three_matmuls():
    q_proj, k_proj, v_proj = (packed_weight(n, 256, 2, 32, seed=n) for n in (40, 16, 16))
    x = mx.random.normal((1, 3, 256), key=mx.random.key(5))

    q, k, v = fused_qkv(x, q_proj, k_proj, v_proj, group_size=32, bits=2, use_metal=False)

    for output, packed in ((q, q_proj), (k, k_proj), (v, v_proj)):
        assert mx.array_equal(output, matmul(x, packed, 2, 32)).item()


def test_fused_gate_up_fallback_equals_swiglu():
    gate, up = (packed_weight(96, 256, 1, 128, seed=s) for s in (1, 2))
    x = mx.random.normal((2, 256), key=mx.random.key(9))

    y = fused_gate_up(x, gate, up, group_size=128, bits=1, use_metal=False)

    expected = nn.silu(matmul(x, gate, 1, 128)) * matmul(x, up, 1, 128)
    assert mx.array_equal(y, expected).item()


def test_plan_rejects_unsupported_bits():
    packed = packed_weight(8, 256, 4, 64, seed=0)
    with pytest.raises(ValueError, match="bits=4"):
        plan_quantized_matvec(mx.zeros((1, 256)), packed, group_size=64, bits=4)


def test_plan_rejects_unsupported_group_size():
    packed = packed_weight(8, 256, 2, 64, seed=0)
    with pytest.raises(ValueError, match="group_size=16"):
        plan_quantized_matvec(mx.zeros((1, 256)), packed, group_size=16, bits=2)


def test_plan_rejects_wrong_weight_shape():
    packed = packed_weight(8, 256, 2, 64, seed=0)
    with pytest.raises(ValueError, match="weight must be uint32 of shape"):
        plan_quantized_matvec(mx.zeros((1, 512)), packed, group_size=64, bits=2)


def test_plan_rejects_dtype_mismatch():
    packed = packed_weight(8, 256, 2, 64, seed=0)
    with pytest.raises(ValueError, match="scales are mlx.core.float32 but x is"):
        plan_quantized_matvec(mx.zeros((1, 256), dtype=mx.float16), packed, group_size=64, bits=2)


def test_plan_rejects_gate_up_mismatch():
    gate = packed_weight(16, 256, 2, 64, seed=0)
    up = packed_weight(24, 256, 2, 64, seed=1)
    with pytest.raises(ValueError, match="must match"):
        plan_fused_gate_up(mx.zeros((1, 256)), gate, up, group_size=64, bits=2)


def test_plan_grid_covers_rows():
    packed = packed_weight(37, 256, 2, 64, seed=0)
    launch = plan_quantized_matvec(mx.zeros((3, 256)), packed, group_size=64, bits=2)

    assert launch.grid == (32, 40, 1)
    assert launch.threadgroup == (32, 4, 1)
    assert dict(launch.template) == {"T": mx.float32, "M": 3, "BITS": 2, "GROUP_SIZE": 64}
    assert launch.output_shapes == ((3, 37),)


def test_kernel_path_limits():
    packed = packed_weight(16, 256, 2, 64, seed=0)
    tiny = packed_weight(1, 32, 2, 32, seed=0)

    assert kernel_path_ok(1, mx.zeros((1, 256)), [packed])
    assert kernel_path_ok(MAX_KERNEL_ROWS, mx.zeros((MAX_KERNEL_ROWS, 256)), [packed])
    assert not kernel_path_ok(MAX_KERNEL_ROWS + 1, mx.zeros((9, 256)), [packed])
    assert not kernel_path_ok(1, mx.zeros((1, 256), dtype=mx.float16), [packed])
    assert not kernel_path_ok(1, mx.zeros((1, 32)), [tiny])


# ---- install_kernels and the modules -----------------------------------------------------


def parameter_names(model: nn.Module) -> list[str]:
    return sorted(name for name, _ in tree_flatten(model.parameters()))


def test_install_counts_layers():
    model = tiny_llama()
    report = install_kernels(model, force=True)

    assert report.installed
    assert report.fused_qkv == 2
    assert report.fused_gate_up == 2
    assert report.single_linear == 4  # o_proj and down_proj of each layer
    attention = model.model.layers[0].self_attn
    assert isinstance(attention.q_proj, FusedQKVProjection)
    assert isinstance(attention.o_proj, KernelQuantizedLinear)
    assert isinstance(model.model.layers[1].mlp, FusedSwiGLUMLP)


def test_install_keeps_parameter_names():
    model = tiny_llama()
    before = parameter_names(model)
    install_kernels(model, force=True)
    assert parameter_names(model) == before


@pytest.mark.parametrize("length", [1, 5, 12])
def test_installed_model_matches_stock(length):
    stock = tiny_llama()
    patched = tiny_llama()
    install_kernels(patched, force=True)
    tokens = mx.array([[(7 * i + 3) % 97 for i in range(length)]])

    expected = stock(tokens)
    got = patched(tokens)

    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-5)
    assert mx.array_equal(mx.argmax(got, axis=-1), mx.argmax(expected, axis=-1)).item()


def test_qkv_projection_with_other_input():
    model = tiny_llama()
    attention = model.model.layers[0].self_attn
    stock = {name: attention[name] for name in ("q_proj", "k_proj", "v_proj")}
    install_kernels(model, force=True)
    first = mx.random.normal((1, 2, 128), key=mx.random.key(1))
    second = mx.random.normal((1, 2, 128), key=mx.random.key(2))

    attention.q_proj(first)  # leaves k and v of `first` pending
    k_second = attention.k_proj(second)
    v_first = attention.v_proj(first)

    assert mx.array_equal(k_second, stock["k_proj"](second)).item()
    assert mx.array_equal(v_first, stock["v_proj"](first)).item()


def test_install_skips_mixed_and_wide_layers():
    model = tiny_llama(bits=4)
    attention = model.model.layers[0].self_attn
    attention.q_proj = nn.QuantizedLinear.from_linear(
        nn.Linear(128, 128, bias=False), group_size=64, bits=2
    )
    report = install_kernels(model, force=True)

    assert report.fused_qkv == 0
    assert report.fused_gate_up == 0
    assert report.single_linear == 1  # the 2-bit q_proj alone
    assert isinstance(attention.q_proj, KernelQuantizedLinear)
    assert type(attention.k_proj) is nn.QuantizedLinear
    assert report.other_quantized == 13


def test_env_turns_kernels_off(monkeypatch):
    monkeypatch.setenv(NO_KERNELS_ENV, "1")
    model = tiny_llama()
    before = parameter_names(model)

    report = install_kernels(model, force=True)

    assert not report.installed
    assert NO_KERNELS_ENV in report.summary()
    assert type(model.model.layers[0].self_attn.q_proj) is nn.QuantizedLinear
    assert parameter_names(model) == before
    assert not kernels_active(model)
    assert NO_KERNELS_ENV in kernels_status(model)


@no_metal
def test_install_without_metal_does_nothing():
    model = tiny_llama()
    report = install_kernels(model)

    assert not report.installed
    assert "Metal not available" in report.summary()
    assert type(model.model.layers[0].mlp) is llama.MLP
    assert not kernels_active(None)
    assert kernels_status(None).startswith("off")


@no_metal
def test_status_after_forced_install():
    model = tiny_llama()
    report = install_kernels(model, force=True)

    assert not report.on_metal
    assert report.summary().startswith("fallback")
    assert not kernels_active(model)
    assert kernels_status(model).startswith("fallback")


def test_status_with_metal_reported(monkeypatch):
    # Only Metal's presence is replaced, and the model is never called afterwards.
    monkeypatch.setattr(kernel_layers, "metal_available", lambda: True)
    model = tiny_llama()
    report = install_kernels(model)

    assert report.installed and report.on_metal
    assert report.summary() == "on (2 fused q/k/v, 2 fused gate/up, 4 single 1-2 bit layers)"
    assert kernels_active(model)
    assert kernels_active(None)
    assert kernels_status(model) == "on (2 fused q/k/v, 2 fused gate/up, 4 single layers)"
    assert not kernels_active(tiny_llama())
