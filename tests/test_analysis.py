"""Tests of the layer geometry analysis on the real demo model and WikiText-2 text."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from lieq_mlx.analysis import (
    AnalysisOptions,
    analyze,
    capture_layer_inputs,
    collect_spectra,
    layer_drop_saliency,
    load_scores,
    parse_projections,
    random_model,
    save_scores,
    spearman,
)
from lieq_mlx.analysis.model_parts import PROJECTIONS
from lieq_mlx.analysis.spectrum import compactness, energy_fractions, prepare_outputs, top_k_energy
from lieq_mlx.data import consecutive_windows, read_text, sample_windows, tokenize
from lieq_mlx.errors import DataError, ScoresFileError
from lieq_mlx.perplexity import evaluate_perplexity

SAMPLES = 2
SEQ_LEN = 64


@pytest.fixture(scope="module")
def model(demo_model):
    return demo_model[0]


@pytest.fixture(scope="module")
def windows(demo_model, calib_text_path):
    tokens = tokenize(demo_model[1], read_text(calib_text_path))
    return sample_windows(tokens, SEQ_LEN, SAMPLES, seed=0)


# A variant with a reference, so that shifts and energy gains are measured.
SHIFT_OPTIONS = AnalysisOptions(reference="random-model", normalize=True, measure="rank", projections=PROJECTIONS)


@pytest.fixture(scope="module")
def result(model, windows):
    return analyze(model, windows, AnalysisOptions(), model_name="demo")


@pytest.fixture(scope="module")
def spectra(model, windows):
    return collect_spectra(model, windows, references=("trained-inputs", "random-model"), normalize=(False, True))


def test_capture_shapes_and_sharing(model, windows):
    count = 0
    for index, inputs in capture_layer_inputs(model, windows):
        assert index == count
        assert set(inputs) == set(PROJECTIONS)
        layer = model.layers[index]
        for name, x in inputs.items():
            parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            assert x.shape == (windows.size, getattr(parent, name).weight.shape[1]), name
            assert x.dtype == mx.float32
        assert inputs["q_proj"] is inputs["k_proj"] is inputs["v_proj"]
        assert inputs["gate_proj"] is inputs["up_proj"]
        count += 1
    assert count == len(model.layers)


def test_capture_down_input_is_swiglu(model, windows):
    # The recorded input of down_proj must be the SwiGLU of the recorded gate/up input.
    for index, inputs in capture_layer_inputs(model, windows):
        mlp = model.layers[index].mlp
        x = inputs["gate_proj"]
        expected = nn.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
        assert mx.allclose(inputs["down_proj"], expected, atol=1e-4, rtol=1e-4).item(), index
        if index == 3:
            break


def test_capture_restores_projections(model, windows):
    before = {name: id(getattr(model.layers[0].self_attn, name)) for name in ("q_proj", "o_proj")}
    for _ in capture_layer_inputs(model, windows):
        break
    after = {name: id(getattr(model.layers[0].self_attn, name)) for name in ("q_proj", "o_proj")}
    assert before == after
    assert isinstance(model.layers[0].self_attn.q_proj, nn.Linear)


def test_scores_finite_and_distinct(result, model):
    assert len(result.scores) == len(model.layers)
    assert all(math.isfinite(score) for score in result.scores)
    assert np.std(result.scores) > 1e-3
    assert len(set(round(score, 6) for score in result.scores)) > len(result.scores) // 2


def test_scores_deterministic_for_seed(result, model, windows):
    again = analyze(model, windows, AnalysisOptions(), model_name="demo")
    np.testing.assert_allclose(again.scores, result.scores, rtol=0, atol=1e-9)


def test_trained_shift_positive(spectra):
    # Training concentrates energy: the trained outputs are more compact than a random model's.
    for normalize in (False, True):
        options = AnalysisOptions(reference="random-model", normalize=normalize, measure="rank", projections=PROJECTIONS)
        layers = spectra.score_layers(options)
        for name in PROJECTIONS:
            assert np.mean([layer.projections[name].shift for layer in layers]) > 0.1, (name, normalize)
    # Random weights on the trained inputs: q and k still gain compactness from training.
    options = AnalysisOptions(reference="trained-inputs", measure="rank", projections=PROJECTIONS)
    layers = spectra.score_layers(options)
    for name in ("q_proj", "k_proj"):
        assert np.mean([layer.projections[name].shift for layer in layers]) > 0.1, name


@pytest.mark.parametrize("reference", ["trained-inputs", "random-model"])
def test_random_vs_random_shift_near_zero(model, windows, reference, spectra):
    subject = random_model(model, seed=1)
    other = random_model(model, seed=2)
    options = AnalysisOptions(reference=reference, normalize=True, measure="rank", projections=PROJECTIONS)
    check = analyze(subject, windows, options, reference=other)
    shifts = np.array([stats.shift for layer in check.layers for stats in layer.projections.values()])
    trained = np.array([stats.shift for layer in spectra.score_layers(options) for stats in layer.projections.values()])
    assert abs(shifts.mean()) < 0.05
    assert abs(shifts.mean()) < 0.2 * abs(trained.mean())
    assert np.abs(shifts).max() < 0.25


def test_random_model_seeded(model):
    first = random_model(model, seed=3).layers[0].self_attn.q_proj.weight
    second = random_model(model, seed=3).layers[0].self_attn.q_proj.weight
    third = random_model(model, seed=4).layers[0].self_attn.q_proj.weight
    assert mx.array_equal(first, second).item()
    assert not mx.array_equal(first, third).item()
    trained = model.layers[0].self_attn.q_proj.weight
    assert abs(mx.std(first).item() / mx.std(trained).item() - 1.0) < 0.02


def test_decompositions_agree(model, windows):
    _, inputs = next(capture_layer_inputs(model, windows))
    z = inputs["q_proj"] @ model.layers[0].self_attn.q_proj.weight.T  # (tokens, out_features)
    for normalize in (False, True):
        prepared = prepare_outputs(z, normalize)
        by_eig = energy_fractions(prepared, "eigvalsh")
        by_svd = energy_fractions(prepared, "svd")
        assert by_eig.shape == (windows.size,)
        assert abs(compactness(by_eig) - compactness(by_svd)) < 1e-3 * compactness(by_svd)
        assert abs(top_k_energy(by_eig, 8) - top_k_energy(by_svd, 8)) < 1e-4


def test_spectrum_extremes():
    rank_one = mx.ones((16, 8))
    assert compactness(energy_fractions(rank_one)) == pytest.approx(1.0, abs=1e-4)
    orthogonal = mx.concatenate([mx.eye(8), mx.eye(8)], axis=0)  # (16, 8)
    flat = energy_fractions(orthogonal)
    assert compactness(flat) == pytest.approx(8.0, rel=1e-4)
    assert top_k_energy(flat, 2) == pytest.approx(0.25, rel=1e-4)
    normalized = prepare_outputs(mx.array(np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)), True)
    assert np.allclose(np.linalg.norm(np.asarray(normalized), axis=1), 1.0, atol=1e-5)


def test_variants_from_one_pass(spectra, result):
    same = spectra.score_layers(AnalysisOptions())
    np.testing.assert_allclose([layer.score for layer in same], result.scores, atol=1e-9)
    none = spectra.score_layers(AnalysisOptions(reference="none", measure="rank"))
    for layer in none:
        for stats in layer.projections.values():
            assert stats.shift is None
            assert 0.0 <= stats.score("rank") < 1.0
    energy = spectra.score_layers(AnalysisOptions(reference="trained-inputs", normalize=True, measure="energy", top_k=4))
    gains = [stats.energy_gain for layer in energy for stats in layer.projections.values()]
    assert all(-1.0 <= gain <= 1.0 for gain in gains)
    mlp_only = spectra.score_layers(AnalysisOptions(reference="random-model", measure="rank", projections=parse_projections("mlp")))
    expected = np.mean([mlp_only[5].projections[n].shift for n in ("gate_proj", "up_proj", "down_proj")])
    assert mlp_only[5].score == pytest.approx(expected)


def test_parse_projections():
    assert parse_projections("qkv") == ("q_proj", "k_proj", "v_proj")
    assert parse_projections("o_proj, down_proj") == ("o_proj", "down_proj")
    with pytest.raises(ValueError, match="invalid projection set"):
        parse_projections("q,k")


def test_spearman_ties_and_signs():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ranks with ties: x -> (1, 2.5, 2.5, 4), y -> (1, 3, 2, 4); Pearson of those = 4.5 / sqrt(22.5).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))


def test_saliency_matches_perplexity(model, demo_model, test_text_path):
    tokens = tokenize(demo_model[1], read_text(test_text_path))
    batch = consecutive_windows(tokens, 48, 1)
    saliency = layer_drop_saliency(model, batch)
    reference = evaluate_perplexity(model, batch)
    assert saliency.base_perplexity == pytest.approx(reference.perplexity, rel=1e-4)
    assert len(saliency.increase) == len(model.layers)
    # Skipping the first layer of a trained model is far worse than skipping a middle one.
    assert saliency.increase[0] > max(saliency.increase[10:20])


def test_json_round_trip(result, tmp_path):
    path = save_scores(result, tmp_path / "scores.json")
    loaded = load_scores(path, expected_num_layers=len(result.scores))
    assert loaded.scores == result.scores
    assert loaded.options == result.options
    assert loaded.model == result.model
    assert loaded.calibration == result.calibration
    assert loaded.layers[7].projections["down_proj"] == result.layers[7].projections["down_proj"]
    data = json.loads(path.read_text())
    assert data["schema"] == "lieq-mlx.scores"
    assert data["version"] == 1


def test_scores_file_errors(result, tmp_path):
    path = save_scores(result, tmp_path / "scores.json")
    with pytest.raises(ScoresFileError, match="12"):
        load_scores(path, expected_num_layers=12)
    with pytest.raises(ScoresFileError, match="not found"):
        load_scores(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ScoresFileError, match="not valid JSON"):
        load_scores(broken)
    data = json.loads(path.read_text())
    for change, message in (
        (lambda d: d.update(schema="other"), "not a lieq-mlx scores file"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d["scores"].pop(), "lists 29 scores"),
        (lambda d: d.pop("layers"), "malformed"),
        (lambda d: d["layers"][0].update(score="high"), "not a finite number"),
    ):
        changed = json.loads(json.dumps(data))
        change(changed)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(changed))
        with pytest.raises(ScoresFileError, match=message):
            load_scores(bad)


def test_bad_calibration_file(tmp_path, demo_model):
    empty = tmp_path / "empty.txt"
    empty.write_text("\ufeff\n\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="empty"):
        read_text(empty)
    short = tmp_path / "short.txt"
    short.write_text("A few words only.\n", encoding="utf-8")
    tokens = tokenize(demo_model[1], read_text(short))
    with pytest.raises(DataError, match="too few|fewer"):
        sample_windows(tokens, SEQ_LEN, SAMPLES, seed=0)


def _run_cli(argv, monkeypatch):
    from lieq_mlx_cli import main

    monkeypatch.setenv("LIEQ_NO_OPENBLAS", "1")  # never re-execute the test process
    # Load only this command, so that the test does not depend on the other commands' modules.
    monkeypatch.setattr(main, "COMMAND_MODULES", ("analyze",))
    return main.main(argv)


def test_cli_analyze_end_to_end(calib_text_path, test_text_path, tmp_path, monkeypatch):
    scores = tmp_path / "scores.json"
    plot = tmp_path / "scores.png"
    code = _run_cli(
        [
            "analyze", "--calib", str(calib_text_path), "--samples", "2", "--seq-len", "32",
            "--saliency", "--data", str(test_text_path), "--windows", "1", "--saliency-seq-len", "32",
            "--json", str(scores), "--plot", str(plot),
        ],
        monkeypatch,
    )
    assert code == 0
    loaded = load_scores(scores, expected_num_layers=30)
    assert loaded.saliency is not None
    assert math.isfinite(json.loads(scores.read_text())["spearman"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A second run reuses the stored saliency; the same seed gives the same scores.
    again = tmp_path / "again.json"
    code = _run_cli(
        ["analyze", "--calib", str(calib_text_path), "--samples", "2", "--seq-len", "32",
         "--saliency-from", str(scores), "--json", str(again)],
        monkeypatch,
    )
    assert code == 0
    reloaded = load_scores(again)
    assert reloaded.saliency == loaded.saliency
    assert reloaded.spearman == pytest.approx(loaded.spearman)


def test_cli_errors(calib_text_path, tmp_path, monkeypatch, capsys):
    assert _run_cli(["analyze", "--json", str(tmp_path / "x.json")], monkeypatch) == 1
    assert "--calib" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("\ufeffToo short.\n", encoding="utf-8")
    assert _run_cli(["analyze", "--calib", str(short), "--json", str(tmp_path / "x.json")], monkeypatch) == 1
    assert "--samples" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    assert _run_cli(["analyze", "--calib", str(calib_text_path), "--projections", "q,k"], monkeypatch) == 1
    assert "invalid projection set" in capsys.readouterr().err
