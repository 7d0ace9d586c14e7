"""Fused q/k/v projections of one attention layer with 1- or 2-bit weights.

Metal kernel `metal/qkv_low_bit.metal`: one dispatch computes q, k and v from the same x.
It runs one SIMD group per output row of the stacked q, k and v weights, 32 lanes split K.
"""

from __future__ import annotations

import mlx.core as mx

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

QKV_KERNEL = KernelSpec(
    name="lieq_qkv_low_bit",
    source_file="qkv_low_bit.metal",
    input_names=(
        "x",
        "wq", "scales_q", "biases_q",
        "wk", "scales_k", "biases_k",
        "wv", "scales_v", "biases_v",
    ),
    output_names=("q", "k", "v"),
)


def plan_fused_qkv(
    x: mx.array,
    q_proj: PackedWeight,
    k_proj: PackedWeight,
    v_proj: PackedWeight,
    *,
    group_size: int,
    bits: int,
) -> KernelLaunch:
    """Plan the fused dispatch for x (M, K); outputs q (M, NQ), k (M, NK), v (M, NV)."""
    rows, input_dims = int(x.shape[0]), int(x.shape[1])
    projections = (("q_proj", q_proj), ("k_proj", k_proj), ("v_proj", v_proj))
    for label, packed in projections:
        check_packed_weight(
            packed, input_dims, group_size, bits, f"fused_qkv {label}", x.dtype
        )
    stacked_rows = q_proj.output_dims + k_proj.output_dims + v_proj.output_dims
    grid, threadgroup = row_grid(stacked_rows)
    inputs: tuple[mx.array, ...] = (x,)
    for _, packed in projections:
        inputs += (packed.weight, packed.scales, packed.biases)
    return QKV_KERNEL.plan(
        inputs=inputs,
        template=(("T", x.dtype), ("M", rows), ("BITS", bits), ("GROUP_SIZE", group_size)),
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=tuple((rows, packed.output_dims) for _, packed in projections),
        output_dtypes=(x.dtype, x.dtype, x.dtype),
    )


def fused_qkv(
    x: mx.array,
    q_proj: PackedWeight,
    k_proj: PackedWeight,
    v_proj: PackedWeight,
    *,
    group_size: int,
    bits: int,
    use_metal: bool | None = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """Compute the q, k and v projections of x (..., K) in one kernel dispatch.

    The three weights must share `bits`, `group_size` and the input width K. Without Metal
    kernels (see `quantized_matvec` for the rule) each projection is one
    `mx.quantized_matmul` call.
    """
    packs = [q_proj, k_proj, v_proj]
    if use_metal is None:
        use_metal = metal_kernels_enabled()
    x_rows, leading = flatten_rows(x)
    if not use_metal or not kernel_path_ok(int(x_rows.shape[0]), x, packs):
        q, k, v = (fallback_matmul(x, packed, group_size, bits) for packed in packs)
        return q, k, v

    launch = plan_fused_qkv(x_rows, q_proj, k_proj, v_proj, group_size=group_size, bits=bits)
    q, k, v = QKV_KERNEL.run(launch)
    return (
        q.reshape(*leading, q_proj.output_dims),  # (..., NQ)
        k.reshape(*leading, k_proj.output_dims),  # (..., NK)
        v.reshape(*leading, v_proj.output_dims),  # (..., NV)
    )
