"""Spectral shape of a projection's outputs: energy fractions, compactness, top-k energy.

For outputs Z (tokens, out_features), p_k = s_k^2 / sum_j s_j^2 over its singular values
s_k. Compactness is the effective rank exp(-sum_k p_k log p_k), between 1 (one direction
carries everything) and min(tokens, out_features) (a flat spectrum). Top-k energy is the
fraction of sum_j s_j^2 that the k largest singular values carry.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

DECOMPOSITIONS = ("eigvalsh", "svd")


def prepare_outputs(z: mx.array, normalize: bool) -> mx.array:
    """Return Z as is, or with rows centred (mean over tokens removed) and scaled to unit L2 norm."""
    if not normalize:
        return z
    z = z - z.mean(axis=0, keepdims=True)  # (tokens, out_features)
    norms = mx.sqrt((z * z).sum(axis=1, keepdims=True))  # (tokens, 1)
    return z / mx.maximum(norms, 1e-12)


def energy_fractions(z: mx.array, decomposition: str = "eigvalsh") -> np.ndarray:
    """Return p_k = s_k^2 / sum_j s_j^2 of `z` (tokens, out_features), largest first, float64.

    `eigvalsh` takes the eigenvalues of the smaller Gram matrix (Z^T Z or Z Z^T), which
    equal s_k^2; `svd` takes the singular values of Z itself. MLX runs both on the CPU
    stream only.
    """
    if decomposition == "eigvalsh":
        gram = z.T @ z if z.shape[1] <= z.shape[0] else z @ z.T  # (min, min)
        squares = mx.linalg.eigvalsh(gram, stream=mx.cpu)
    elif decomposition == "svd":
        singular = mx.linalg.svd(z, compute_uv=False, stream=mx.cpu)
        squares = singular * singular
    else:
        raise ValueError(f"unknown decomposition {decomposition!r}; use one of {DECOMPOSITIONS}")
    # Rounding leaves tiny negative eigenvalues on rank-deficient Gram matrices.
    squares = np.clip(np.asarray(squares, dtype=np.float64), 0.0, None)
    squares = np.sort(squares)[::-1]
    total = squares.sum()
    if total <= 0.0:
        return np.zeros_like(squares)
    return squares / total


def compactness(p: np.ndarray) -> float:
    """Return the effective rank exp(entropy) of energy fractions `p` (0 when all are zero)."""
    positive = p[p > 0]
    if positive.size == 0:
        return 0.0
    return float(np.exp(-(positive * np.log(positive)).sum()))


def top_k_energy(p: np.ndarray, k: int) -> float:
    """Return the fraction of energy in the `k` largest directions."""
    return float(p[:k].sum())
