"""Bit allocation: one width per decoder layer under an average-bit budget.

Policies:
- `uniform`: every layer at the largest width that fits the budget;
- `random`: a seeded random allocation over the widths that uses the budget as fully as
  the widths allow, the fair equal-budget baseline;
- `paper`: two widths; the top-m layers by score get the high one, with m the largest
  count that fits;
- `lieq`: any set of widths. It minimises sum_l importance_l * N_l * D_l(b_l) under the
  budget, solved exactly as a multiple-choice knapsack by dynamic programming.

The budget constrains `sum_l N_l * b_l`, the decoder-layer linear weights' bits, where N_l
is layer l's parameter count. `BitAccounting` turns a nominal or effective target into
that bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from lieq_mlx.errors import BudgetError

POLICIES = ("lieq", "paper", "uniform", "random")


@dataclass(frozen=True)
class BitAccounting:
    """Parameter and bit counts of one model, for nominal and effective bits.

    `layer_params` are the decoder layers' linear weight counts. `fixed_bits` are the
    stored bits outside those weights (embeddings, head, norms); `total_params` counts
    every parameter of the model. Each quantized weight also stores a float16 scale and
    bias per group: `overhead_per_weight` = 32 / group_size bits.
    """

    layer_params: tuple[int, ...]
    total_params: int
    fixed_bits: float
    overhead_per_weight: float

    def nominal_bits(self, allocation) -> float:
        weights = np.asarray(self.layer_params, dtype=np.float64)
        return float((weights * np.asarray(allocation)).sum() / weights.sum())

    def effective_bits(self, allocation) -> float:
        weights = np.asarray(self.layer_params, dtype=np.float64)
        layer_bits = (weights * (np.asarray(allocation) + self.overhead_per_weight)).sum()
        return float((layer_bits + self.fixed_bits) / self.total_params)

    def count(self, allocation, how: str) -> float:
        return self.nominal_bits(allocation) if how == "nominal" else self.effective_bits(allocation)

    def weight_bit_cap(self, target: float, how: str) -> float:
        """Return the most bits `sum_l N_l * b_l` may take for `target` counted `how`."""
        weights = float(sum(self.layer_params))
        if how == "nominal":
            return target * weights
        return target * self.total_params - self.fixed_bits - self.overhead_per_weight * weights


def achievable_range(accounting: BitAccounting, widths, how: str) -> tuple[float, float]:
    n = len(accounting.layer_params)
    return (
        accounting.count([min(widths)] * n, how),
        accounting.count([max(widths)] * n, how),
    )


def check_budget(accounting: BitAccounting, widths, target: float, how: str) -> float:
    """Return the weight-bit cap for `target`; raise `BudgetError` when it is out of reach."""
    low, high = achievable_range(accounting, widths, how)
    tolerance = 1e-9 * max(1.0, abs(target))
    if not (low - tolerance <= target <= high + tolerance):
        raise BudgetError(
            f"--target-bits {target:g} ({how}) is outside what widths {format_widths(widths)} allow "
            f"for this model: choose a value from {low:.3f} to {high:.3f}"
        )
    return accounting.weight_bit_cap(target, how) * (1 + 1e-12)


def format_widths(widths) -> str:
    return ",".join(str(w) for w in sorted(widths))


def _bits_used(accounting: BitAccounting, allocation) -> float:
    return float(np.dot(accounting.layer_params, allocation))


def allocate_uniform(accounting: BitAccounting, widths, cap: float) -> list[int]:
    n = len(accounting.layer_params)
    for width in sorted(widths, reverse=True):
        if _bits_used(accounting, [width] * n) <= cap:
            return [width] * n
    raise BudgetError("no single width fits the budget")  # check_budget prevents this


def allocate_paper(accounting: BitAccounting, scores, widths, cap: float) -> list[int]:
    """Give the top-m layers by score the high width, the rest the low one, m as large as fits."""
    if len(widths) != 2:
        raise BudgetError(f"the paper policy takes exactly two widths, not {format_widths(widths)}; e.g. --bits 2,4")
    low, high = sorted(widths)
    n = len(scores)
    order = np.argsort(-np.asarray(scores), kind="stable")
    allocation = [low] * n
    for layer in order:
        trial = list(allocation)
        trial[layer] = high
        if _bits_used(accounting, trial) > cap:
            break
        allocation = trial
    return allocation


def allocate_knapsack(accounting: BitAccounting, costs: np.ndarray, widths, cap: float) -> list[int]:
    """Minimise sum_l costs[l, j] over one width j per layer with sum_l N_l * w_j <= cap.

    Exact dynamic programming over the budget in units of the greatest common divisor of
    the layers' bit counts, so models whose layers share shapes solve in microseconds.
    """
    widths = sorted(widths)
    params = [int(p) for p in accounting.layer_params]
    unit = reduce(math.gcd, [p * w for p in params for w in widths])
    capacity = int(math.floor(cap / unit + 1e-9))
    weights = [[p * w // unit for w in widths] for p in params]
    if capacity > 2_000_000:
        # NOTE: layers of many different shapes make the exact table large. A coarser unit
        # keeps it tractable, at the price of up to one unit of unused budget per layer.
        unit = math.ceil(cap / 2_000_000)
        capacity = int(cap // unit)
        weights = [[math.ceil(p * w / unit) for w in widths] for p in params]

    infinity = float("inf")
    best = np.full(capacity + 1, infinity)
    best[0] = 0.0
    choices = []
    for layer, layer_weights in enumerate(weights):
        new = np.full(capacity + 1, infinity)
        choice = np.full(capacity + 1, -1, dtype=np.int64)
        for j, weight in enumerate(layer_weights):
            if weight > capacity:
                continue
            candidate = np.full(capacity + 1, infinity)
            candidate[weight:] = best[: capacity + 1 - weight] + costs[layer, j]
            better = candidate < new
            new[better] = candidate[better]
            choice[better] = j
        best = new
        choices.append(choice)
    if not np.isfinite(best).any():
        raise BudgetError("no allocation fits the budget")  # check_budget prevents this

    # Among optimal cells, the one using most budget; then walk the choices back.
    finite = np.isfinite(best)
    minimum = best[finite].min()
    cell = int(np.flatnonzero(finite & (best <= minimum + 1e-12 * max(1.0, abs(minimum))))[-1])
    allocation = [0] * len(params)
    for layer in range(len(params) - 1, -1, -1):
        j = int(choices[layer][cell])
        allocation[layer] = widths[j]
        cell -= weights[layer][j]
    return allocation


def importance_weights(scores) -> np.ndarray:
    """Map proxy scores to positive weights of the knapsack objective.

    Scores are shifted so that the least important layer keeps a tenth of the range:
    a negative or zero score must not make a layer's error free.
    """
    scores = np.asarray(scores, dtype=np.float64)
    spread = scores.max() - scores.min()
    if spread <= 0:
        return np.ones_like(scores)
    return (scores - scores.min()) / spread + 0.1


def allocate_lieq(accounting: BitAccounting, scores, distortion: np.ndarray, widths, cap: float) -> list[int]:
    """Solve the LieQ knapsack: `distortion[l, j]` is layer l's relative error at widths[j]."""
    widths = sorted(widths)
    weights = importance_weights(scores)[:, None] * np.asarray(accounting.layer_params, dtype=np.float64)[:, None]
    costs = weights * np.asarray(distortion, dtype=np.float64)
    return allocate_knapsack(accounting, costs, widths, cap)


def allocate_random(accounting: BitAccounting, widths, cap: float, seed: int) -> list[int]:
    """Start every layer at the lowest width and raise random layers one step while it fits."""
    widths = sorted(widths)
    rng = np.random.default_rng(seed)
    n = len(accounting.layer_params)
    level = [0] * n
    while True:
        open_layers = [
            layer
            for layer in range(n)
            if level[layer] + 1 < len(widths)
            and _bits_used(accounting, [widths[v] for v in level])
            + accounting.layer_params[layer] * (widths[level[layer] + 1] - widths[level[layer]])
            <= cap
        ]
        if not open_layers:
            return [widths[v] for v in level]
        level[int(rng.choice(open_layers))] += 1
