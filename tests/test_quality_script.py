"""Smoke test of benchmarks/quality.py on the demo model: one short window, a few rows."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import mlx.core as mx
import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quality():
    return load_script()


@pytest.fixture(scope="module")
def bench(quality, demo_model, test_text_path, calib_text_path):
    from lieq_mlx.data import consecutive_windows, read_text, sample_windows, tokenize

    model, tokenizer = demo_model
    eval_windows = consecutive_windows(tokenize(tokenizer, read_text(test_text_path)), 64, 1)
    calibration = sample_windows(tokenize(tokenizer, read_text(calib_text_path)), 64, 2, 0)
    return quality.Bench(model, tokenizer, eval_windows, calibration, meta={})


def test_plan_keys_unique(quality):
    keys = [spec.key for spec in quality.plan_rows()]
    assert len(keys) == len(set(keys))
    assert keys[0] == "full"


def test_rows_restore_weights(quality, bench):
    full = quality.run_row(bench, quality.RowSpec("full", "full"))
    rtn = quality.run_row(bench, quality.RowSpec("rtn-2", "rtn", (2,)))
    recipe = quality.run_row(bench, quality.RowSpec("recipe-mixed_3_4", "recipe", recipe="mixed_3_4"))
    again = quality.run_row(bench, quality.RowSpec("full", "full"))

    assert math.isfinite(full["perplexity"])
    assert again["perplexity"] == pytest.approx(full["perplexity"], rel=1e-6)
    assert rtn["perplexity"] > full["perplexity"]
    assert rtn["nominal_bits"] == pytest.approx(2.0)
    # The 6-bit embedding adds bits above 2 + 32 / 64.
    assert rtn["effective_bits"] > 2.5
    assert recipe["widths"] == [3, 4]
    assert 3.0 < recipe["nominal_bits"] < 4.0
    assert 3.0 < recipe["effective_bits"] < 5.0

    cache = {"meta": {"settings": {"eval": {"windows": 1}}}, "rows": {r["key"]: r for r in (full, rtn, recipe)}}
    table = quality.markdown_table(cache)
    assert table.count("\n") == 4  # header, rule and three rows
    assert "mlx-lm mixed_3_4" in table


def test_candidates_round_trip(quality, bench, tmp_path):
    from lieq_mlx.analysis.model_parts import PROJECTIONS
    from lieq_mlx.quantize import LayerCandidates, QuantizedWeight

    candidates = LayerCandidates(widths=(2, 4), group_size=64)
    for index in range(2):
        per_width = {}
        for bits in (2, 4):
            per_width[bits] = {}
            for name in PROJECTIONS:
                weight = quality.module_at(bench.model, quality.projection_path(index, name)).weight
                per_width[bits][name] = QuantizedWeight(*mx.quantize(weight, group_size=64, bits=bits), bits, 64)
        candidates.weights.append(per_width)
    path = tmp_path / "candidates.safetensors"
    quality.write_candidates(path, candidates)
    restored = quality.read_candidates(path, (2, 4))

    assert len(restored.weights) == 2
    original = candidates.weights[1][2]["down_proj"].dequantized()
    assert mx.array_equal(restored.weights[1][2]["down_proj"].dequantized(), original).item()


def test_plot_written(quality, bench, tmp_path):
    row = quality.run_row(bench, quality.RowSpec("rtn-4", "rtn", (4,)))
    cache = {"meta": {"settings": {"eval": {"windows": 1}}}, "rows": {"rtn-4": row}}
    path = tmp_path / "quality.png"
    quality.plot(cache, path)
    assert path.stat().st_size > 1000
