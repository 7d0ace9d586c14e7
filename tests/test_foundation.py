"""The foundation on the real demo model: GGUF import, loading, perplexity, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import generate, load as mlx_lm_load

from lieq_mlx.data import consecutive_windows, read_text, tokenize
from lieq_mlx.errors import DataError, ModelNotFoundError, OutputExistsError, UnsupportedModelError
from lieq_mlx.gguf_import import import_gguf, unpermute_rotary_rows
from lieq_mlx.models import demo_gguf_path, resolve_model
from lieq_mlx.perplexity import evaluate_perplexity

LLAMA_CPP_PERPLEXITY = 35.14  # llama.cpp on the same GGUF, first 20 windows of 512 tokens


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lieq_mlx_cli", *args], capture_output=True, text=True, timeout=600, **kwargs
    )


def test_demo_perplexity_matches_llama_cpp(demo_model, test_text_path):
    model, tokenizer = demo_model
    tokens = tokenize(tokenizer, read_text(test_text_path))
    windows = consecutive_windows(tokens, 512, 20)

    result = evaluate_perplexity(model, windows)

    assert result.tokens_scored == 20 * 511
    assert abs(result.perplexity / LLAMA_CPP_PERPLEXITY - 1) < 0.02, result.perplexity
    assert 0 < result.standard_error < result.perplexity * 0.1


def test_stock_mlx_lm_answers_chat(demo_dir):
    model, tokenizer = mlx_lm_load(str(demo_dir))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    reply = generate(model, tokenizer, prompt, max_tokens=24)

    assert "Paris" in reply


def test_imported_config_and_tokenizer(demo_dir):
    config = json.loads((demo_dir / "config.json").read_text())
    tokenizer_config = json.loads((demo_dir / "tokenizer_config.json").read_text())

    assert config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30
    assert config["num_key_value_heads"] == 3
    assert config["tie_word_embeddings"] is True
    assert tokenizer_config["add_bos_token"] is False
    assert tokenizer_config["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in tokenizer_config["chat_template"]


def test_tokenizer_keeps_special_tokens_whole(demo_model):
    _, tokenizer = demo_model
    ids = tokenizer.encode("<|im_start|>user\nHi 2024<|im_end|>", add_special_tokens=False)

    assert ids[0] == 1
    assert ids[-1] == 2
    assert tokenizer.decode(ids) == "<|im_start|>user\nHi 2024<|im_end|>"
    # SmolLM's pre-tokenizer splits digits one by one.
    assert len(tokenizer.encode("2024", add_special_tokens=False)) == 4


def test_unpermute_inverts_gguf_rotary_order():
    n_heads, head_dim, in_features = 3, 8, 5
    weight = mx.arange(n_heads * head_dim * in_features).reshape(n_heads * head_dim, in_features)
    # The permutation GGUF converters apply: per head, halves interleaved pairwise.
    permuted = (
        weight.reshape(n_heads, 2, head_dim // 2, in_features).swapaxes(1, 2).reshape(weight.shape)
    )

    restored = unpermute_rotary_rows(permuted, n_heads)

    assert mx.array_equal(restored, weight).item()
    assert not mx.array_equal(permuted, weight).item()


def test_import_refuses_existing_folder(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep.txt").write_text("precious")

    with pytest.raises(OutputExistsError, match="--force"):
        import_gguf(demo_gguf_path(), target)

    assert (target / "keep.txt").read_text() == "precious"


def test_import_rejects_non_gguf_file(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")

    with pytest.raises(UnsupportedModelError, match="supported tensor types"):
        import_gguf(fake, tmp_path / "out")

    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_resolve_model_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(tmp_path)
    with pytest.raises(ModelNotFoundError, match="not found"):
        resolve_model(str(tmp_path / "missing" / "deeper" / "folder"))


def test_windows_and_text_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(DataError, match="empty"):
        read_text(empty)

    tokens = np.arange(1000, dtype=np.int32)
    assert consecutive_windows(tokens, 100, None).shape == (10, 100)
    with pytest.raises(DataError, match="--windows 10"):
        consecutive_windows(tokens, 100, 11)


def test_read_text_strips_byte_order_mark(calib_text_path):
    text = read_text(calib_text_path)
    assert not text.startswith("\ufeff")


def test_cli_import_gguf_and_errors(tmp_path):
    target = tmp_path / "imported"
    done = run_cli("import-gguf", str(demo_gguf_path()), "-o", str(target))
    assert done.returncode == 0, done.stderr
    assert (target / "model.safetensors").is_file()

    again = run_cli("import-gguf", str(demo_gguf_path()), "-o", str(target))
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert "Traceback" not in again.stderr

    missing = run_cli("import-gguf", str(tmp_path / "nope.gguf"), "-o", str(tmp_path / "x"))
    assert missing.returncode == 1
    assert "not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_cli_eval_small(test_text_path):
    done = run_cli("eval", "--data", str(test_text_path), "--windows", "2", "--seq-len", "128")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("perplexity ")
    assert float(done.stdout.split()[1]) > 1


def test_cli_eval_without_data_explains():
    done = run_cli("eval")
    assert done.returncode == 1
    assert "WikiText-2" in done.stderr


def test_cli_env_reports_blas():
    done = run_cli("env")
    assert done.returncode == 0, done.stderr
    assert "BLAS" in done.stderr
    assert "demo model" in done.stderr
