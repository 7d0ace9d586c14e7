"""GPTQ: error-compensating rounding of one weight matrix, in MLX's affine format.

Columns are quantized left to right; each column's rounding error is spread over the
columns not yet quantized through the inverse Hessian of the layer's inputs,
H = X^T X, so the layer's outputs on calibration data move as little as possible
(Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", 2022). Each group's scale and bias come from lieq-mlx's own fits (clipping
search, or the two-level fit at 1 bit) on the group's weights as updated when the group
is reached, so the output is the same format as `quantizers.quantize_weight`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from lieq_mlx.quantizers import group_params, pack_codes, to_storage

DAMPING = 0.01  # fraction of the mean diagonal added to H before inversion
SUB_BLOCK = 8


def inverse_hessian_factor(hessian: np.ndarray, damping: float = DAMPING) -> tuple[np.ndarray, np.ndarray]:
    """Return the upper Cholesky factor of H^-1 and a mask of input columns never activated."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damping * np.mean(np.diag(h))
    inverse = np.linalg.inv(h)
    inverse = (inverse + inverse.T) / 2
    return np.linalg.cholesky(inverse).T, dead  # (in, in) upper triangular


def gptq_quantize(
    jobs: list[tuple[mx.array, int]],
    factor: np.ndarray,
    dead: np.ndarray,
    group_size: int = 64,
    storage_dtype: mx.Dtype = mx.float16,
) -> list[tuple[mx.array, mx.array, mx.array]]:
    """Quantize each (weight, bits) of `jobs` with GPTQ; all weights share one input Hessian.

    `factor` and `dead` come from `inverse_hessian_factor` of that Hessian. Rows are
    independent in GPTQ, so the jobs are stacked into one matrix and share each column
    step: quantizing q, k and v at four widths costs one pass over the columns.
    """
    sizes = [int(weight.shape[0]) for weight, _ in jobs]
    bounds = np.cumsum([0] + sizes)
    # Work on the transpose, (in, rows): each column step then reads contiguous memory.
    wt = np.concatenate([np.array(weight.astype(mx.float32), dtype=np.float64) for weight, _ in jobs]).T.copy()
    columns, rows = wt.shape
    wt[dead, :] = 0.0
    levels = np.concatenate([np.full(size, 2**bits - 1, dtype=np.float64) for size, (_, bits) in zip(sizes, jobs)])
    codes = np.zeros((columns, rows), dtype=np.uint32)
    n_groups = columns // group_size
    scales = np.zeros((n_groups, rows), dtype=np.float64)
    biases = np.zeros((n_groups, rows), dtype=np.float64)

    for group in range(n_groups):
        first, last = group * group_size, (group + 1) * group_size
        block = wt[first:last].copy()  # (g, rows)
        for (start, stop), (_, bits) in zip(zip(bounds[:-1], bounds[1:]), jobs):
            group_scales, group_biases = group_params(np.ascontiguousarray(block[:, start:stop].T, dtype=np.float32), bits)
            scales[group, start:stop] = to_storage(group_scales, storage_dtype)[:, 0]
            biases[group, start:stop] = to_storage(group_biases, storage_dtype)[:, 0]
        step = np.where(scales[group] > 0, scales[group], 1.0)
        offset = biases[group]
        errors = np.zeros_like(block)
        # Errors reach the rest of the group lazily, SUB_BLOCK columns at a time, so most of
        # the update is one matrix product instead of many outer products.
        for sub in range(0, group_size, SUB_BLOCK):
            end = min(sub + SUB_BLOCK, group_size)
            for k in range(sub, end):
                column = block[k]
                q = np.clip(np.round((column - offset) / step), 0, levels)  # (rows,)
                codes[first + k] = q
                error = (column - (q * scales[group] + offset)) / factor[first + k, first + k]
                block[k + 1 : end] -= np.outer(factor[first + k, first + k + 1 : first + end], error)
                errors[k] = error
            block[end:] -= factor[first + sub : first + end, first + end : last].T @ errors[sub:end]
        wt[last:] -= factor[first:last, last:].T @ errors

    codes = codes.T
    scales = scales.T
    biases = biases.T
    results = []
    for (start, stop), (_, bits) in zip(zip(bounds[:-1], bounds[1:]), jobs):
        results.append(
            (
                pack_codes(codes[start:stop], bits),  # (out, in * bits / 32)
                mx.array(scales[start:stop].astype(np.float32)).astype(storage_dtype),
                mx.array(biases[start:stop].astype(np.float32)).astype(storage_dtype),
            )
        )
    return results
