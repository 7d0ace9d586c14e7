"""The quantize workflow shared by `quantize` and `demo`: load, score, quantize, write."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from lieq_mlx.allocation import format_widths
from lieq_mlx.atomic import check_destination
from lieq_mlx.calibration import calibration_windows
from lieq_mlx.models import cast_floats, load_model, resolve_model
from lieq_mlx.pipeline import QuantizeResult, QuantizeSettings, make_record, needs_calibration, needs_scores, quantize_model
from lieq_mlx.platform import compute_dtype
from lieq_mlx.writer import folder_size_bytes, write_quantized_model
from lieq_mlx_cli.console import StageProgress, progress_bar


@dataclass
class QuantizeRun:
    output: Path
    result: QuantizeResult
    model: object
    tokenizer: object
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def size_bytes(self) -> int:
        return folder_size_bytes(self.output)


def run_quantize(
    console,
    model_spec: str,
    settings: QuantizeSettings,
    output: Path,
    calib: Path | None = None,
    samples: int = 8,
    seq_len: int = 256,
    seed: int = 0,
    scores_path: Path | None = None,
    force: bool = False,
) -> QuantizeRun:
    """Quantize `model_spec` into `output`; return the in-memory model in compute dtype too."""
    from lieq_mlx.analysis import AnalysisOptions, analyze, load_scores

    settings.validate()
    check_destination(Path(output).expanduser().resolve(), force)
    seconds: dict[str, float] = {}

    start = time.perf_counter()
    with console.status(f"loading {model_spec}"):
        source_dir = resolve_model(model_spec)
        model, tokenizer = load_model(source_dir)
    seconds["load"] = time.perf_counter() - start

    need_calibration = (needs_scores(settings.policy) and scores_path is None) or needs_calibration(settings)
    windows, calibration = None, None
    if need_calibration:
        start = time.perf_counter()
        if calib is None:
            message = f"sampling calibration text from the model ({samples} x {seq_len} tokens)"
        else:
            message = "reading calibration text"
        with console.status(message):
            windows, calibration = calibration_windows(model, tokenizer, calib, samples, seq_len, seed)
        seconds["calibration"] = time.perf_counter() - start

    scores = None
    with progress_bar(console) as progress:
        stages = StageProgress(progress)
        if needs_scores(settings.policy):
            start = time.perf_counter()
            if scores_path is not None:
                scores = load_scores(scores_path, expected_num_layers=len(model.layers)).scores
            else:
                analysis = analyze(
                    model,
                    windows,
                    AnalysisOptions(seed=seed),
                    progress=lambda done, total: stages("analysing layers", done, total),
                    model_name=str(model_spec),
                    calibration=calibration,
                )
                scores = analysis.scores
            seconds["analyze"] = time.perf_counter() - start

        start = time.perf_counter()
        result = quantize_model(model, settings, scores=scores, calibration=windows, progress=stages)
        seconds["quantize"] = time.perf_counter() - start

    start = time.perf_counter()
    with console.status(f"writing {output}"):
        from mlx_lm.utils import load_config

        record = make_record(settings, result, str(model_spec), calibration)
        record["seconds"] = {**seconds, **{f"quantize.{k}": v for k, v in result.seconds.items()}}
        written = write_quantized_model(
            model, source_dir, Path(output), load_config(source_dir), result.quantization, record, force=force
        )
    seconds["write"] = time.perf_counter() - start
    cast_floats(model, compute_dtype())
    mx.eval(model.parameters())
    return QuantizeRun(output=written, result=result, model=model, tokenizer=tokenizer, seconds=seconds)


def describe_settings(settings: QuantizeSettings) -> str:
    return (
        f"policy {settings.policy}, widths {format_widths(settings.resolved_widths())}, "
        f"target {settings.target_bits:g} {settings.count} bits, group size {settings.group_size}, "
        f"embeddings {settings.embed_bits} bits, {settings.rounding} rounding, {settings.scaling} scaling"
    )
