"""Bytes read per generated token and the decode rate they allow at a given bandwidth.

Generating one token reads every decoder-layer weight, the final norm and the output head
once, one row of the embedding table, and the whole KV cache so far. The count uses the
arrays in memory (float32 on the CPU, so twice the bytes of a float16 file), because that
is what the processor actually reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
from mlx.utils import tree_flatten


@dataclass(frozen=True)
class TokenTraffic:
    """Bytes read from memory to generate one token, split by what is read."""

    weight_bytes: int  # decoder layers, norms, head and one embedding row
    kv_cache_bytes: float  # at the mean context of the generated tokens
    mean_context: float  # tokens in the KV cache, averaged over the generated tokens

    @property
    def total_bytes(self) -> float:
        return self.weight_bytes + self.kv_cache_bytes


def _module_bytes(module: nn.Module) -> int:
    return sum(array.nbytes for _, array in tree_flatten(module.parameters()))


def embedding_layer(model: nn.Module) -> tuple[str, nn.Module]:
    for name, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            return name, module
    raise ValueError("the model has no embedding layer")


def weight_bytes_per_token(model: nn.Module) -> int:
    """Count the weight bytes one decode step reads, from the arrays in memory.

    All parameters, less the embedding table except one row. A model with tied embeddings
    multiplies by the whole table as its output head, so the table counts once more.
    """
    total = _module_bytes(model)
    name, embedding = embedding_layer(model)
    table = _module_bytes(embedding)
    rows = embedding.weight.shape[0]
    tied = not any(key.endswith("lm_head") for key, _ in model.named_modules())
    return total - table + table // rows + (table if tied else 0)


def kv_bytes_per_position(prompt_cache: list) -> int:
    """Count the KV cache bytes per context token: keys and values of every layer.

    Reads the shapes of a filled mlx-lm cache: 2 * layers * n_kv_heads * head_dim * itemsize.
    """
    total = 0
    for layer_cache in prompt_cache:
        keys, values = layer_cache.keys, layer_cache.values
        if keys is None or values is None:
            raise ValueError("the prompt cache is empty; fill it with a forward pass first")
        _, n_kv_heads, _, head_dim = keys.shape  # (batch, n_kv_heads, capacity, head_dim)
        total += n_kv_heads * head_dim * keys.dtype.size
        _, n_kv_heads, _, head_dim = values.shape
        total += n_kv_heads * head_dim * values.dtype.size
    return total


def token_traffic(model: nn.Module, prompt_cache: list, prompt_tokens: int, generation_tokens: int) -> TokenTraffic:
    """Count the bytes read per generated token, averaged over `generation_tokens` decode steps.

    Decode step i (1-based) attends over prompt_tokens + i cached positions, so the mean
    context is prompt_tokens + (generation_tokens + 1) / 2.
    """
    mean_context = prompt_tokens + (generation_tokens + 1) / 2
    return TokenTraffic(
        weight_bytes=weight_bytes_per_token(model),
        kv_cache_bytes=kv_bytes_per_position(prompt_cache) * mean_context,
        mean_context=mean_context,
    )


def decode_bound(bandwidth_gb_s: float, traffic: TokenTraffic) -> float:
    """Return the most tokens per second that `bandwidth_gb_s` allows for `traffic`."""
    return bandwidth_gb_s * 1e9 / traffic.total_bytes
