"""Access to the pieces of an mlx-lm decoder model: embeddings, decoder layers, head.

The analysis runs a model one decoder layer at a time, so it needs the pieces that
`Model.__call__` chains. These helpers cover the mlx-lm models laid out like Llama
(`model.model.embed_tokens`, `model.layers`, `model.model.norm`, tied embeddings or
`lm_head`), which includes Llama, Qwen2/3, Mistral and SmolLM.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask

from lieq_mlx.errors import UnsupportedModelError

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS


def decoder_parts(model: nn.Module) -> tuple[nn.Module, list[nn.Module], Callable[[mx.array], object]]:
    """Return (embedding, decoder layers, mask builder) of an mlx-lm decoder model."""
    inner = getattr(model, "model", None)
    embed = getattr(inner, "embed_tokens", None)
    layers = getattr(model, "layers", None)
    if embed is None or not layers or getattr(inner, "norm", None) is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} does not have the Llama layout (model.embed_tokens, "
            "layers, model.norm) that the analysis runs layer by layer"
        )
    for name in PROJECTIONS:
        if projection(layers[0], name) is None:
            raise UnsupportedModelError(
                f"decoder layer of {type(model).__name__} has no {name}; the analysis needs "
                "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj"
            )

    def mask_for(hidden: mx.array):
        # Causal attention without a cache, as in a full forward pass of the model.
        return create_attention_mask(hidden, None)

    return embed, list(layers), mask_for


def projection_parent(layer: nn.Module, name: str) -> nn.Module:
    """Return the submodule (`self_attn` or `mlp`) that contains projection `name`."""
    return layer.self_attn if name in ATTENTION_PROJECTIONS else layer.mlp


def projection(layer: nn.Module, name: str) -> nn.Module | None:
    """Return projection `name` of a decoder layer, or None when it has none."""
    parent = getattr(layer, "self_attn" if name in ATTENTION_PROJECTIONS else "mlp", None)
    return getattr(parent, name, None)


def projection_weight(layer: nn.Module, name: str) -> mx.array:
    """Return the float32 weight (out_features, in_features) of projection `name`."""
    module = projection(layer, name)
    if isinstance(module, nn.QuantizedLinear):
        weight = mx.dequantize(
            module.weight, module.scales, module.biases, group_size=module.group_size, bits=module.bits
        )
    else:
        weight = module.weight
    return weight.astype(mx.float32)


def run_head(model: nn.Module, hidden: mx.array) -> mx.array:
    """Apply the final norm and the output head to the last hidden states; return logits."""
    hidden = model.model.norm(hidden)
    if hasattr(model, "lm_head"):
        logits = model.lm_head(hidden)
    else:
        logits = model.model.embed_tokens.as_linear(hidden)
    return logits.astype(mx.float32)
