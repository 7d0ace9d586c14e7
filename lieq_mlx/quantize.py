"""Quantize a loaded model in memory: per-layer candidates, bit accounting, allocation.

`LayerCandidates` quantizes every decoder-layer projection once at each candidate width
and keeps the results, so measuring each layer's distortion D_l(b) and building the final
model share one pass of the quantizers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lieq_mlx.allocation import BitAccounting
from lieq_mlx.analysis.model_parts import PROJECTIONS, decoder_parts, projection, projection_parent
from lieq_mlx.gptq import gptq_quantize, inverse_hessian_factor
from lieq_mlx.quantizers import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, quantize_weight
from lieq_mlx.scaling import norm_weights, scalable_producers, search_scales, transform_inputs, transform_weights

DISTORTIONS = ("weight", "output")
STORAGE_DTYPE = mx.float16  # dtype of scales, biases and unquantized weights on disk
UNQUANTIZED_BITS = 16


@dataclass
class QuantizedWeight:
    weight: mx.array  # (out, in * bits / 32) uint32
    scales: mx.array  # (out, in / group_size)
    biases: mx.array  # (out, in / group_size)
    bits: int
    group_size: int

    def dequantized(self) -> mx.array:
        return mx.dequantize(self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits)


@dataclass
class LayerCandidates:
    """Every projection of every decoder layer, quantized at every candidate width."""

    widths: tuple[int, ...]
    group_size: int
    weights: list[dict[int, dict[str, QuantizedWeight]]] = field(default_factory=list)
    output_error: np.ndarray | None = None  # (layers, widths), when calibration was given
    # Per layer, the activation scales folded into it ({producer: (in,)}); empty without scaling.
    scales: list[dict[str, mx.array]] = field(default_factory=list)
    alphas: list[dict[str, float]] = field(default_factory=list)


def linear_weight(module: nn.Module) -> mx.array:
    if isinstance(module, nn.QuantizedLinear):
        return mx.dequantize(module.weight, module.scales, module.biases, group_size=module.group_size, bits=module.bits)
    return module.weight


def layer_param_counts(model: nn.Module) -> list[int]:
    """Return each decoder layer's number of linear weights (q, k, v, o, gate, up, down)."""
    _, layers, _ = decoder_parts(model)
    return [sum(int(np.prod(linear_weight(projection(layer, name)).shape)) for name in PROJECTIONS) for layer in layers]


