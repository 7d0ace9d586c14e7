"""Build Hugging Face tokenizer files from the vocabulary stored in a GGUF file.

GGUF keeps a byte-level BPE tokenizer as lists (`tokenizer.ggml.tokens`, `.merges`,
`.token_type`) plus a named pre-tokenizer (`tokenizer.ggml.pre`). This module rebuilds the
same tokenizer with the `tokenizers` library and writes `tokenizer.json` and
`tokenizer_config.json`, which transformers and mlx-lm open.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lieq_mlx.errors import UnsupportedModelError

# llama.cpp's token types: 1 normal, 2 unknown, 3 control, 4 user defined, 5 unused, 6 byte.
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# The split pattern of Llama 3's tokenizer, as published with its tokenizer.json.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(pre: str):
    """Return the pre-tokenizer that the GGUF name `pre` stands for."""
    if pre in ("gpt2", "default", ""):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":
        # SmolLM splits every digit on its own, then applies GPT-2's byte-level split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise UnsupportedModelError(
        f"GGUF pre-tokenizer {pre!r} is not supported; supported: gpt2, smollm, llama-bpe"
    )


def _token(metadata: dict, key: str, tokens: list[str]) -> str | None:
    value = metadata.get(f"tokenizer.ggml.{key}_token_id")
    if value is None:
        return None
    index = int(value.item()) if hasattr(value, "item") else int(value)
    return tokens[index] if 0 <= index < len(tokens) else None


def _flag(metadata: dict, key: str, default: bool) -> bool:
    value = metadata.get(key)
    if value is None:
        return default
    return bool(value.item()) if hasattr(value, "item") else bool(value)


def build_tokenizer(metadata: dict) -> tuple[Tokenizer, dict]:
    """Return the tokenizer and the contents of `tokenizer_config.json` for GGUF metadata."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is"
        )
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    token_types = [int(t) for t in metadata.get("tokenizer.ggml.token_type", [])]

    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(str(metadata.get("tokenizer.ggml.pre", "gpt2")))
    tokenizer.decoder = decoders.ByteLevel()

    special = [
        AddedToken(tokens[i], special=True, normalized=False)
        for i, kind_of in enumerate(token_types)
        if kind_of in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    tokenizer.add_special_tokens(special)

    bos = _token(metadata, "bos", tokens)
    eos = _token(metadata, "eos", tokens)
    add_bos = _flag(metadata, "tokenizer.ggml.add_bos_token", False)
    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": _token(metadata, "unknown", tokens),
        "pad_token": _token(metadata, "padding", tokens),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(metadata.get("llama.context_length", 2048)),
    }
    template = metadata.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = str(template)
    return tokenizer, config


def write_tokenizer(metadata: dict, folder: Path) -> None:
    """Write `tokenizer.json` and `tokenizer_config.json` into `folder`."""
    tokenizer, config = build_tokenizer(metadata)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
