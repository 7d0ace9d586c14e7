"""Activation-aware scaling of a decoder layer's input channels, folded into the layer.

Input channels that carry large activations weigh more in a projection's output than
the size of their weights suggests. Multiplying column j of W by s_j and dividing input
j by s_j leaves the product unchanged, yet lets the quantizer spend its levels on the
channels that matter (Lin et al., "AWQ: Activation-aware Weight Quantization", 2023).
The division folds into whatever produces the input: the RMSNorm weight in front of
q/k/v and in front of gate/up, and the rows of up_proj in front of down_proj. The float
model stays equivalent and only the values that get rounded change. The written folder
contains the scaled norms, so stock `mlx_lm.load` needs nothing new.

The scales are s = mean|x|^alpha over the calibration tokens, normalised around 1, with
alpha chosen on a grid for the lowest output error of round-to-nearest. One alpha serves
every candidate width (the sum of log errors over the widths decides), so the layer is
transformed once and all its candidates share it.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lieq_mlx.quantizers import two_level_params

# (producer, consumers): the producer's output is the consumers' shared input. The order
# matters: down_proj's scales change up_proj's rows before gate/up's search reads them.
SCALE_GROUPS = (
    ("input_layernorm", ("q_proj", "k_proj", "v_proj")),
    ("up_proj", ("down_proj",)),
    ("post_attention_layernorm", ("gate_proj", "up_proj")),
)
NORMS = ("input_layernorm", "post_attention_layernorm")
GRID = 20  # alpha in 0, 1/GRID, ..., (GRID - 1)/GRID; alpha 0 is no scaling
MIN_MAGNITUDE = 1e-4


def fake_quantize(weight: mx.array, bits: int, group_size: int) -> mx.array:
    """Round `weight` to `bits` and back: min/max ranges at 2+ bits, the two-level fit at 1 bit."""
    if bits > 1:
        packed, scales, biases = mx.quantize(weight, group_size=group_size, bits=bits)
        return mx.dequantize(packed, scales, biases, group_size=group_size, bits=bits)
    groups = np.asarray(weight, dtype=np.float32).reshape(-1, group_size)
    scales, lows = two_level_params(groups)
    step = np.where(scales > 0, scales, 1.0)
    codes = np.clip(np.round((groups - lows) / step), 0, 1)
    return mx.array((codes * scales + lows).reshape(weight.shape))


def _candidate_scales(magnitude: mx.array, alpha: float) -> mx.array:
    scales = mx.maximum(magnitude, MIN_MAGNITUDE) ** alpha
    return scales / mx.sqrt(scales.max() * scales.min())


def _search(weights: list[mx.array], x: mx.array, widths, group_size: int) -> tuple[mx.array, float]:
    """Return (scales, alpha) of the grid point with the lowest summed log output error."""
    hessian = x.T @ x  # (in, in): ||X D^T||^2 = sum((D H) * D)
    magnitude = mx.abs(x).mean(axis=0)
    best = (math.inf, None, 0.0)
    for step in range(GRID):
        alpha = step / GRID
        scales = _candidate_scales(magnitude, alpha)
        cost = 0.0
        for bits in widths:
            loss = 0.0
            for weight in weights:
                delta = fake_quantize(weight * scales, bits, group_size) / scales - weight
                loss += ((delta @ hessian) * delta).sum().item()
            cost += math.log(max(loss, 1e-30))
        if cost < best[0]:
            best = (cost, scales, alpha)
    return best[1], best[2]


def scalable_producers(layer) -> tuple[str, ...]:
    """Return the producers whose output can absorb a division exactly in this layer.

    A plain RMSNorm multiplies by its weight, and up_proj without a bias feeds down_proj
    through an elementwise product. Norms of another form (Gemma's 1 + weight) are left out.
    """
    found = [name for name in NORMS if type(getattr(layer, name, None)) is nn.RMSNorm]
    up = getattr(getattr(layer, "mlp", None), "up_proj", None)
    if up is not None and "bias" not in up:
        found.append("up_proj")
    return tuple(found)


def search_scales(
    weights: dict[str, mx.array],
    inputs: dict[str, mx.array],
    widths,
    group_size: int,
    producers: tuple[str, ...] = tuple(group[0] for group in SCALE_GROUPS),
):
    """Return ({producer: scales}, {producer: alpha}) for one decoder layer.

    `weights` maps projection names to float32 weights (out, in); `inputs` maps them to
    the captured inputs (tokens, in), as `capture_layer_inputs` yields them. Only the
    groups of `producers` are searched.
    """
    weights = dict(weights)
    scales, alphas = {}, {}
    for producer, consumers in SCALE_GROUPS:
        if producer not in producers:
            continue
        found, alpha = _search([weights[name] for name in consumers], inputs[consumers[0]], widths, group_size)
        mx.eval(found)
        scales[producer], alphas[producer] = found, alpha
        weights = transform_weights(weights, {producer: found})
    return scales, alphas


def transform_weights(weights: dict[str, mx.array], scales: dict[str, mx.array]) -> dict[str, mx.array]:
    """Return the projections' weights with `scales` multiplied into columns (and up_proj's rows divided)."""
    out = dict(weights)
    for producer, consumers in SCALE_GROUPS:
        if producer not in scales:
            continue
        for name in consumers:
            out[name] = out[name] * scales[producer]
        if producer == "up_proj":
            out["up_proj"] = out["up_proj"] / scales[producer][:, None]
    return out


def transform_inputs(inputs: dict[str, mx.array], scales: dict[str, mx.array]) -> dict[str, mx.array]:
    """Return the captured inputs divided by the scales of their producer (shared arrays stay shared)."""
    out = dict(inputs)
    for producer, consumers in SCALE_GROUPS:
        if producer in scales:
            shared = inputs[consumers[0]] / scales[producer]
            for name in consumers:
                out[name] = shared
    return out


def norm_weights(layer, scales: dict[str, mx.array]) -> dict[str, mx.array]:
    """Return {norm name: weight divided by its scales} for the layer's two RMSNorms."""
    return {name: getattr(layer, name).weight / scales[name] for name in NORMS if name in scales}
