"""Bits per weight of a loaded model, described for the chat header.

`lieq_mlx.bench.bits` counts nominal and effective bits, from `lieq.json` when the folder
has one. This module adds whether the loaded model is quantized and a one-line description
with units.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.nn as nn

from lieq_mlx.bench.bits import LIEQ_METADATA_FILE, stored_bits


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


def read_weight_bits(model: nn.Module, folder: Path) -> WeightBits:
    """Return the model's bits per weight, from `lieq.json` when the folder has one."""
    # Kernel modules that replace quantized layers on Metal keep `bits` as well.
    quantized = any(hasattr(m, "bits") for _, m in model.named_modules())
    counts = stored_bits(Path(folder))
    from_record = counts.source == LIEQ_METADATA_FILE
    return WeightBits(
        nominal_bits=counts.nominal_bits if (quantized or from_record) else None,
        effective_bits=counts.effective_bits,
        quantized=quantized,
        source=LIEQ_METADATA_FILE if from_record else "computed",
    )
