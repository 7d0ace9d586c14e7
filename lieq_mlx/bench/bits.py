"""Nominal and effective bits of a stored model, as the benchmark reports them.

Both counts describe the model as stored on disk, not the float32 copy that the CPU
computes with:
- nominal_bits: parameter-weighted mean width of the decoder layers' linear weights, with
  no scale or bias overhead. A quantized layer counts its `bits`; an unquantized one
  counts the bit width of its stored dtype (16 for float16 and bfloat16, 32 for float32).
- effective_bits: every stored bit of the model (codes, scales, biases, embeddings, head,
  norms) divided by its parameter count, from `mlx_lm.utils.compute_bits_per_weight`.

A folder written by `lieq-mlx quantize` states both in `lieq.json`; those values win.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten

LIEQ_METADATA_FILE = "lieq.json"


@dataclass(frozen=True)
class BitCounts:
    """Nominal and effective bits of one model and where they came from."""

    nominal_bits: float
    effective_bits: float
    source: str  # "lieq.json" or "computed from the stored weights"


def read_lieq_bits(folder: Path) -> BitCounts | None:
    """Read nominal and effective bits from `lieq.json`; None when absent or incomplete."""
    path = folder / LIEQ_METADATA_FILE
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    nominal = metadata.get("nominal_bits") if isinstance(metadata, dict) else None
    effective = metadata.get("effective_bits") if isinstance(metadata, dict) else None
    if not isinstance(nominal, (int, float)) or not isinstance(effective, (int, float)):
        return None
    return BitCounts(float(nominal), float(effective), LIEQ_METADATA_FILE)


def linear_weight_widths(model: nn.Module) -> list[tuple[int, int]]:
    """List (bits, parameter count) of every linear layer inside the decoder layers."""
    widths = []
    leaves = [layer.leaf_modules() for layer in model.layers]
    for _, module in tree_flatten(leaves, is_leaf=lambda m: isinstance(m, nn.Module)):
        if isinstance(module, nn.QuantizedLinear):
            # A packed uint32 word contains 32 / bits codes.
            widths.append((module.bits, module.weight.size * 32 // module.bits))
        elif isinstance(module, nn.Linear):
            widths.append((module.weight.dtype.size * 8, module.weight.size))
    return widths


def nominal_bits(model: nn.Module) -> float:
    """Compute the parameter-weighted mean width of the decoder layers' linear weights."""
    widths = linear_weight_widths(model)
    parameters = sum(count for _, count in widths)
    if parameters == 0:
        raise ValueError("the model has no linear layers inside model.layers")
    return sum(bits * count for bits, count in widths) / parameters


def stored_bits(folder: Path) -> BitCounts:
    """Count nominal and effective bits of the model stored in `folder`.

    Uses `lieq.json` when it states both. Otherwise loads the model lazily with its stored
    dtypes (no cast, nothing read but the safetensors headers) and counts from that.
    """
    from_metadata = read_lieq_bits(folder)
    if from_metadata is not None:
        return from_metadata

    from mlx_lm.utils import compute_bits_per_weight, load_model

    stored_model, _ = load_model(Path(folder), lazy=True)
    return BitCounts(
        nominal_bits=nominal_bits(stored_model),
        effective_bits=compute_bits_per_weight(stored_model),
        source="computed from the stored weights",
    )
