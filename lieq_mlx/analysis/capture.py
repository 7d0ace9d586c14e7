"""Capture of the inputs of every linear projection, one decoder layer at a time.

The windows run through the embeddings, then through each decoder layer in turn with
the model's causal mask. Only the hidden states between two layers are kept, plus the
inputs of the layer being captured, so memory stays at one layer's activations whatever
the depth. Recording wrappers stand in for the seven projections during that layer's
forward pass, which captures the inputs of `o_proj` and `down_proj` (computed inside
the layer) as well as the shared inputs of q/k/v and gate/up.
"""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import mlx.nn as nn

from lieq_mlx.analysis.model_parts import PROJECTIONS, decoder_parts, projection_parent

# Windows per forward call: bounds the attention scores (batch, heads, L, L) in memory.
DEFAULT_BATCH = 8


class _RecordingProjection(nn.Module):
    """A projection that records its inputs before applying the wrapped module."""

    def __init__(self, wrapped: nn.Module):
        super().__init__()
        self.wrapped = wrapped
        self.records: list[mx.array] = []

    def __call__(self, x: mx.array) -> mx.array:
        self.records.append(x)
        return self.wrapped(x)


def _run_layer_recording(layer: nn.Module, hidden: mx.array, mask, batch: int) -> tuple[mx.array, dict[str, mx.array]]:
    """Run one decoder layer on `hidden` (N, L, D); return its output and the projection inputs."""
    wrappers = {}
    for name in PROJECTIONS:
        parent = projection_parent(layer, name)
        wrappers[name] = _RecordingProjection(getattr(parent, name))
        setattr(parent, name, wrappers[name])
    try:
        outputs = []
        for first in range(0, hidden.shape[0], batch):
            out = layer(hidden[first : first + batch], mask)
            mx.eval(out, [w.records[-1] for w in wrappers.values()])
            outputs.append(out)
    finally:
        for name, wrapper in wrappers.items():
            setattr(projection_parent(layer, name), name, wrapper.wrapped)

    inputs: dict[str, mx.array] = {}
    shared: dict[int, mx.array] = {}
    for name, wrapper in wrappers.items():
        # q/k/v (and gate/up) receive the same array; flatten it once and share the result.
        key = id(wrapper.records[0])
        if key not in shared:
            x = mx.concatenate(wrapper.records, axis=0)  # (N, L, in_features)
            shared[key] = x.reshape(-1, x.shape[-1]).astype(mx.float32)  # (tokens, in_features)
        inputs[name] = shared[key]
    mx.eval(list(shared.values()))
    return mx.concatenate(outputs, axis=0), inputs


def capture_layer_inputs(
    model: nn.Module,
    windows: mx.array,
    batch: int = DEFAULT_BATCH,
) -> Iterator[tuple[int, dict[str, mx.array]]]:
    """Yield (layer index, inputs) for every decoder layer of `model` on `windows`.

    `windows` contains token ids, shape (N, L). `inputs` maps each projection name
    (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj) to its input
    activations, shape (N * L, in_features), float32; q/k/v share one array and
    gate/up share another. The generator holds one layer's inputs at a time: a caller
    that needs them after the next step must keep its own reference.
    """
    embed, layers, mask_for = decoder_parts(model)
    hidden = embed(windows)  # (N, L, hidden)
    mx.eval(hidden)
    mask = mask_for(hidden)
    for index, layer in enumerate(layers):
        hidden, inputs = _run_layer_recording(layer, hidden, mask, batch)
        yield index, inputs
        del inputs
