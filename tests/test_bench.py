"""Tests of `lieq-mlx bench` and the benchmark library on the demo model and a 4-bit copy.

One module-scoped run benchmarks the demo model and an mlx-lm 4-bit copy of it with short
settings (32 prompt tokens, 8 generated, 2 trials). Most tests read its JSON record.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from rich.console import Console

from lieq_mlx.bench.bandwidth import apple_chip_bandwidth, measure_copy_bandwidth, measure_read_bandwidth, parse_apple_chip
from lieq_mlx.bench.bits import read_lieq_bits, stored_bits
from lieq_mlx.bench.bound import kv_bytes_per_position, weight_bytes_per_token
from lieq_mlx.bench.measure import random_prompt, run_trial
from lieq_mlx.bench.report import REPORT_SCHEMA, REPORT_VERSION
from lieq_mlx.platform import metal_available

PROMPT_TOKENS = 32
GENERATION_TOKENS = 8
TRIALS = 2

TOP_KEYS = {"schema", "version", "created", "settings", "machine", "bandwidth", "models"}
SETTINGS_KEYS = {"prompt_tokens", "generation_tokens", "trials", "seed"}
MACHINE_KEYS = {"platform", "processor", "cpu_count", "device", "blas", "python", "mlx", "mlx_lm", "lieq_mlx"}
BANDWIDTH_KEYS = {"gigabytes_per_second", "source", "detail"}
MODEL_KEYS = {
    "model", "folder", "load_seconds", "size_on_disk_bytes", "nominal_bits", "effective_bits", "bits_source",
    "prefill_tokens_per_second", "generation_tokens_per_second", "peak_memory_bytes", "bytes_read_per_token",
    "decode_bound_tokens_per_second", "percent_of_bound", "ratios_to_first", "warmup", "trials",
}
SPREAD_KEYS = {"median", "min", "max"}
TRAFFIC_KEYS = {"weights", "kv_cache", "total", "mean_context_tokens"}
RATIO_KEYS = {"prefill_tokens_per_second", "generation_tokens_per_second", "size_on_disk", "peak_memory"}
TRIAL_KEYS = {
    "prefill_seconds", "prefill_tokens_per_second", "generation_seconds", "generation_tokens_per_second",
    "prefill_peak_memory_bytes", "generation_peak_memory_bytes",
}


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lieq_mlx_cli", *arguments], capture_output=True, text=True, timeout=300
    )


def safetensors_header(path: Path) -> dict:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


@pytest.fixture(scope="module")
def quantized_4bit_dir(demo_dir, tmp_path_factory) -> Path:
    """An mlx-lm 4-bit (group 64) copy of the demo model, written into a temporary folder."""
    from mlx_lm.convert import convert

    folder = tmp_path_factory.mktemp("bench") / "demo-4bit"
    convert(str(demo_dir), mlx_path=str(folder), quantize=True, q_bits=4, q_group_size=64)
    return folder


@pytest.fixture(scope="module")
def bench_run(quantized_4bit_dir, tmp_path_factory):
    """Run the bench command in-process on the demo and its 4-bit copy; return (rc, record, table text)."""
    from lieq_mlx_cli import cmd_bench
    from lieq_mlx_cli.main import build_parser

    json_path = tmp_path_factory.mktemp("bench-json") / "bench.json"
    parser = build_parser([cmd_bench])
    args = parser.parse_args([
        "bench", "demo", str(quantized_4bit_dir), "-p", str(PROMPT_TOKENS), "-g", str(GENERATION_TOKENS),
        "-n", str(TRIALS), "--json", str(json_path),
    ])
    output = io.StringIO()
    rc = args.run(args, Console(file=output, width=200))
    return rc, json.loads(json_path.read_text()), output.getvalue()


def test_bench_exit_code_zero(bench_run):
    rc, _, table = bench_run
    assert rc == 0
    assert "prefill tok/s" in table
    assert "demo-4bit" in table
    assert "median [min-max]" in table


def test_bench_json_key_sets(bench_run):
    _, record, _ = bench_run
    assert set(record) == TOP_KEYS
    assert record["schema"] == REPORT_SCHEMA
    assert record["version"] == REPORT_VERSION
    assert set(record["settings"]) == SETTINGS_KEYS
    assert set(record["machine"]) == MACHINE_KEYS
    assert set(record["bandwidth"]) == BANDWIDTH_KEYS
    assert len(record["models"]) == 2
    for model in record["models"]:
        assert set(model) == MODEL_KEYS
        assert set(model["prefill_tokens_per_second"]) == SPREAD_KEYS
        assert set(model["generation_tokens_per_second"]) == SPREAD_KEYS
        assert set(model["bytes_read_per_token"]) == TRAFFIC_KEYS
        assert set(model["ratios_to_first"]) == RATIO_KEYS
        assert set(model["warmup"]) == TRIAL_KEYS
        assert len(model["trials"]) == TRIALS
        for trial in model["trials"]:
            assert set(trial) == TRIAL_KEYS


def test_bench_numbers_positive(bench_run):
    _, record, _ = bench_run
    assert record["bandwidth"]["gigabytes_per_second"] > 0
    for model in record["models"]:
        for key in ("load_seconds", "size_on_disk_bytes", "nominal_bits", "effective_bits", "peak_memory_bytes",
                    "decode_bound_tokens_per_second", "percent_of_bound"):
            assert model[key] > 0, key
        for key in ("prefill_tokens_per_second", "generation_tokens_per_second"):
            spread = model[key]
            assert 0 < spread["min"] <= spread["median"] <= spread["max"], key
        for key in TRAFFIC_KEYS:
            assert model["bytes_read_per_token"][key] > 0, key
        for trial in model["trials"] + [model["warmup"]]:
            for key in TRIAL_KEYS:
                assert trial[key] > 0, key


def test_bench_rates_match_trial_times(bench_run):
    _, record, _ = bench_run
    for model in record["models"]:
        for trial in model["trials"]:
            assert trial["prefill_tokens_per_second"] == pytest.approx(PROMPT_TOKENS / trial["prefill_seconds"])
            assert trial["generation_tokens_per_second"] == pytest.approx(GENERATION_TOKENS / trial["generation_seconds"])


def test_bench_ratios_to_first_model(bench_run):
    _, record, _ = bench_run
    first, second = record["models"]
    for value in first["ratios_to_first"].values():
        assert value == pytest.approx(1.0)
    ratios = second["ratios_to_first"]
    assert ratios["size_on_disk"] == pytest.approx(second["size_on_disk_bytes"] / first["size_on_disk_bytes"])
    assert ratios["generation_tokens_per_second"] == pytest.approx(
        second["generation_tokens_per_second"]["median"] / first["generation_tokens_per_second"]["median"]
    )
    assert ratios["size_on_disk"] < 0.5


def test_bench_bound_from_bandwidth(bench_run):
    _, record, _ = bench_run
    bandwidth = record["bandwidth"]["gigabytes_per_second"] * 1e9
    for model in record["models"]:
        bound = bandwidth / model["bytes_read_per_token"]["total"]
        assert model["decode_bound_tokens_per_second"] == pytest.approx(bound)
        assert model["percent_of_bound"] == pytest.approx(
            100 * model["generation_tokens_per_second"]["median"] / bound
        )


def test_bits_of_float16_demo(demo_dir):
    header = safetensors_header(demo_dir / "model.safetensors")
    stored_bytes = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in header.values())
    parameters = sum(int(mx.prod(mx.array(entry["shape"])).item()) for entry in header.values())
    dtypes = {entry["dtype"] for entry in header.values()}
    assert dtypes == {"F16"}

    bits = stored_bits(demo_dir)
    assert bits.nominal_bits == 16
    assert bits.effective_bits == pytest.approx(stored_bytes * 8 / parameters)


def test_bits_of_4bit_copy(demo_dir, quantized_4bit_dir):
    demo_header = safetensors_header(demo_dir / "model.safetensors")
    parameters = sum(int(mx.prod(mx.array(entry["shape"])).item()) for entry in demo_header.values())
    quantized_header = safetensors_header(quantized_4bit_dir / "model.safetensors")
    stored_bytes = sum(entry["data_offsets"][1] - entry["data_offsets"][0] for entry in quantized_header.values())

    bits = stored_bits(quantized_4bit_dir)
    assert bits.nominal_bits == 4
    assert bits.effective_bits == pytest.approx(stored_bytes * 8 / parameters)
    assert bits.effective_bits > bits.nominal_bits


def test_bits_read_from_lieq_json(tmp_path):
    (tmp_path / "lieq.json").write_text(json.dumps({"nominal_bits": 2.5, "effective_bits": 3.1}))
    bits = stored_bits(tmp_path)
    assert bits.nominal_bits == 2.5
    assert bits.effective_bits == 3.1
    assert bits.source == "lieq.json"


def test_bits_lieq_json_incomplete(tmp_path):
    (tmp_path / "lieq.json").write_text(json.dumps({"nominal_bits": 2.5}))
    assert read_lieq_bits(tmp_path) is None


def test_weight_bytes_tied_head(demo_model, demo_dir):
    model, _ = demo_model
    config = json.loads((demo_dir / "config.json").read_text())
    assert config["tie_word_embeddings"]
    parameter_bytes = sum(array.nbytes for array in _leaves(model.parameters()))
    row_bytes = config["hidden_size"] * model.model.embed_tokens.weight.dtype.size
    # The tied table is read once more as the output head, less all but one row as input.
    assert weight_bytes_per_token(model) == parameter_bytes + row_bytes


def test_kv_bytes_match_config(demo_model, demo_dir):
    model, _ = demo_model
    config = json.loads((demo_dir / "config.json").read_text())
    trial, prompt_cache = run_trial(model, random_prompt(model, 16), generation_tokens=2)
    itemsize = prompt_cache[0].keys.dtype.size
    expected = 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * config["head_dim"] * itemsize
    assert kv_bytes_per_position(prompt_cache) == expected
    # generate_step may queue one decode pass past the last token it yields.
    assert prompt_cache[0].offset >= 16 + 2
    assert trial.generation_tokens_per_second > 0


def test_random_prompt_fixed_by_seed(demo_model):
    model, _ = demo_model
    first = random_prompt(model, 64, seed=3)
    again = random_prompt(model, 64, seed=3)
    other = random_prompt(model, 64, seed=4)
    assert first.shape == (64,)
    assert mx.array_equal(first, again).item()
    assert not mx.array_equal(first, other).item()


@pytest.mark.parametrize(
    "brand, cores, chip, bandwidth",
    [
        ("Apple M1", 8, "M1", 68.25),
        ("Apple M1 Pro", 10, "M1 Pro", 200.0),
        ("Apple M2 Ultra", 24, "M2 Ultra", 800.0),
        ("Apple M3 Pro", 12, "M3 Pro", 150.0),
        ("Apple M3 Max", 14, "M3 Max", 300.0),
        ("Apple M3 Max", 16, "M3 Max", 400.0),
        ("Apple M4 Max", 14, "M4 Max", 410.0),
        ("Apple M4 Max", 16, "M4 Max", 546.0),
        ("Apple M3 Ultra", 32, "M3 Ultra", 819.0),
    ],
)
def test_apple_chip_table(brand, cores, chip, bandwidth):
    assert parse_apple_chip(brand) == chip
    assert apple_chip_bandwidth(chip, cores) == bandwidth


def test_unknown_chip_not_in_table():
    assert parse_apple_chip("AMD EPYC 7B13") is None
    assert apple_chip_bandwidth("M9 Hyper", 12) is None


def test_measured_bandwidth_positive():
    assert measure_read_bandwidth(nbytes=16 * 2**20, repeats=2) > 0
    assert measure_copy_bandwidth(nbytes=16 * 2**20, repeats=2) > 0


def test_bad_model_one_line_error(tmp_path):
    json_path = tmp_path / "bench.json"
    result = run_cli("bench", "demo", "no-such-model", "--json", str(json_path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "no-such-model" in lines[0]
    assert not json_path.exists()


def test_zero_trials_rejected():
    result = run_cli("bench", "demo", "-n", "0")
    assert result.returncode == 2
    assert "invalid count 0" in result.stderr


@pytest.mark.skipif(metal_available(), reason="checks the message on machines without Metal")
def test_kernels_need_metal():
    result = run_cli("bench", "demo", "--kernels")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "Metal" in lines[0]


def test_kernel_timings_skip_float_layers(demo_model):
    from lieq_mlx.bench.kernels import compare_layer_kernels

    model, _ = demo_model
    assert compare_layer_kernels(model, repeats=1) == []


def _leaves(tree) -> list:
    from mlx.utils import tree_flatten

    return [array for _, array in tree_flatten(tree)]
