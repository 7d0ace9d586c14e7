"""Matrix-vector product with a 1- or 2-bit weight: y = x @ dequant(w)^T.

Metal kernel `metal/qmv_low_bit.metal`: one SIMD group per output row, its 32 lanes split K.
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

QMV_KERNEL = KernelSpec(
    name="lieq_qmv_low_bit",
    source_file="qmv_low_bit.metal",
    input_names=("x", "w", "scales", "biases"),
    output_names=("y",),
)


def plan_quantized_matvec(
    x: mx.array, packed: PackedWeight, *, group_size: int, bits: int
) -> KernelLaunch:
    """Plan the kernel dispatch for x (M, K) with M <= MAX_KERNEL_ROWS; output y (M, N)."""
    rows, input_dims = int(x.shape[0]), int(x.shape[1])
    check_packed_weight(packed, input_dims, group_size, bits, "quantized_matvec", x.dtype)
    grid, threadgroup = row_grid(packed.output_dims)
    return QMV_KERNEL.plan(
        inputs=(x, packed.weight, packed.scales, packed.biases),
        template=(("T", x.dtype), ("M", rows), ("BITS", bits), ("GROUP_SIZE", group_size)),
        grid=grid,
        threadgroup=threadgroup,
        output_shapes=((rows, packed.output_dims),),
        output_dtypes=(x.dtype,),
    )


def quantized_matvec(
    x: mx.array,
    weight: mx.array,
    scales: mx.array,
    biases: mx.array,
    *,
    group_size: int,
    bits: int,
    use_metal: bool | None = None,
) -> mx.array:
    """Multiply x (..., K) by a packed weight (N, K * bits / 32) and return y (..., N).

    Runs the custom kernel when `use_metal` (default: Metal present and LIEQ_NO_KERNELS
    unset) allows it and the input suits the kernel (at most 8 rows, x in the dtype of
    `scales`). Every other call returns `mx.quantized_matmul(..., transpose=True)`.
    """
    packed = PackedWeight(weight, scales, biases)
    if use_metal is None:
        use_metal = metal_kernels_enabled()
    x_rows, leading = flatten_rows(x)
    if not use_metal or not kernel_path_ok(int(x_rows.shape[0]), x, [packed]):
        return fallback_matmul(x, packed, group_size, bits)

    launch = plan_quantized_matvec(x_rows, packed, group_size=group_size, bits=bits)
    (y,) = QMV_KERNEL.run(launch)
    return y.reshape(*leading, packed.output_dims)  # (..., N)
