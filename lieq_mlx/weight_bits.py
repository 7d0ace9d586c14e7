"""Bits per weight of a loaded model, counted both ways: nominal and effective.

- nominal: parameter-weighted mean width of the decoder layers' linear weights, without
  scale or bias overhead;
- effective: every stored bit of the model (codes, scales, biases, embeddings, head,
  norms) divided by its parameter count, as `mlx_lm.utils.compute_bits_per_weight` counts.

A folder written by `lieq-mlx quantize` records both in `lieq.json`, and those values are
used as they are. For other folders they are computed here. The effective count reads the
tensor sizes from the safetensors headers, because `load_model` casts floating-point
tensors to the compute dtype, which would change the count of the loaded arrays.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn
from mlx_lm.utils import get_total_parameters

RECORD_FILE = "lieq.json"

# Bytes per element of each safetensors dtype name.
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}


@dataclass
class WeightBits:
    """Bits per weight of a model; `nominal_bits` is None for an unquantized model."""

    nominal_bits: float | None
    effective_bits: float
    quantized: bool
    source: str  # "lieq.json" or "computed"

    def describe(self) -> str:
        """Return a one-line summary with units, for the chat header."""
        if not self.quantized:
            width = round(self.effective_bits)
            return f"unquantized ({width}-bit float weights stored, {self.effective_bits:.2f} effective bits per weight)"
        nominal = f"{self.nominal_bits:.2f} nominal" if self.nominal_bits is not None else "nominal unknown"
        return f"{nominal}, {self.effective_bits:.2f} effective bits per weight ({self.source})"


def read_safetensors_header(path: Path) -> dict:
    """Return the JSON header of a safetensors file: tensor name to dtype, shape and offsets."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def stored_tensors(folder: Path) -> dict[str, tuple[str, int]]:
    """Map each tensor name in the folder's safetensors files to (dtype, bytes)."""
    tensors: dict[str, tuple[str, int]] = {}
    for path in sorted(folder.glob("*.safetensors")):
        for name, entry in read_safetensors_header(path).items():
            start, end = entry["data_offsets"]
            tensors[name] = (entry["dtype"], end - start)
    return tensors


def _is_quantized(module: nn.Module) -> bool:
    return isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))


def nominal_bits(model: nn.Module, tensors: dict[str, tuple[str, int]]) -> float | None:
    """Return the parameter-weighted mean width of the decoder layers' linear weights.

    Unquantized linear weights count at their stored width. Returns None when the model has
    no `layers` list of decoder layers or they hold no linear layer.
    """
    total_params = 0
    total_bits = 0.0
    for name, module in model.named_modules():
        if ".layers." not in f".{name}" or not isinstance(module, (nn.Linear, nn.QuantizedLinear)):
            continue
        if isinstance(module, nn.QuantizedLinear):
            out_features, packed = module.weight.shape  # (out, in * bits / 32) uint32
            params = out_features * packed * 32 // module.bits
            bits = module.bits
        else:
            params = module.weight.size
            dtype = tensors.get(f"{name}.weight", ("F16", 0))[0]
            bits = 8 * SAFETENSORS_DTYPE_BYTES.get(dtype, 2)
        total_params += params
        total_bits += params * bits
    return total_bits / total_params if total_params else None


def read_weight_bits(model: nn.Module, folder: Path) -> WeightBits:
    """Return the model's bits per weight, from `lieq.json` when the folder has one."""
    quantized = any(_is_quantized(module) for _, module in model.named_modules())
    record_path = folder / RECORD_FILE
    if record_path.is_file():
        try:
            record = json.loads(record_path.read_text())
            return WeightBits(
                nominal_bits=float(record["nominal_bits"]),
                effective_bits=float(record["effective_bits"]),
                quantized=quantized,
                source=RECORD_FILE,
            )
        except (ValueError, KeyError, TypeError):
            pass  # A malformed record: count from the weights instead.

    tensors = stored_tensors(folder)
    stored_bytes = sum(size for _, size in tensors.values())
    effective = stored_bytes * 8 / get_total_parameters(model)
    return WeightBits(
        nominal_bits=nominal_bits(model, tensors) if quantized else None,
        effective_bits=effective,
        quantized=quantized,
        source="computed",
    )
