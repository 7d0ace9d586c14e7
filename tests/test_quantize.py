"""Quantizers, bit allocation and the quantized folder, on the real demo model."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_lm_load
from mlx_lm.utils import compute_bits_per_weight

import lieq_mlx
from lieq_mlx import writer
from lieq_mlx.allocation import (
    BitAccounting,
    allocate_knapsack,
    allocate_paper,
    allocate_random,
    allocate_uniform,
    check_budget,
)
from lieq_mlx.errors import BudgetError
from lieq_mlx.models import cast_floats, load_model, resolve_model
from lieq_mlx.pipeline import QuantizeSettings, make_record, quantize_model
from lieq_mlx.quantize import build_accounting
from lieq_mlx.quantizers import fit_two_level, pack_codes, quantize_weight, relative_error


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lieq_mlx_cli", *args], capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def accounting(demo_model):
    model, _ = demo_model
    return build_accounting(model, group_size=64, embed_bits=6, embed_group_size=64)


@pytest.fixture(scope="module")
def uniform_folder(tmp_path_factory):
    """The demo model at uniform 4 bits (nearest rounding, activation scaling), written and kept in memory."""
    from lieq_mlx.calibration import self_generated_windows

    model, tokenizer = load_model("demo")
    calibration = self_generated_windows(model, tokenizer, samples=2, seq_len=64, seed=0)
    settings = QuantizeSettings(target_bits=4, policy="uniform", widths=(4,), rounding="nearest", scaling="awq")
    result = quantize_model(model, settings, calibration=calibration)
    folder = tmp_path_factory.mktemp("quantized") / "uniform4"
    source = resolve_model("demo")
    from mlx_lm.utils import load_config

    record = make_record(settings, result, "demo", None)
    writer.write_quantized_model(model, source, folder, load_config(source), result.quantization, record)
    cast_floats(model, mx.float32)
    return folder, model, result


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_codes_matches_mlx_layout(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, size=(6, 128))
    packed = pack_codes(codes, bits)
    ones = mx.ones((6, 2))
    zeros = mx.zeros((6, 2))

    unpacked = mx.dequantize(packed, ones, zeros, group_size=64, bits=bits)

    assert np.array_equal(np.asarray(unpacked), codes.astype(np.float32))


def test_one_bit_fit_beats_mlx_quantize(demo_model):
    model, _ = demo_model
    weight = model.layers[5].mlp.down_proj.weight

    ours = relative_error(weight, *fit_two_level(weight, 64), bits=1, group_size=64)
    stock = relative_error(weight, *mx.quantize(weight, group_size=64, bits=1), bits=1, group_size=64)

    assert ours < 1.0  # better than replacing the weights by zero
    assert stock > 1.0  # the documented weakness of min/max rounding at 1 bit
    assert ours < 0.5 * stock


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_clipping_search_beats_round_to_nearest(demo_model, bits):
    model, _ = demo_model
    weight = model.layers[3].self_attn.q_proj.weight

    ours = relative_error(weight, *quantize_weight(weight, bits, 64), bits=bits, group_size=64)
    stock = relative_error(weight, *mx.quantize(weight, group_size=64, bits=bits), bits=bits, group_size=64)

    assert ours < stock


def test_effective_bits_match_mlx_lm(uniform_folder):
    folder, _, result = uniform_folder
    stored, _ = mlx_lm_load(str(folder), lazy=True)

    assert result.nominal_bits == pytest.approx(4.0)
    assert result.effective_bits == pytest.approx(compute_bits_per_weight(stored), rel=1e-9)


def test_stock_mlx_lm_gives_same_logits(uniform_folder):
    folder, model, _ = uniform_folder
    stock, _ = mlx_lm_load(str(folder))
    stock.set_dtype(mx.float32, predicate=lambda dtype: mx.issubdtype(dtype, mx.floating))
    tokens = mx.array([[446, 6356, 389, 9226, 352, 446, 3717, 6356]])

    expected = model(tokens)
    actual = stock(tokens)

    assert mx.array_equal(expected, actual).item()


def test_folder_records_how_it_was_made(uniform_folder):
    folder, _, result = uniform_folder
    record = json.loads((folder / "lieq.json").read_text())
    config = json.loads((folder / "config.json").read_text())

    assert record["layer_bits"] == [4] * 30
    assert record["nominal_bits"] == pytest.approx(result.nominal_bits)
    assert record["effective_bits"] == pytest.approx(result.effective_bits)
    assert config["quantization"]["model.layers.0.self_attn.q_proj"] == {"group_size": 64, "bits": 4}
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 64, "bits": 6}
    assert len(record["scaling_alphas"]) == 30
    assert record["settings"]["scaling"] == "awq"
    assert (folder / "tokenizer.json").is_file()


def test_lieq_load_returns_model_and_tokenizer(uniform_folder):
    folder, _, _ = uniform_folder
    model, tokenizer = lieq_mlx.load(folder)

    assert len(model.layers) == 30
    assert tokenizer.encode("Paris", add_special_tokens=False)


@pytest.mark.parametrize("how", ["nominal", "effective"])
@pytest.mark.parametrize("target", [2.2, 2.5, 3.0, 3.7])
def test_allocations_meet_budget(accounting, how, target):
    widths = (1, 2, 3, 4)
    low, high = accounting.count([1] * 30, how), accounting.count([4] * 30, how)
    target = low + (high - low) * (target - 1) / 3
    cap = check_budget(accounting, widths, target, how)
    rng = np.random.default_rng(0)
    costs = rng.random((30, 4)) * np.array([8.0, 4.0, 2.0, 1.0])

    allocations = {
        "knapsack": allocate_knapsack(accounting, costs, widths, cap),
        "paper": allocate_paper(accounting, rng.random(30), (2, 4), check_budget(accounting, (2, 4), max(target, accounting.count([2] * 30, how)), how)),
        "uniform": allocate_uniform(accounting, widths, cap),
        "random": allocate_random(accounting, widths, cap, seed=3),
    }

    for name, allocation in allocations.items():
        assert len(allocation) == 30, name
    assert accounting.count(allocations["knapsack"], how) <= target + 1e-9
    assert accounting.count(allocations["uniform"], how) <= target + 1e-9
    assert accounting.count(allocations["random"], how) <= target + 1e-9
    # Equal layers: the knapsack and random policies leave less than one step of one layer unused.
    step = accounting.count([2] + [1] * 29, how) - accounting.count([1] * 30, how)
    assert target - accounting.count(allocations["random"], how) < step + 1e-9


def test_knapsack_is_exact_on_small_problem():
    accounting = BitAccounting(layer_params=(100, 200, 100, 300, 100), total_params=800, fixed_bits=0, overhead_per_weight=0.5)
    widths = (1, 2, 3, 4)
    rng = np.random.default_rng(7)
    costs = np.sort(rng.random((5, 4)) * 10, axis=1)[:, ::-1].copy()
    cap = accounting.weight_bit_cap(2.4, "nominal")

    chosen = allocate_knapsack(accounting, costs, widths, cap)

    best = min(
        (sum(costs[layer, widths.index(b)] for layer, b in enumerate(combo)), combo)
        for combo in itertools.product(widths, repeat=5)
        if sum(p * b for p, b in zip(accounting.layer_params, combo)) <= cap
    )
    assert sum(costs[layer, widths.index(b)] for layer, b in enumerate(chosen)) == pytest.approx(best[0])


def test_paper_policy_one_high_layer(accounting):
    scores = np.linspace(0, 1, 30)
    one_high = (29 * 2 + 4) / 30
    cap = check_budget(accounting, (2, 4), one_high, "nominal")

    allocation = allocate_paper(accounting, scores, (2, 4), cap)

    assert allocation.count(4) == 1
    assert allocation[29] == 4  # the top-scored layer
    assert accounting.nominal_bits(allocation) == pytest.approx(one_high)
    just_below = check_budget(accounting, (2, 4), one_high - 1e-3, "nominal")
    assert allocate_paper(accounting, scores, (2, 4), just_below).count(4) == 0


@pytest.mark.parametrize("how,target", [("nominal", 0.5), ("nominal", 4.5), ("effective", 2.0)])
def test_infeasible_target_names_range(accounting, how, target):
    with pytest.raises(BudgetError, match=r"choose a value from \d+\.\d+ to \d+\.\d+"):
        check_budget(accounting, (1, 2, 3, 4), target, how)


def test_cli_infeasible_target_leaves_nothing(tmp_path):
    output = tmp_path / "q"
    done = run_cli(
        "quantize", "-o", str(output), "--target-bits", "9", "--policy", "uniform", "--rounding", "nearest",
        "--scaling", "none",
    )

    assert done.returncode == 1
    assert "choose a value from" in done.stderr
    assert "Traceback" not in done.stderr
    assert not output.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_refuses_existing_output(tmp_path):
    output = tmp_path / "q"
    output.mkdir()
    (output / "keep.txt").write_text("mine")

    done = run_cli("quantize", "-o", str(output), "--policy", "uniform", "--bits", "4", "--target-bits", "4")

    assert done.returncode == 1
    assert "--force" in done.stderr
    assert (output / "keep.txt").read_text() == "mine"


def test_interrupted_write_leaves_no_folder(uniform_folder, tmp_path, monkeypatch):
    _, model, result = uniform_folder

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer, "save_config", interrupt)
    with pytest.raises(KeyboardInterrupt):
        writer.write_quantized_model(model, resolve_model("demo"), tmp_path / "out", {}, result.quantization, {})

    assert list(tmp_path.iterdir()) == []


def test_cli_lieq_policy_end_to_end(tmp_path, calib_text_path):
    output = tmp_path / "lieq"
    done = run_cli(
        "quantize", "-o", str(output), "--policy", "lieq", "--bits", "2,4", "--target-bits", "3",
        "--rounding", "nearest", "--distortion", "weight",
        "--calib", str(calib_text_path), "--samples", "2", "--seq-len", "64",
    )

    assert done.returncode == 0, done.stderr
    record = json.loads((output / "lieq.json").read_text())
    assert set(record["layer_bits"]) <= {2, 4}
    assert record["nominal_bits"] <= 3.0 + 1e-9
    assert record["nominal_bits"] > 3.0 - 2 / 30  # one layer step below at most
    assert len(record["scores"]) == 30
    assert "effective bits" in done.stderr


def test_output_error_sees_every_projection(demo_model, calib_text_path):
    """Layer 11's down_proj writes outputs thousands of times larger than its other projections.

    The layer's 1-bit error must still be of the size of the other layers' errors: the
    other six projections lose as much there as anywhere.
    """
    from lieq_mlx.data import read_text, sample_windows, tokenize
    from lieq_mlx.quantize import quantize_candidates

    model, tokenizer = demo_model
    windows = sample_windows(tokenize(tokenizer, read_text(calib_text_path)), 128, 2, seed=0, source="valid.txt")
    candidates = quantize_candidates(model, (1,), 64, windows, rounding="nearest")
    errors = candidates.output_error[:, 0]

    assert errors[11] > 0.5 * np.median(errors)
    assert np.all(errors > 0)