def _embedding_params(model: nn.Module) -> tuple[int, int]:
    """Return (embedding parameters, untied head parameters)."""
    embed = model.model.embed_tokens
    rows = embed.weight.shape[0]
    columns = embed.weight.shape[1] * (32 // embed.bits if isinstance(embed, nn.QuantizedEmbedding) else 1)
    head = getattr(model, "lm_head", None)
    head_params = 0
    if head is not None:
        out_features, packed = head.weight.shape
        head_params = out_features * packed * (32 // head.bits if isinstance(head, nn.QuantizedLinear) else 1)
    return rows * columns, head_params


def build_accounting(model: nn.Module, group_size: int, embed_bits: int, embed_group_size: int) -> BitAccounting:
    """Count the model's parameters and the stored bits outside the decoder-layer weights."""
    from mlx.utils import tree_flatten

    layer_params = layer_param_counts(model)
    embedding, head = _embedding_params(model)
    linear_total = sum(layer_params)
    other = 0
    for name, value in tree_flatten(model.parameters()):
        if ".layers." in f".{name}" and name.rsplit(".", 1)[-1] in ("weight", "bias") and "norm" in name:
            other += value.size
        elif name.startswith("model.norm"):
            other += value.size
    per_weight = embed_bits + 32 / embed_group_size if embed_bits < UNQUANTIZED_BITS else UNQUANTIZED_BITS
    fixed = (embedding + head) * per_weight + other * UNQUANTIZED_BITS
    return BitAccounting(
        layer_params=tuple(layer_params),
        total_params=linear_total + embedding + head + other,
        fixed_bits=float(fixed),
        overhead_per_weight=32 / group_size,
    )


# Projections that read the same input activations, and so share one GPTQ Hessian.
INPUT_SHARING = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
ROUNDINGS = ("gptq", "nearest")
SCALINGS = ("awq", "none")


def _check(widths, group_size) -> None:
    for bits in widths:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"width {bits} is not supported")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group size {group_size} is not supported")


def _quantize_layer(weights: dict[str, mx.array], widths, group_size: int, inputs: dict | None, rounding: str):
    """Quantize one decoder layer's projections at every width; return {bits: {name: QuantizedWeight}}."""
    per_width = {bits: {} for bits in widths}
    for names in INPUT_SHARING:
        if rounding == "gptq":
            x = np.asarray(inputs[names[0]], dtype=np.float64)  # (tokens, in_features)
            factor, dead = inverse_hessian_factor(x.T @ x)
            jobs = [(weights[name], bits) for bits in widths for name in names]
            results = iter(gptq_quantize(jobs, factor, dead, group_size, STORAGE_DTYPE))
            for bits in widths:
                for name in names:
                    per_width[bits][name] = QuantizedWeight(*next(results), bits, group_size)
        else:
            for bits in widths:
                for name in names:
                    packed, scales, biases = quantize_weight(weights[name], bits, group_size, STORAGE_DTYPE)
                    per_width[bits][name] = QuantizedWeight(packed, scales, biases, bits, group_size)
    return per_width


def _output_errors(originals: dict[str, mx.array], per_width: dict, inputs: dict, widths) -> list[float]:
    """Return the layer's relative output error at each width on the captured inputs.

    Each projection P with inputs X has the relative error ||X (W - W_hat)^T||^2 / ||X W^T||^2,
    and the layer's error is their mean weighted by parameter count. Each projection is
    normalised by its own output because some layers have one projection whose outputs
    are thousands of times larger than the others' (a down_proj that writes a massive
    activation). A ratio of sums would then see only that projection and call the layer
    cheap to round, while the other six projections lose as much as anywhere else.
    With activation scaling, X and W are the scaled ones, whose product is the original's.
    """
    sizes = {name: w.size for name, w in originals.items()}
    total_size = sum(sizes.values())
    references = {name: ((inputs[name] @ w.T) ** 2).sum().item() for name, w in originals.items()}
    errors = []
    for bits in widths:
        total = 0.0
        for name, original in originals.items():
            delta = per_width[bits][name].dequantized().astype(mx.float32) - original
            error = ((inputs[name] @ delta.T) ** 2).sum().item()  # (tokens, out) summed
            total += sizes[name] * error / max(references[name], 1e-30)
        errors.append(total / total_size)
    return errors


def layer_weights(layer: nn.Module, scales: dict[str, mx.array] | None = None) -> dict[str, mx.array]:
    """Return {projection name: float32 weight} of one decoder layer, with `scales` folded in."""
    weights = {name: linear_weight(projection(layer, name)).astype(mx.float32) for name in PROJECTIONS}
    return transform_weights(weights, scales) if scales else weights


def quantize_candidates(
    model: nn.Module,
    widths,
    group_size: int,
    calibration: mx.array | None = None,
    rounding: str = "gptq",
    progress: Callable[[int, int], None] | None = None,
    scaling: bool = False,
) -> LayerCandidates:
    """Quantize every projection of every decoder layer at each width in `widths`.

    With `calibration` windows (N, L), one pass captures each layer's inputs, which feed
    GPTQ (when `rounding` is gptq), the activation-scale search (when `scaling` is set)
    and the layer's output error at each width (`candidates.output_error`). Without them,
    rounding is to nearest after the clipping search and only weight errors can be
    measured. The model is not modified: `apply_allocation` folds the scales in.
    """
    from lieq_mlx.analysis.capture import capture_layer_inputs

    _check(widths, group_size)
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding {rounding!r} is invalid; use gptq or nearest")
    if calibration is None and (rounding == "gptq" or scaling):
        raise ValueError("GPTQ rounding and activation scaling need calibration windows")
    _, layers, _ = decoder_parts(model)
    candidates = LayerCandidates(widths=tuple(sorted(widths)), group_size=group_size)
    if calibration is None:
        steps = ((index, None) for index in range(len(layers)))
    else:
        steps = capture_layer_inputs(model, calibration)
        candidates.output_error = np.zeros((len(layers), len(candidates.widths)))
    for index, inputs in steps:
        weights = layer_weights(layers[index])
        scales, alphas = {}, {}
        if scaling:
            producers = scalable_producers(layers[index])
            scales, alphas = search_scales(weights, inputs, candidates.widths, group_size, producers)
            weights = transform_weights(weights, scales)
            inputs = transform_inputs(inputs, scales)
        per_width = _quantize_layer(weights, candidates.widths, group_size, inputs, rounding)
        mx.eval([q.weight for by_name in per_width.values() for q in by_name.values()])
        if inputs is not None:
            candidates.output_error[index] = _output_errors(weights, per_width, inputs, candidates.widths)
        candidates.weights.append(per_width)
        candidates.scales.append(scales)
        candidates.alphas.append(alphas)
        if progress:
            progress(index + 1, len(layers))
    return candidates


def weight_distortion(model: nn.Module, candidates: LayerCandidates) -> np.ndarray:
    """Return D[l, j]: layer l's relative weight error ||W - W_hat||^2 / ||W||^2 at widths[j]."""
    _, layers, _ = decoder_parts(model)
    table = np.zeros((len(layers), len(candidates.widths)))
    for index, layer in enumerate(layers):
        # With activation scaling, the error is measured on the scaled weights that were rounded.
        originals = layer_weights(layer, candidates.scales[index] if candidates.scales else None)
        reference = sum((w * w).sum().item() for w in originals.values())
        for j, bits in enumerate(candidates.widths):
            error = 0.0
            for name, original in originals.items():
                restored = candidates.weights[index][bits][name].dequantized().astype(mx.float32)
                error += ((restored - original) ** 2).sum().item()
            table[index, j] = error / reference
    return table


def apply_allocation(model: nn.Module, candidates: LayerCandidates, allocation) -> dict:
    """Replace each decoder layer's projections with its quantized candidate; return config entries.

    Layers quantized with activation scaling also get their norm weights divided by the scales.
    """
    _, layers, _ = decoder_parts(model)
    entries = {}
    for index, (layer, bits) in enumerate(zip(layers, allocation)):
        scales = candidates.scales[index] if candidates.scales else {}
        for name, weight in norm_weights(layer, scales).items():
            getattr(layer, name).weight = weight
        for name in PROJECTIONS:
            chosen = candidates.weights[index][bits][name]
            original = projection(layer, name)
            out_features, in_features = linear_weight(original).shape
            has_bias = "bias" in original
            module = nn.QuantizedLinear(in_features, out_features, bias=has_bias, group_size=chosen.group_size, bits=bits)
            module.weight, module.scales, module.biases = chosen.weight, chosen.scales, chosen.biases
            if has_bias:
                module.bias = original.bias
            setattr(projection_parent(layer, name), name, module)
            parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            entries[f"model.layers.{index}.{parent}.{name}"] = {"group_size": chosen.group_size, "bits": bits}
    return entries


def quantize_embeddings(model: nn.Module, bits: int, group_size: int) -> dict:
    """Quantize the token embedding (and an untied head) to `bits`; return config entries."""
    if bits >= UNQUANTIZED_BITS:
        return {}
    entries = {}
    embed = model.model.embed_tokens
    if not isinstance(embed, nn.QuantizedEmbedding):
        vocab, dims = embed.weight.shape
        packed, scales, biases = quantize_weight(embed.weight.astype(mx.float32), bits, group_size, STORAGE_DTYPE)
        module = nn.QuantizedEmbedding(vocab, dims, group_size=group_size, bits=bits)
        module.weight, module.scales, module.biases = packed, scales, biases
        model.model.embed_tokens = module
        entries["model.embed_tokens"] = {"group_size": group_size, "bits": bits}
    head = getattr(model, "lm_head", None)
    if head is not None and not isinstance(head, nn.QuantizedLinear):
        out_features, in_features = head.weight.shape
        packed, scales, biases = quantize_weight(head.weight.astype(mx.float32), bits, group_size, STORAGE_DTYPE)
        module = nn.QuantizedLinear(in_features, out_features, bias=False, group_size=group_size, bits=bits)
        module.weight, module.scales, module.biases = packed, scales, biases
        model.lm_head = module
        entries["lm_head"] = {"group_size": group_size, "bits": bits}
    return entries


def round_to_storage(model: nn.Module) -> None:
    """Round the remaining floating parameters (norms) through the storage dtype.

    The in-memory model then computes with the same values that the written folder holds.
    """
    model.set_dtype(STORAGE_DTYPE, predicate=lambda dtype: mx.issubdtype(dtype, mx.floating))
