"""The untrained reference: a randomly initialised copy of a model, drawn from a seed.

Every weight matrix (linear projections and the embedding) is drawn i.i.d. from
N(0, sigma^2), with sigma the standard deviation of the same matrix in the trained model.
Norm weights stay at their initial value of one and biases at zero. Matching sigma per
matrix keeps the random model's hidden states at the trained model's scale, so its
attention softmax and residual stream are neither saturated nor vanishing. Compactness
itself does not depend on the scale of W (the effective rank of a scaled matrix is the same).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from lieq_mlx.errors import UnsupportedModelError


def random_model(model: nn.Module, seed: int) -> nn.Module:
    """Build a randomly initialised copy of `model` (same class and arguments), seeded."""
    args = getattr(model, "args", None)
    if args is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no `args`, so no random copy of it can be built"
        )
    copy = type(model)(args)
    trained = dict(tree_flatten(model.parameters()))
    # numpy's generator draws normal samples faster than mx.random on the CPU; the
    # parameters are visited in sorted order so that a seed always gives the same model.
    generator = np.random.default_rng(seed)
    drawn = []
    for path, initial in sorted(tree_flatten(copy.parameters())):
        if initial.ndim != 2:
            drawn.append((path, initial.astype(mx.float32)))
            continue
        source = trained.get(path)
        if source is not None and mx.issubdtype(source.dtype, mx.floating) and source.shape == initial.shape:
            sigma = mx.sqrt(mx.var(source.astype(mx.float32))).item()
        else:
            # NOTE: quantized trained weights are not dequantized here; such matrices get
            # the 1/sqrt(in_features) scale of a standard initialisation instead.
            sigma = initial.shape[-1] ** -0.5
        sample = generator.standard_normal(initial.shape, dtype=np.float32)
        drawn.append((path, sigma * mx.array(sample)))
    copy.update(tree_unflatten(drawn))
    mx.eval(copy.parameters())
    copy.eval()
    return copy
