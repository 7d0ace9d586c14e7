"""Calibration tokens: windows sampled from a user's text, or text the model writes itself.

Without a calibration file, the model samples its own text (temperature 1, a seeded random
first token per sample), so quantization needs no data set. Text from the user's own
domain is still the better choice when there is one.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from lieq_mlx.data import read_text, sample_windows, tokenize

DEFAULT_SAMPLES = 8
DEFAULT_SEQ_LEN = 256


def self_generated_windows(model: nn.Module, tokenizer, samples: int, seq_len: int, seed: int) -> mx.array:
    """Sample `samples` sequences of `seq_len` tokens from the model itself; shape (samples, seq_len)."""
    rng = np.random.default_rng(seed)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    vocab = model.model.embed_tokens.weight.shape[0]
    first = [int(t) for t in rng.integers(0, vocab, size=samples * 4) if int(t) not in special][:samples]
    key = mx.random.key(seed)

    cache = make_prompt_cache(model)
    tokens = mx.array(first, dtype=mx.int32)[:, None]  # (samples, 1)
    generated = [tokens]
    for _ in range(seq_len - 1):
        logits = model(tokens, cache=cache)[:, -1, :]  # (samples, vocab)
        key, subkey = mx.random.split(key)
        tokens = mx.random.categorical(logits.astype(mx.float32), key=subkey)[:, None]
        generated.append(tokens)
        mx.eval(tokens)
    return mx.concatenate(generated, axis=1).astype(mx.int32)  # (samples, seq_len)


def calibration_windows(
    model: nn.Module,
    tokenizer,
    calib_path: str | Path | None,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    seed: int = 0,
) -> tuple[mx.array, dict]:
    """Return calibration windows (samples, seq_len) and a description of where they came from."""
    settings = {"samples": samples, "seq_len": seq_len, "seed": seed}
    if calib_path is None:
        settings["source"] = "self-generated"
        return self_generated_windows(model, tokenizer, samples, seq_len, seed), settings
    tokens = tokenize(tokenizer, read_text(calib_path))
    settings["source"] = str(Path(calib_path).expanduser().resolve())
    return sample_windows(tokens, seq_len, samples, seed, source=str(calib_path)), settings
