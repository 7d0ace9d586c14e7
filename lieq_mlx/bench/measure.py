"""Timed trials of one model: load time, prefill and generation rates, peak memory.

A trial feeds a fixed random prompt of P token ids through mlx-lm's `generate_step` with a
fresh prompt cache and a greedy sampler, and generates exactly G more tokens: EOS does not
stop it, because only `stream_generate` checks for EOS.
- prefill tokens per second: P / time until the first token, which the prefill forward
  pass produces (mlx-lm's `stream_generate` counts prompt speed the same way);
- generation tokens per second: G / time from the first token to the (G + 1)-th, so G
  decode forward passes of one token each.
Peak memory is MLX's peak of allocated bytes, reset before each phase; it includes the
model weights, which stay allocated.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lieq_mlx.bench.bits import BitCounts, stored_bits
from lieq_mlx.bench.bound import TokenTraffic, embedding_layer, token_traffic

DEFAULT_PROMPT_TOKENS = 256
DEFAULT_GENERATION_TOKENS = 128
DEFAULT_TRIALS = 3
PROMPT_SEED = 0


@dataclass(frozen=True)
class BenchSettings:
    """Prompt length P, generated tokens G and timed trials N (after one warm-up)."""

    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    generation_tokens: int = DEFAULT_GENERATION_TOKENS
    trials: int = DEFAULT_TRIALS
    seed: int = PROMPT_SEED

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "generation_tokens", "trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class Trial:
    """One timed prefill of P tokens followed by G generated tokens."""

    prefill_seconds: float
    prefill_tokens_per_second: float
    generation_seconds: float
    generation_tokens_per_second: float
    prefill_peak_memory_bytes: int
    generation_peak_memory_bytes: int


@dataclass(frozen=True)
class Spread:
    """Median, minimum and maximum of one measure over the timed trials."""

    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Spread":
        return cls(statistics.median(values), min(values), max(values))


@dataclass
class ModelBench:
    """Everything measured for one model."""

    spec: str
    folder: Path
    load_seconds: float
    size_on_disk_bytes: int
    bits: BitCounts
    traffic: TokenTraffic
    warmup: Trial
    trials: list[Trial] = field(default_factory=list)

    @property
    def prefill(self) -> Spread:
        return Spread.of([trial.prefill_tokens_per_second for trial in self.trials])

    @property
    def generation(self) -> Spread:
        return Spread.of([trial.generation_tokens_per_second for trial in self.trials])

    @property
    def peak_memory_bytes(self) -> int:
        """Highest peak of either phase over the timed trials."""
        return max(max(t.prefill_peak_memory_bytes, t.generation_peak_memory_bytes) for t in self.trials)


def random_prompt(model: nn.Module, prompt_tokens: int, seed: int = PROMPT_SEED) -> mx.array:
    """Draw `prompt_tokens` token ids uniformly from the model's embedding rows, seeded."""
    _, embedding = embedding_layer(model)
    vocab_size = int(embedding.weight.shape[0])
    ids = np.random.default_rng(seed).integers(0, vocab_size, size=prompt_tokens, dtype=np.int32)
    return mx.array(ids)  # (prompt_tokens,)


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def run_trial(model: nn.Module, prompt: mx.array, generation_tokens: int) -> tuple[Trial, list]:
    """Time one prefill and `generation_tokens` decode steps; return the trial and its filled cache."""
    from mlx_lm.generate import generate_step, generation_stream
    from mlx_lm.models.cache import make_prompt_cache

    prompt_cache = make_prompt_cache(model)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()

    # max_tokens counts the first token, which comes out of the prefill pass.
    steps = generate_step(
        prompt, model, max_tokens=generation_tokens + 1, sampler=_greedy, prompt_cache=prompt_cache
    )
    start = time.perf_counter()
    next(steps)
    prefill_end = time.perf_counter()
    prefill_peak = mx.get_peak_memory()

    mx.reset_peak_memory()
    generated = sum(1 for _ in steps)
    end = time.perf_counter()
    generation_peak = mx.get_peak_memory()
    # generate_step queues one more decode step before it yields the last token. Waiting
    # for it here, outside the timed span, keeps it from slowing the next trial.
    mx.synchronize(generation_stream)

    if generated != generation_tokens:
        raise RuntimeError(f"generate_step yielded {generated} tokens, expected {generation_tokens}")
    prompt_tokens = int(prompt.shape[0])
    trial = Trial(
        prefill_seconds=prefill_end - start,
        prefill_tokens_per_second=prompt_tokens / (prefill_end - start),
        generation_seconds=end - prefill_end,
        generation_tokens_per_second=generation_tokens / (end - prefill_end),
        prefill_peak_memory_bytes=int(prefill_peak),
        generation_peak_memory_bytes=int(generation_peak),
    )
    return trial, prompt_cache


def size_on_disk(folder: Path) -> int:
    """Sum the sizes in bytes of the weight files (*.safetensors) in `folder`."""
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def bench_model(
    spec: str,
    settings: BenchSettings,
    on_step: Callable[[str], None] | None = None,
) -> ModelBench:
    """Load the model named by `spec` and run one warm-up and `settings.trials` timed trials.

    `on_step(description)` is called before each step (load, warm-up, every trial).
    """
    from lieq_mlx.models import load_model, resolve_model

    report = on_step or (lambda _description: None)
    folder = resolve_model(spec)

    report("loading")
    start = time.perf_counter()
    model, _ = load_model(folder)
    mx.eval(model.parameters())
    load_seconds = time.perf_counter() - start

    bits = stored_bits(folder)
    prompt = random_prompt(model, settings.prompt_tokens, settings.seed)

    report("warm-up")
    warmup, prompt_cache = run_trial(model, prompt, settings.generation_tokens)
    traffic = token_traffic(model, prompt_cache, settings.prompt_tokens, settings.generation_tokens)

    result = ModelBench(
        spec=str(spec),
        folder=folder,
        load_seconds=load_seconds,
        size_on_disk_bytes=size_on_disk(folder),
        bits=bits,
        traffic=traffic,
        warmup=warmup,
    )
    for index in range(settings.trials):
        report(f"trial {index + 1}/{settings.trials}")
        trial, _ = run_trial(model, prompt, settings.generation_tokens)
        result.trials.append(trial)

    del model, prompt_cache
    mx.clear_cache()
    return result
