"""Import a llama-architecture GGUF file into a folder that `mlx_lm.load` opens.

`mx.load` reads GGUF tensors of types F32 and F16 as arrays and Q4_0, Q4_1 and Q8_0 as
MLX affine triples (`weight`, `scales`, `biases`, group size 32). The importer dequantizes
every tensor, renames it to the Hugging Face llama layout, undoes the row permutation that
GGUF converters apply to the q and k projections for their rotary layout, and writes
`config.json`, safetensors and tokenizer files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
from mlx_lm.utils import make_shards

from lieq_mlx.atomic import atomic_folder
from lieq_mlx.errors import ModelNotFoundError, UnsupportedModelError
from lieq_mlx.gguf_tokenizer import write_tokenizer

SUPPORTED_TENSOR_TYPES = "F32, F16, Q8_0, Q4_0, Q4_1"
GGUF_GROUP_SIZE = 32
STORAGE_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_PATTERN = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


def _scalar(metadata: dict, key: str, default=None):
    value = metadata.get(key, default)
    if value is None:
        raise UnsupportedModelError(f"GGUF metadata key {key!r} is missing; is this a llama model?")
    return value.item() if hasattr(value, "item") else value


def read_gguf(path: str | Path) -> tuple[dict, dict]:
    """Read a GGUF file with MLX; return (tensors, metadata)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {path} not found; pass the path of a .gguf file")
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as error:
        raise UnsupportedModelError(
            f"cannot read {path} as GGUF ({error}); supported tensor types: {SUPPORTED_TENSOR_TYPES}"
        ) from None


def config_from_metadata(metadata: dict, tie_word_embeddings: bool, dtype: str) -> dict:
    """Build a Hugging Face llama `config.json` from GGUF metadata."""
    architecture = metadata.get("general.architecture")
    if architecture != "llama":
        raise UnsupportedModelError(
            f"GGUF architecture {architecture!r} is not supported; only 'llama' files can be imported"
        )
    hidden_size = int(_scalar(metadata, "llama.embedding_length"))
    n_heads = int(_scalar(metadata, "llama.attention.head_count"))
    n_kv_heads = int(_scalar(metadata, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_scalar(metadata, "llama.attention.key_length", hidden_size // n_heads))
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": int(_scalar(metadata, "llama.feed_forward_length")),
        "num_hidden_layers": int(_scalar(metadata, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": float(_scalar(metadata, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_scalar(metadata, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_scalar(metadata, "llama.context_length", 2048)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
    }
    vocab = metadata.get("tokenizer.ggml.tokens")
    config["vocab_size"] = int(_scalar(metadata, "llama.vocab_size", len(vocab) if vocab else None))
    for key in ("bos", "eos"):
        value = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            config[f"{key}_token_id"] = int(value.item())
    return config


def dequantize_tensors(tensors: dict) -> dict[str, mx.array]:
    """Merge MLX affine triples (`x.weight`, `x.scales`, `x.biases`) into float32 arrays."""
    dense = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        stem = name[: -len(".weight")] if name.endswith(".weight") else None
        if stem is not None and f"{stem}.scales" in tensors:
            scales = tensors[f"{stem}.scales"]
            in_features = scales.shape[-1] * GGUF_GROUP_SIZE
            bits = value.shape[-1] * 32 // in_features
            value = mx.dequantize(
                value, scales, tensors[f"{stem}.biases"], group_size=GGUF_GROUP_SIZE, bits=bits
            )
        dense[name] = value.astype(mx.float32)
    return dense


def unpermute_rotary_rows(weight: mx.array, n_heads: int) -> mx.array:
    """Undo GGUF's interleaving of rotary halves in the rows of a q or k projection.

    GGUF converters reorder each head's rows from [first half, second half] to pairs
    (row i of the first half, row i of the second half). This restores the Hugging Face order.
    """
    rows = weight.shape[0]
    head_rows = rows // n_heads
    permuted = weight.reshape(n_heads, head_rows // 2, 2, *weight.shape[1:])  # (heads, hd/2, 2, in)
    return permuted.swapaxes(1, 2).reshape(weight.shape)


def rename_tensors(dense: dict[str, mx.array], config: dict) -> dict[str, mx.array]:
    """Map GGUF tensor names to the Hugging Face llama names, fixing q and k rows."""
    weights = {}
    for name, value in dense.items():
        match = _LAYER_PATTERN.match(name)
        if match:
            layer, part, kind = match.groups()
            if part not in _LAYER_NAMES:
                raise UnsupportedModelError(f"GGUF tensor {name!r} has no llama counterpart")
            if part == "attn_q" and kind == "weight":
                value = unpermute_rotary_rows(value, config["num_attention_heads"])
            elif part == "attn_k" and kind == "weight":
                value = unpermute_rotary_rows(value, config["num_key_value_heads"])
            weights[f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"] = value
            continue
        stem, _, kind = name.rpartition(".")
        if stem == "rope_freqs":
            # NOTE: Llama 3 style rope scaling stores per-frequency factors that the
            # config cannot express without its original scaling parameters.
            raise UnsupportedModelError(
                "GGUF files with rope_freqs (Llama 3.1+ rope scaling) are not supported yet; "
                "convert the original Hugging Face model instead"
            )
        if stem not in _GLOBAL_NAMES:
            raise UnsupportedModelError(f"GGUF tensor {name!r} has no llama counterpart")
        weights[f"{_GLOBAL_NAMES[stem]}.{kind}"] = value
    return weights


def save_weights(weights: dict[str, mx.array], folder: Path) -> None:
    """Write safetensors shards and their index into `folder`."""
    shards = make_shards(weights)
    pattern = "model-{:05d}-of-{:05d}.safetensors" if len(shards) > 1 else "model.safetensors"
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file_name = pattern.format(index, len(shards))
        mx.save_safetensors(str(folder / file_name), shard, metadata={"format": "mlx"})
        weight_map.update({name: file_name for name in shard})
    index = {
        "metadata": {"total_size": sum(v.nbytes for v in weights.values())},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def import_gguf(
    gguf_path: str | Path,
    output_dir: str | Path,
    dtype: str = "float16",
    force: bool = False,
) -> Path:
    """Convert a llama GGUF file into an MLX/Hugging Face model folder; return its path.

    `dtype` is the storage type of the dequantized weights (float16, bfloat16 or float32).
    """
    if dtype not in STORAGE_DTYPES:
        raise UnsupportedModelError(f"dtype {dtype!r} is invalid; choose one of {', '.join(STORAGE_DTYPES)}")
    tensors, metadata = read_gguf(gguf_path)
    tie_word_embeddings = "output.weight" not in tensors
    config = config_from_metadata(metadata, tie_word_embeddings, dtype)

    dense = dequantize_tensors(tensors)
    weights = rename_tensors(dense, config)
    weights = {name: value.astype(STORAGE_DTYPES[dtype]) for name, value in weights.items()}

    with atomic_folder(output_dir, force=force) as staging:
        save_weights(weights, staging)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        write_tokenizer(metadata, staging)
        source = {"source": str(Path(gguf_path).expanduser().resolve()), "name": str(metadata.get("general.name", ""))}
        (staging / "lieq_import.json").write_text(json.dumps(source, indent=2) + "\n")
    return Path(output_dir).expanduser().resolve()
