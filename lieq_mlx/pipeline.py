"""The quantization pipeline: scores and distortion in, a quantized model and its record out."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

import lieq_mlx
from lieq_mlx.allocation import (
    POLICIES,
    achievable_range,
    allocate_lieq,
    allocate_paper,
    allocate_random,
    allocate_uniform,
    check_budget,
    format_widths,
)
from lieq_mlx.errors import BudgetError
from lieq_mlx.quantize import (
    DISTORTIONS,
    ROUNDINGS,
    SCALINGS,
    apply_allocation,
    build_accounting,
    quantize_candidates,
    quantize_embeddings,
    round_to_storage,
    weight_distortion,
)
from lieq_mlx.quantizers import SUPPORTED_BITS, SUPPORTED_GROUP_SIZES

DEFAULT_WIDTHS = {"lieq": (1, 2, 3, 4), "paper": (2, 4), "uniform": (2, 3, 4), "random": (2, 4)}
COUNTS = ("nominal", "effective")
# A tied embedding is also the output head: at 2 bits it ruins a model, so it keeps 6 bits.
DEFAULT_EMBED_BITS = 6

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class QuantizeSettings:
    target_bits: float = 2.5
    count: str = "nominal"
    policy: str = "lieq"
    widths: tuple[int, ...] | None = None
    group_size: int = 64
    embed_bits: int = DEFAULT_EMBED_BITS
    embed_group_size: int = 64
    distortion: str = "output"
    rounding: str = "gptq"
    scaling: str = "awq"
    seed: int = 0

    def resolved_widths(self) -> tuple[int, ...]:
        return tuple(sorted(set(self.widths or DEFAULT_WIDTHS[self.policy])))

    def validate(self) -> None:
        """Raise `BudgetError` with the fix for any invalid setting."""
        if self.policy not in POLICIES:
            raise BudgetError(f"--policy {self.policy!r} is invalid; choose one of {', '.join(POLICIES)}")
        if self.count not in COUNTS:
            raise BudgetError(f"--count {self.count!r} is invalid; choose nominal or effective")
        widths = self.resolved_widths()
        bad = [w for w in widths if w not in SUPPORTED_BITS]
        if bad or not widths:
            raise BudgetError(
                f"--bits {format_widths(widths)} is invalid; widths must come from "
                f"{format_widths(SUPPORTED_BITS)}"
            )
        if self.policy == "paper" and len(widths) != 2:
            raise BudgetError(f"the paper policy takes exactly two widths, not {format_widths(widths)}; e.g. --bits 2,4")
        for name, value in (("--group-size", self.group_size), ("--embed-group-size", self.embed_group_size)):
            if value not in SUPPORTED_GROUP_SIZES:
                raise BudgetError(f"{name} {value} is invalid; choose 32, 64 or 128")
        if self.embed_bits not in SUPPORTED_BITS + (16,):
            raise BudgetError(f"--embed-bits {self.embed_bits} is invalid; choose 2, 3, 4, 5, 6, 8 or 16 (unquantized)")
        if self.embed_bits == 1:
            raise BudgetError("--embed-bits 1 is invalid; choose 2, 3, 4, 5, 6, 8 or 16 (unquantized)")
        if self.rounding not in ROUNDINGS:
            raise BudgetError(f"--rounding {self.rounding!r} is invalid; choose gptq or nearest")
        if self.scaling not in SCALINGS:
            raise BudgetError(f"--scaling {self.scaling!r} is invalid; choose awq or none")
        if self.distortion not in DISTORTIONS:
            raise BudgetError(f"--distortion {self.distortion!r} is invalid; choose weight or output")


@dataclass
class QuantizeResult:
    allocation: list[int]
    nominal_bits: float
    effective_bits: float
    scores: list[float] | None
    distortion: list[list[float]] | None
    quantization: dict
    scaling_alphas: list[dict[str, float]] | None = None
    seconds: dict[str, float] = field(default_factory=dict)


def needs_scores(policy: str) -> bool:
    return policy in ("lieq", "paper")


def needs_calibration(settings: QuantizeSettings) -> bool:
    """True when GPTQ rounding, activation scaling or the output distortion of `lieq` needs calibration windows."""
    return (
        settings.rounding == "gptq"
        or settings.scaling == "awq"
        or (settings.policy == "lieq" and settings.distortion == "output")
    )


def budget_range(model: nn.Module, settings: QuantizeSettings) -> tuple[float, float]:
    """Return the lowest and highest bits the widths allow for `model`, counted as in `settings`."""
    accounting = build_accounting(model, settings.group_size, settings.embed_bits, settings.embed_group_size)
    return achievable_range(accounting, settings.resolved_widths(), settings.count)


def quantize_model(
    model: nn.Module,
    settings: QuantizeSettings,
    scores: list[float] | None = None,
    calibration: mx.array | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Quantize `model` in place under `settings`; return the allocation and its bit counts.

    `scores` (one per decoder layer) are required by the `lieq` and `paper` policies;
    `calibration` windows (N, L) are required by GPTQ rounding and by the `output`
    distortion of `lieq`. The model's parameters are left in the storage dtype (float16),
    ready to write; cast them with `models.cast_floats` before computing on the CPU.
    """
    settings.validate()
    widths = settings.resolved_widths()
    seconds: dict[str, float] = {}
    accounting = build_accounting(model, settings.group_size, settings.embed_bits, settings.embed_group_size)
    cap = check_budget(accounting, widths, settings.target_bits, settings.count)
    num_layers = len(accounting.layer_params)
    if needs_scores(settings.policy):
        if scores is None:
            raise BudgetError(f"the {settings.policy} policy needs layer scores; run the analysis or pass --scores")
        if len(scores) != num_layers:
            raise BudgetError(f"{len(scores)} scores given for a model with {num_layers} decoder layers")

    if needs_calibration(settings) and calibration is None:
        raise BudgetError("GPTQ rounding, activation scaling and the output distortion need calibration windows")

    start = time.perf_counter()
    report = (lambda done, total: progress("quantizing candidates", done, total)) if progress else None
    candidates = quantize_candidates(
        model, widths, settings.group_size, calibration, settings.rounding, report, scaling=settings.scaling == "awq"
    )
    seconds["quantize"] = time.perf_counter() - start

    distortion = None
    start = time.perf_counter()
    if settings.policy == "lieq":
        if settings.distortion == "output":
            distortion = candidates.output_error
        else:
            distortion = weight_distortion(model, candidates)
        allocation = allocate_lieq(accounting, scores, distortion, widths, cap)
    elif settings.policy == "paper":
        allocation = allocate_paper(accounting, scores, widths, cap)
    elif settings.policy == "uniform":
        allocation = allocate_uniform(accounting, widths, cap)
    else:
        allocation = allocate_random(accounting, widths, cap, settings.seed)
    seconds["allocate"] = time.perf_counter() - start

    start = time.perf_counter()
    quantization = {"group_size": settings.group_size, "bits": max(allocation), "mode": "affine"}
    quantization.update(quantize_embeddings(model, settings.embed_bits, settings.embed_group_size))
    quantization.update(apply_allocation(model, candidates, allocation))
    round_to_storage(model)
    mx.eval(model.parameters())
    seconds["build"] = time.perf_counter() - start

    return QuantizeResult(
        allocation=[int(b) for b in allocation],
        nominal_bits=accounting.nominal_bits(allocation),
        effective_bits=accounting.effective_bits(allocation),
        scores=[float(s) for s in scores] if scores is not None else None,
        distortion=np.asarray(distortion).tolist() if distortion is not None else None,
        quantization=quantization,
        scaling_alphas=candidates.alphas if settings.scaling == "awq" else None,
        seconds=seconds,
    )


def make_record(settings: QuantizeSettings, result: QuantizeResult, source: str, calibration: dict | None) -> dict:
    """Return the contents of `lieq.json`: how a quantized folder was made."""
    return {
        "tool": "lieq-mlx",
        "version": lieq_mlx.__version__,
        "source": source,
        "settings": {**asdict(settings), "widths": list(settings.resolved_widths())},
        "policy": settings.policy,
        "widths": list(settings.resolved_widths()),
        "layer_bits": result.allocation,
        "nominal_bits": result.nominal_bits,
        "effective_bits": result.effective_bits,
        "scores": result.scores,
        "distortion": result.distortion,
        "scaling_alphas": result.scaling_alphas,
        "calibration": calibration,
        "seconds": result.seconds,
    }
