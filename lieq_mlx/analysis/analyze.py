"""The analysis pass: capture projection inputs, take output spectra, score every layer.

`collect_spectra` does the expensive work once and keeps the energy fractions p_k of
every spectrum it was asked for, so that several variants of the proxy (reference,
normalisation, measure, top k, projection set) can be scored from one pass.
`analyze` collects only what its options need and scores them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from lieq_mlx.analysis.capture import capture_layer_inputs
from lieq_mlx.analysis.model_parts import PROJECTIONS, decoder_parts, projection_weight
from lieq_mlx.analysis.reference import random_model
from lieq_mlx.analysis.result import AnalysisResult, ModelInfo, Timings
from lieq_mlx.analysis.scores import AnalysisOptions, LayerScore, ProjectionStats, layer_score
from lieq_mlx.analysis.spectrum import compactness, energy_fractions, prepare_outputs, top_k_energy

# Spectrum sources: the trained model, random weights on trained inputs, the random model.
TRAINED = "trained"
SOURCES = (TRAINED, "trained-inputs", "random-model")


@dataclass
class Spectra:
    """Energy fractions p_k per (layer, projection, source, normalize), largest first."""

    fractions: dict[tuple[int, str, str, bool], np.ndarray] = field(default_factory=dict)
    num_layers: int = 0
    tokens: int = 0
    forward_seconds: float = 0.0
    decomposition_seconds: float = 0.0
    reference_seconds: float = 0.0

    def stats(self, layer: int, name: str, options: AnalysisOptions) -> ProjectionStats:
        """Return the statistics of one projection under `options`."""
        p = self.fractions[(layer, name, TRAINED, options.normalize)]
        stats = {"compactness": compactness(p), "energy": top_k_energy(p, options.top_k), "max_rank": len(p)}
        if options.reference != "none":
            q = self.fractions[(layer, name, options.reference, options.normalize)]
            stats["reference_compactness"] = compactness(q)
            stats["reference_energy"] = top_k_energy(q, options.top_k)
        return ProjectionStats(**stats)

    def score_layers(self, options: AnalysisOptions) -> list[LayerScore]:
        """Score every layer under `options`; all projections keep their statistics."""
        layers = []
        for index in range(self.num_layers):
            names = [n for n in PROJECTIONS if (index, n, TRAINED, options.normalize) in self.fractions]
            stats = {name: self.stats(index, name, options) for name in names}
            layers.append(LayerScore(index=index, score=layer_score(stats, options), projections=stats))
        return layers


def collect_spectra(
    model: nn.Module,
    windows: mx.array,
    references: tuple[str, ...] = ("random-model",),
    normalize: tuple[bool, ...] = (False,),
    projections: tuple[str, ...] = PROJECTIONS,
    seed: int = 0,
    decomposition: str = "eigvalsh",
    reference: nn.Module | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Spectra:
    """Run `windows` (N, L) through `model` once and keep the requested output spectra.

    `references` names the reference sources to measure besides the trained model
    (`trained-inputs`, `random-model`). Their random weights come from one random copy of
    the model drawn with `seed`, unless `reference` passes a ready one.
    """
    _, layers, _ = decoder_parts(model)
    spectra = Spectra(num_layers=len(layers), tokens=windows.size)
    requested = [source for source in SOURCES[1:] if source in references]

    if requested and reference is None:
        start = time.perf_counter()
        reference = random_model(model, seed)
        spectra.reference_seconds = time.perf_counter() - start

    trained_inputs = capture_layer_inputs(model, windows)
    random_inputs = capture_layer_inputs(reference, windows) if "random-model" in requested else None
    for index in range(len(layers)):
        start = time.perf_counter()
        _, inputs = next(trained_inputs)
        reference_inputs = next(random_inputs)[1] if random_inputs is not None else None
        spectra.forward_seconds += time.perf_counter() - start

        start = time.perf_counter()
        for name in projections:
            x = inputs[name]  # (tokens, in_features)
            weight = projection_weight(layers[index], name)
            jobs = [(TRAINED, x @ weight.T)]  # (tokens, out_features)
            if requested:
                random_weight = projection_weight(reference.layers[index], name)
                if "trained-inputs" in requested:
                    jobs.append(("trained-inputs", x @ random_weight.T))
                if "random-model" in requested:
                    jobs.append(("random-model", reference_inputs[name] @ random_weight.T))
            for source, z in jobs:
                for flag in normalize:
                    p = energy_fractions(prepare_outputs(z, flag), decomposition)
                    spectra.fractions[(index, name, source, flag)] = p
        spectra.decomposition_seconds += time.perf_counter() - start
        if progress:
            progress(index + 1, len(layers))
    return spectra


def model_info(model: nn.Module, name: str) -> ModelInfo:
    """Describe `model` by name and shape."""
    args = model.args
    return ModelInfo(
        name=name,
        num_layers=len(model.layers),
        hidden_size=int(args.hidden_size),
        vocab_size=int(args.vocab_size),
        model_type=str(getattr(args, "model_type", "")),
    )


def analyze(
    model: nn.Module,
    windows: mx.array,
    options: AnalysisOptions = AnalysisOptions(),
    progress: Callable[[int, int], None] | None = None,
    model_name: str = "",
    calibration: dict | None = None,
    reference: nn.Module | None = None,
) -> AnalysisResult:
    """Score every decoder layer of `model` on calibration `windows` (N, L) of token ids.

    `reference` replaces the random copy drawn from `options.seed` (for example another
    random model, to check that the measure is unbiased).
    """
    references = () if options.reference == "none" else (options.reference,)
    spectra = collect_spectra(
        model,
        windows,
        references=references,
        normalize=(options.normalize,),
        projections=options.projections,
        seed=options.seed,
        decomposition=options.decomposition,
        reference=reference,
        progress=progress,
    )
    calibration = dict(calibration or {})
    calibration.setdefault("samples", int(windows.shape[0]))
    calibration.setdefault("seq_len", int(windows.shape[1]))
    calibration["tokens"] = int(windows.size)
    return AnalysisResult(
        model=model_info(model, model_name),
        options=options,
        layers=spectra.score_layers(options),
        calibration=calibration,
        timings=Timings(
            forward_seconds=spectra.forward_seconds,
            decomposition_seconds=spectra.decomposition_seconds,
            reference_seconds=spectra.reference_seconds,
        ),
    )
