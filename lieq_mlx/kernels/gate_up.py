"""Fused gate and up projections of a SwiGLU MLP with 1- or 2-bit weights.

Metal kernel `metal/gate_up_swiglu.metal`: y = silu(x @ gate^T) * (x @ up^T) in one
dispatch; one SIMD group per output column, 32 lanes split K for both projections.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from lieq_mlx.kernels._common import (
    KernelLaunch,
    KernelSpec,
    PackedWeight,
    check_packed_weight,
    fallback_matmul,
    flatten_rows,
    kernel_path_ok,
    metal_kernels_enabled,
    row_grid,
)

GATE_UP_KERNEL = KernelSpec(
    name="lieq_gate_up_swiglu",
    source_file="gate_up_swiglu.metal",
    input_names=("x", "w_gate", "scales_gate", "biases_gate", "w_up", "scales_up", "biases_up"),
    output_names=("y",),
)


def plan_fused_gate_up(
    x: mx.array,
    gate_proj: PackedWeight,
    up_proj: PackedWeight,
    *,
    group_size: int,
    bits: int,
) -> KernelLaunch:
    """Plan the fused dispatch for x (M, K); output silu(gate) * up of shape (M, N)."""
    rows, input_dims = int(x.shape[0]), int(x.shape[1])
    for label, packed in (("gate_proj", gate_proj), ("up_proj", up_proj)):
        check_packed_weight(
            packed, input_dims, group_size, bits, f"fused_gate_up {label}", x.dtype
        )
    if gate_proj.output_dims != up_proj.output_dims:
        raise ValueError(
            f"fused_gate_up: gate_proj has {gate_proj.output_dims} outputs but up_proj has "
            f"{up_proj.output_dims}; they must match"
        )
    grid, threadgroup = row_grid(gate_proj.output_dims)
    return GATE_UP_KERNEL.plan(
        inputs=(
            x,
            gate_proj.weight, gate_proj.scales, gate_proj.biases,
            up_proj.weight, up_proj.scales, up_proj.biases,
        ),
        template=(("T", x.dtype), ("M", rows), ("BITS", bits), ("GROUP_SIZE", group_size)),
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=((rows, gate_proj.output_dims),),
        output_dtypes=(x.dtype,),
    )


def fused_gate_up(
    x: mx.array,
    gate_proj: PackedWeight,
    up_proj: PackedWeight,
    *,
    group_size: int,
    bits: int,
    use_metal: bool | None = None,
) -> mx.array:
    """Compute silu(x @ dequant(gate)^T) * (x @ dequant(up)^T) for x (..., K).

    Without Metal kernels (see `quantized_matvec` for the rule) this is two
    `mx.quantized_matmul` calls and `nn.silu(gate) * up`, as in mlx-lm's SwiGLU MLP.
    """
    if use_metal is None:
        use_metal = metal_kernels_enabled()
    x_rows, leading = flatten_rows(x)
    if not use_metal or not kernel_path_ok(int(x_rows.shape[0]), x, [gate_proj, up_proj]):
        gate = fallback_matmul(x, gate_proj, group_size, bits)
        up = fallback_matmul(x, up_proj, group_size, bits)
        return nn.silu(gate) * up

    launch = plan_fused_gate_up(x_rows, gate_proj, up_proj, group_size=group_size, bits=bits)
    (y,) = GATE_UP_KERNEL.run(launch)
    return y.reshape(*leading, gate_proj.output_dims)  # (..., N)
