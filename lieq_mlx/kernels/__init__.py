"""Custom Metal kernels for 1- and 2-bit layers, with `mx.quantized_matmul` fallbacks.

Every public function runs its kernel only where Metal is available and LIEQ_NO_KERNELS is
unset; elsewhere it returns MLX's own result for the same operands.
"""

from lieq_mlx.kernels._common import (
    KERNEL_BITS,
    KERNEL_GROUP_SIZES,
    KERNEL_TOLERANCE,
    MAX_KERNEL_ROWS,
    NO_KERNELS_ENV,
    ROWS_PER_THREADGROUP,
    KernelLaunch,
    PackedWeight,
    kernels_disabled_by_env,
    metal_kernels_enabled,
)
from lieq_mlx.kernels.gate_up import GATE_UP_KERNEL, fused_gate_up, plan_fused_gate_up
from lieq_mlx.kernels.qkv import QKV_KERNEL, fused_qkv, plan_fused_qkv
from lieq_mlx.kernels.qmv import QMV_KERNEL, plan_quantized_matvec, quantized_matvec

__all__ = [
    "GATE_UP_KERNEL",
    "KERNEL_BITS",
    "KERNEL_GROUP_SIZES",
    "KERNEL_TOLERANCE",
    "KernelLaunch",
    "MAX_KERNEL_ROWS",
    "NO_KERNELS_ENV",
    "PackedWeight",
    "QKV_KERNEL",
    "QMV_KERNEL",
    "ROWS_PER_THREADGROUP",
    "fused_gate_up",
    "fused_qkv",
    "kernels_disabled_by_env",
    "metal_kernels_enabled",
    "plan_fused_gate_up",
    "plan_fused_qkv",
    "plan_quantized_matvec",
    "quantized_matvec",
]
