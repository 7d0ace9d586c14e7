"""Greedy generation on the demo model through the kernel modules' fallback path.

The demo model (SmolLM2-135M, mlx-lm llama) is quantized to 2 bits with group size 64 in
its decoder layers, leaving the tied embedding in float32. install_kernels(force=True)
then puts the kernel modules in place on a machine without Metal, so every 1- and 2-bit
projection runs through lieq_mlx.kernels' mx.quantized_matmul path, and the tokens must
equal those of the stock mlx-lm model.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm import stream_generate

from lieq_mlx.kernel_layers import FusedSwiGLUMLP, install_kernels, kernels_status
from lieq_mlx.kernels import NO_KERNELS_ENV
from lieq_mlx.platform import metal_available

PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 16


def quantized_demo_model():
    models = pytest.importorskip("lieq_mlx.models")
    model, tokenizer = models.load_model("demo")
    nn.quantize(
        model,
        group_size=64,
        bits=2,
        class_predicate=lambda path, module: isinstance(module, nn.Linear)
        and path.startswith("model.layers."),
    )
    return model, tokenizer


def greedy_tokens(model, tokenizer, prompt: str) -> list[int]:
    # stream_generate samples with argmax when no sampler is given.
    return [
        response.token
        for response in stream_generate(model, tokenizer, prompt, max_tokens=MAX_TOKENS)
    ]


@pytest.mark.slow
@pytest.mark.skipif(metal_available(), reason="checks the fallback path, which Metal skips")
def test_demo_generation_matches_stock(monkeypatch):
    monkeypatch.delenv(NO_KERNELS_ENV, raising=False)
    model, tokenizer = quantized_demo_model()
    stock_tokens = [greedy_tokens(model, tokenizer, prompt) for prompt in PROMPTS]

    report = install_kernels(model, force=True)
    patched_tokens = [greedy_tokens(model, tokenizer, prompt) for prompt in PROMPTS]

    layers = len(model.model.layers)
    assert report.fused_qkv == layers
    assert report.fused_gate_up == layers
    assert report.single_linear == 2 * layers  # o_proj and down_proj
    assert isinstance(model.model.layers[0].mlp, FusedSwiGLUMLP)
    assert kernels_status(model).startswith("fallback")
    for stock, patched in zip(stock_tokens, patched_tokens):
        assert len(stock) == MAX_TOKENS
        assert patched == stock


@pytest.mark.slow
@pytest.mark.skipif(metal_available(), reason="checks the fallback path, which Metal skips")
def test_demo_logits_match_stock(monkeypatch):
    monkeypatch.delenv(NO_KERNELS_ENV, raising=False)
    model, tokenizer = quantized_demo_model()
    tokens = mx.array([tokenizer.encode(PROMPTS[0])])
    stock = model(tokens)

    install_kernels(model, force=True)
    patched = model(tokens)

    assert mx.allclose(patched, stock, rtol=1e-5, atol=1e-4).item()
