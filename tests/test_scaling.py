"""Activation scaling: the folded layer computes the same function, and rounding gets better."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from lieq_mlx.analysis.capture import capture_layer_inputs
from lieq_mlx.analysis.model_parts import PROJECTIONS, projection
from lieq_mlx.data import read_text, sample_windows, tokenize
from lieq_mlx.quantize import layer_weights, quantize_candidates
from lieq_mlx.scaling import (
    fake_quantize,
    norm_weights,
    scalable_producers,
    search_scales,
    transform_inputs,
)


@pytest.fixture(scope="module")
def calibration(demo_model, calib_text_path):
    _, tokenizer = demo_model
    tokens = tokenize(tokenizer, read_text(calib_text_path))
    return sample_windows(tokens, 128, 4, seed=0, source="valid.txt")


@pytest.fixture(scope="module")
def layer_inputs(demo_model, calibration):
    """The captured projection inputs of decoder layer 3."""
    model, _ = demo_model
    for index, inputs in capture_layer_inputs(model, calibration):
        if index == 3:
            return inputs
    raise AssertionError("layer 3 was never captured")


def test_folded_scales_keep_layer_function(demo_model):
    model, _ = demo_model
    layer = model.model.layers[3]
    rng = np.random.default_rng(0)
    scales = {
        "input_layernorm": mx.array(rng.uniform(0.2, 5.0, 576).astype(np.float32)),
        "up_proj": mx.array(rng.uniform(0.2, 5.0, 1536).astype(np.float32)),
        "post_attention_layernorm": mx.array(rng.uniform(0.2, 5.0, 576).astype(np.float32)),
    }
    hidden = mx.array(rng.standard_normal((2, 16, 576)).astype(np.float32))
    expected = layer(hidden, "causal")

    saved = {name: projection(layer, name).weight for name in PROJECTIONS}
    saved_norms = {name: getattr(layer, name).weight for name in ("input_layernorm", "post_attention_layernorm")}
    try:
        for name, weight in layer_weights(layer, scales).items():
            projection(layer, name).weight = weight
        for name, weight in norm_weights(layer, scales).items():
            getattr(layer, name).weight = weight
        actual = layer(hidden, "causal")
    finally:
        for name, weight in saved.items():
            projection(layer, name).weight = weight
        for name, weight in saved_norms.items():
            getattr(layer, name).weight = weight

    assert not mx.array_equal(layer_weights(layer, scales)["q_proj"], saved["q_proj"]).item()
    assert mx.allclose(actual, expected, rtol=1e-4, atol=1e-4).item()


def test_search_lowers_rounding_error(demo_model, layer_inputs):
    model, _ = demo_model
    layer = model.model.layers[3]
    weights = layer_weights(layer)
    scales, alphas = search_scales(weights, layer_inputs, (3,), 64)
    scaled_weights = layer_weights(layer, scales)
    scaled_inputs = transform_inputs(layer_inputs, scales)

    def output_error(ws, xs):
        total = 0.0
        for name in PROJECTIONS:
            delta = fake_quantize(ws[name], 3, 64) - ws[name]
            total += ((xs[name] @ delta.T) ** 2).sum().item()
        return total

    assert set(alphas) == {"input_layernorm", "up_proj", "post_attention_layernorm"}
    assert any(alpha > 0 for alpha in alphas.values())
    assert output_error(scaled_weights, scaled_inputs) < 0.9 * output_error(weights, layer_inputs)


def test_scaled_candidates_have_lower_output_error(demo_model, calibration):
    model, _ = demo_model
    plain = quantize_candidates(model, (3,), 64, calibration, rounding="nearest")
    scaled = quantize_candidates(model, (3,), 64, calibration, rounding="nearest", scaling=True)

    assert plain.scales[0] == {}
    assert set(scaled.scales[0]) == {"input_layernorm", "up_proj", "post_attention_layernorm"}
    assert scaled.output_error.sum() < plain.output_error.sum()
    assert np.mean(scaled.output_error < plain.output_error) >= 0.8


def test_one_bit_fake_quantize_uses_two_levels():
    rng = np.random.default_rng(1)
    weight = mx.array(rng.standard_normal((8, 128)).astype(np.float32))
    rounded = np.asarray(fake_quantize(weight, 1, 64)).reshape(-1, 64)

    assert all(len(np.unique(group)) <= 2 for group in rounded)
    assert np.mean((rounded - np.asarray(weight).reshape(-1, 64)) ** 2) < np.mean(np.asarray(weight) ** 2)


def test_only_plain_rms_norms_absorb_scales(demo_model):
    model, _ = demo_model
    layer = model.model.layers[0]
    assert scalable_producers(layer) == ("input_layernorm", "post_attention_layernorm", "up_proj")

    original = layer.input_layernorm
    try:
        layer.input_layernorm = nn.LayerNorm(576)
        assert scalable_producers(layer) == ("post_attention_layernorm", "up_proj")
    finally:
        layer.input_layernorm = original
