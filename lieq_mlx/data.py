"""Text data: reading plain text files and cutting token windows.

Perplexity uses consecutive windows of the whole text tokenized once, without BOS.
Calibration samples windows from a text with a seeded generator.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from lieq_mlx.errors import DataError

WIKITEXT_HINT = (
    "pass a plain text file as --data FILE; the usual choice is the test split of WikiText-2 "
    "(raw), wiki.test.raw, published as the Hugging Face dataset Salesforce/wikitext "
    "(config wikitext-2-raw-v1)"
)


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file, with or without a byte-order mark; reject empty files."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DataError(f"{path} is a folder, not a text file; pass the path of a plain UTF-8 text file")
    if not path.is_file():
        raise DataError(f"text file {path} not found; pass the path of a plain UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"text file {path} is not UTF-8 ({error.reason} at byte {error.start})") from None
    if not text.strip():
        raise DataError(f"text file {path} is empty; pass a file with text in it")
    return text


def tokenize(tokenizer, text: str) -> np.ndarray:
    """Tokenize `text` once, without BOS or other special tokens; return int32 ids."""
    # The Rust backend of a fast tokenizer skips transformers' warning about texts longer
    # than the model's context, which does not apply to text that is cut into windows.
    hf_tokenizer = getattr(tokenizer, "_tokenizer", tokenizer)
    backend = getattr(hf_tokenizer, "backend_tokenizer", None)
    if backend is not None:
        ids = backend.encode(text, add_special_tokens=False).ids
    else:
        ids = tokenizer.encode(text, add_special_tokens=False)
    return np.asarray(ids, dtype=np.int32)


def consecutive_windows(tokens: np.ndarray, seq_len: int, count: int | None, source: str = "text") -> mx.array:
    """Cut the first `count` consecutive windows of `seq_len` tokens (all when None)."""
    if seq_len < 2:
        raise DataError(f"--seq-len {seq_len} is too small; use at least 2 tokens")
    if count is not None and count < 1:
        raise DataError(f"--windows {count} is invalid; pass a positive number")
    available = len(tokens) // seq_len
    if available == 0:
        raise DataError(
            f"{source} has {len(tokens)} tokens, too few for one window of {seq_len}; "
            "use a longer text or a smaller --seq-len"
        )
    if count is not None and count > available:
        raise DataError(
            f"{source} contains {available} windows of {seq_len} tokens, fewer than the {count} "
            f"requested; use --windows {available} or a smaller --seq-len"
        )
    count = available if count is None else count
    return mx.array(tokens[: count * seq_len].reshape(count, seq_len))  # (windows, seq_len)


def sample_windows(tokens: np.ndarray, seq_len: int, count: int, seed: int, source: str = "text") -> mx.array:
    """Pick `count` non-overlapping windows of `seq_len` tokens at seeded random positions."""
    if count < 1:
        raise DataError(f"--samples {count} is invalid; use at least 1")
    available = len(tokens) // seq_len
    if available < count:
        raise DataError(
            f"{source} has {len(tokens)} tokens: {available} windows of {seq_len}, fewer than the "
            f"{count} requested; use a longer text, fewer --samples or a smaller --seq-len"
        )
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(available, size=count, replace=False)) * seq_len
    return mx.array(np.stack([tokens[s : s + seq_len] for s in starts]))  # (count, seq_len)
