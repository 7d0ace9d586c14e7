"""Layer-drop saliency: how much perplexity rises when one decoder layer is skipped.

Skipping layer l replaces it by the identity, so its output is its input. The hidden
states that enter each layer in the unmodified model are computed once per window. The
run without layer l then starts from the input of layer l and continues with layers
l + 1 onwards. That gives the same logits as a full pass with layer l removed, at about
half the cost.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lieq_mlx.analysis.model_parts import decoder_parts, run_head


@dataclass(frozen=True)
class SaliencyResult:
    """Perplexity of the full model and of the model with each layer skipped."""

    base_perplexity: float
    skipped_perplexity: list[float]  # one per decoder layer
    windows: int
    seq_len: int
    tokens_scored: int
    seconds: float
    source: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def increase(self) -> list[float]:
        """Perplexity increase of each skipped layer over the full model (perplexity points)."""
        return [p - self.base_perplexity for p in self.skipped_perplexity]

    def to_dict(self) -> dict:
        """Return a JSON-ready dict of the result."""
        return {
            "base_perplexity": self.base_perplexity,
            "skipped_perplexity": list(self.skipped_perplexity),
            "increase": self.increase,
            "windows": self.windows,
            "seq_len": self.seq_len,
            "tokens_scored": self.tokens_scored,
            "seconds": self.seconds,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "SaliencyResult":
        """Build a result from `to_dict` output; raises KeyError or TypeError when malformed."""
        return cls(
            base_perplexity=float(data["base_perplexity"]),
            skipped_perplexity=[float(p) for p in data["skipped_perplexity"]],
            windows=int(data["windows"]),
            seq_len=int(data["seq_len"]),
            tokens_scored=int(data["tokens_scored"]),
            seconds=float(data["seconds"]),
            source=str(data.get("source", "")),
        )


def _nll_sum(model: nn.Module, hidden: mx.array, targets: mx.array) -> float:
    logits = run_head(model, hidden)  # (B, L - 1, vocab)
    nll = nn.losses.cross_entropy(logits, targets, reduction="sum")
    return nll.item()


def layer_drop_saliency(
    model: nn.Module,
    windows: mx.array,
    progress: Callable[[int, int], None] | None = None,
    source: str = "",
) -> SaliencyResult:
    """Measure the perplexity of `model` on `windows` with each decoder layer skipped in turn.

    `windows` contains token ids, shape (N, L). Every token after the first of a window is
    scored, as in `lieq_mlx.perplexity`. Windows run one at a time to bound memory.
    """
    embed, layers, mask_for = decoder_parts(model)
    count, seq_len = windows.shape
    num_layers = len(layers)
    base_total = 0.0
    skipped_total = [0.0] * num_layers
    start = time.perf_counter()
    steps = count * (num_layers + 1)
    done = 0

    for w in range(count):
        inputs = windows[w : w + 1, :-1]  # (1, L - 1)
        targets = windows[w : w + 1, 1:]  # (1, L - 1)
        hidden = embed(inputs)  # (1, L - 1, hidden)
        mask = mask_for(hidden)
        layer_inputs = []
        for layer in layers:
            layer_inputs.append(hidden)
            hidden = layer(hidden, mask)
            mx.eval(hidden)
        base_total += _nll_sum(model, hidden, targets)
        done += 1
        if progress:
            progress(done, steps)

        for skipped in range(num_layers):
            # Layer `skipped` is the identity, so layer `skipped + 1` receives its input.
            hidden = layer_inputs[skipped]
            for layer in layers[skipped + 1 :]:
                hidden = layer(hidden, mask)
            skipped_total[skipped] += _nll_sum(model, hidden, targets)
            done += 1
            if progress:
                progress(done, steps)

    tokens = count * (seq_len - 1)
    return SaliencyResult(
        base_perplexity=math.exp(base_total / tokens),
        skipped_perplexity=[math.exp(total / tokens) for total in skipped_total],
        windows=count,
        seq_len=seq_len,
        tokens_scored=tokens,
        seconds=time.perf_counter() - start,
        source=source,
    )


def spearman(x, y) -> float:
    """Return Spearman's rank correlation of two equal-length sequences (ties get mean ranks)."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise ValueError(f"spearman needs two 1-D sequences of equal length >= 2, got {a.shape} and {b.shape}")
    ra = rank_average(a)
    rb = rank_average(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0.0:
        return float("nan")
    return float((ra * rb).sum() / denominator)


def rank_average(values: np.ndarray) -> np.ndarray:
    """Return 1-based ranks of `values`, giving tied values the mean of their ranks."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(1, values.size + 1, dtype=np.float64)
    unique, inverse = np.unique(values, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    counts = np.bincount(inverse)
    return (sums / counts)[inverse]
