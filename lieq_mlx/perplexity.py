"""Perplexity of a causal language model over token windows.

Each window is scored on its own, from an empty cache: every token after the first is
predicted from the tokens before it in that window. The standard error comes from the
spread of per-token negative log-likelihoods (delta method: se(ppl) = ppl * se(mean nll)).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    standard_error: float
    mean_nll: float
    tokens_scored: int
    windows: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Tokens run through the model per second (every token of every window)."""
        total = self.tokens_scored + self.windows
        return total / self.seconds if self.seconds > 0 else float("inf")


def window_nll(model: nn.Module, windows: mx.array) -> mx.array:
    """Return the negative log-likelihood of every scored token, shape (B, L - 1)."""
    logits = model(windows[:, :-1]).astype(mx.float32)  # (B, L - 1, vocab)
    return nn.losses.cross_entropy(logits, windows[:, 1:], reduction="none")  # (B, L - 1)


def evaluate_perplexity(
    model: nn.Module,
    windows: mx.array,
    batch_size: int = 4,
    progress: Callable[[int, int], None] | None = None,
) -> PerplexityResult:
    """Score `windows` (shape (N, L) of token ids) and return the perplexity."""
    count = windows.shape[0]
    total = 0.0
    total_sq = 0.0
    scored = 0
    start = time.perf_counter()
    for first in range(0, count, batch_size):
        nll = window_nll(model, windows[first : first + batch_size])
        mx.eval(nll)
        total += nll.sum().item()
        total_sq += (nll * nll).sum().item()
        scored += nll.size
        if progress:
            progress(min(first + batch_size, count), count)
    seconds = time.perf_counter() - start

    mean = total / scored
    variance = max(total_sq / scored - mean * mean, 0.0)
    se_mean = math.sqrt(variance / max(scored - 1, 1))
    perplexity = math.exp(mean)
    return PerplexityResult(
        perplexity=perplexity,
        standard_error=perplexity * se_mean,
        mean_nll=mean,
        tokens_scored=scored,
        windows=count,
        seconds=seconds,
    )
