"""The scores JSON file: a versioned record of an analysis that `quantize --scores` reuses.

Layout (version 1):

    {"schema": "lieq-mlx.scores", "version": 1,
     "model": {"name", "num_layers", "hidden_size", "vocab_size", "model_type"},
     "settings": {"calibration": {...}, "options": {...}},
     "timings": {"forward_seconds", "decomposition_seconds", "reference_seconds"},
     "layers": [{"index", "score", "projections": {"q_proj": {...}, ...}}, ...],
     "scores": [float, ...],
     "saliency": null or {"base_perplexity", "skipped_perplexity", "increase", ...},
     "spearman": null or float}
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from lieq_mlx.analysis.result import AnalysisResult, ModelInfo, Timings
from lieq_mlx.analysis.saliency import SaliencyResult
from lieq_mlx.analysis.scores import AnalysisOptions, LayerScore, ProjectionStats
from lieq_mlx.errors import ScoresFileError

SCHEMA = "lieq-mlx.scores"
VERSION = 1


def result_to_dict(result: AnalysisResult) -> dict:
    """Return the JSON-ready record of `result`."""
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "model": result.model.to_dict(),
        "settings": {"calibration": dict(result.calibration), "options": result.options.to_dict()},
        "timings": {
            "forward_seconds": result.timings.forward_seconds,
            "decomposition_seconds": result.timings.decomposition_seconds,
            "reference_seconds": result.timings.reference_seconds,
        },
        "layers": [
            {
                "index": layer.index,
                "score": layer.score,
                "projections": {name: stats.to_dict() for name, stats in layer.projections.items()},
            }
            for layer in result.layers
        ],
        "scores": result.scores,
        "saliency": None if result.saliency is None else result.saliency.to_dict(),
        "spearman": result.spearman,
    }


def save_scores(result: AnalysisResult, path: str | Path) -> Path:
    """Write `result` as a scores JSON file, atomically (temporary file, then rename)."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result_to_dict(result), indent=1, allow_nan=False) + "\n"
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def _finite(value, description: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ScoresFileError(f"scores file {path}: {description} is {value!r}, not a finite number; rerun `lieq-mlx analyze`")
    return float(value)


def result_from_dict(data: dict, path: Path, expected_num_layers: int | None = None) -> AnalysisResult:
    """Rebuild an `AnalysisResult` from a scores record; raise ScoresFileError when invalid."""
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ScoresFileError(f"{path} is not a lieq-mlx scores file (no \"schema\": \"{SCHEMA}\"); pass the JSON that `lieq-mlx analyze --json` wrote")
    if data.get("version") != VERSION:
        raise ScoresFileError(f"scores file {path} has version {data.get('version')!r}; this lieq-mlx reads version {VERSION}, rerun `lieq-mlx analyze`")
    try:
        model = data["model"]
        info = ModelInfo(
            name=str(model["name"]),
            num_layers=int(model["num_layers"]),
            hidden_size=int(model["hidden_size"]),
            vocab_size=int(model["vocab_size"]),
            model_type=str(model.get("model_type", "")),
        )
        options = AnalysisOptions.from_dict(data["settings"]["options"])
        calibration = dict(data["settings"].get("calibration", {}))
        scores = [_finite(value, f"score of layer {i}", path) for i, value in enumerate(data["scores"])]
        layers = []
        for i, layer in enumerate(data["layers"]):
            stats = {name: ProjectionStats.from_dict(entry) for name, entry in layer.get("projections", {}).items()}
            layers.append(LayerScore(index=int(layer["index"]), score=_finite(layer["score"], f"score of layer {i}", path), projections=stats))
        timings = Timings(**{key: float(value) for key, value in data.get("timings", {}).items()})
        saliency = None if data.get("saliency") is None else SaliencyResult.from_dict(data["saliency"])
    except (KeyError, TypeError, ValueError) as error:
        raise ScoresFileError(f"scores file {path} is malformed ({type(error).__name__}: {error}); rerun `lieq-mlx analyze --json`") from None

    if len(scores) != info.num_layers or len(layers) != info.num_layers:
        raise ScoresFileError(f"scores file {path} lists {len(scores)} scores and {len(layers)} layers for a model of {info.num_layers} layers; rerun `lieq-mlx analyze`")
    if [layer.index for layer in layers] != list(range(info.num_layers)):
        raise ScoresFileError(f"scores file {path} does not list layers 0 to {info.num_layers - 1} in order; rerun `lieq-mlx analyze`")
    if any(abs(layer.score - score) > 1e-9 for layer, score in zip(layers, scores)):
        raise ScoresFileError(f"scores file {path}: \"scores\" disagrees with the per-layer scores; rerun `lieq-mlx analyze`")
    if expected_num_layers is not None and info.num_layers != expected_num_layers:
        raise ScoresFileError(
            f"scores file {path} is for a model of {info.num_layers} layers ({info.name or 'unnamed'}), "
            f"not {expected_num_layers}; analyze this model with `lieq-mlx analyze --json FILE`"
        )
    if saliency is not None and len(saliency.skipped_perplexity) != info.num_layers:
        raise ScoresFileError(f"scores file {path}: saliency lists {len(saliency.skipped_perplexity)} layers, not {info.num_layers}")
    return AnalysisResult(model=info, options=options, layers=layers, calibration=calibration, timings=timings, saliency=saliency)


def read_saliency(path: str | Path) -> SaliencyResult:
    """Read the "saliency" entry of a JSON file (a scores file or a saliency cache)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ScoresFileError(f"saliency file {path} not found; write one with `lieq-mlx analyze --saliency --json {path}`")
    try:
        return SaliencyResult.from_dict(json.loads(path.read_text(encoding="utf-8"))["saliency"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        raise ScoresFileError(f"{path} contains no valid \"saliency\" entry ({type(error).__name__}: {error}); "
                              "pass a scores file written with `lieq-mlx analyze --saliency --json`") from None


def load_scores(path: str | Path, expected_num_layers: int | None = None) -> AnalysisResult:
    """Read a scores JSON file; raise ScoresFileError when it is missing, malformed or mismatched."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ScoresFileError(f"scores file {path} not found; write one with `lieq-mlx analyze --json {path}`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ScoresFileError(f"scores file {path} is not valid JSON ({error}); rerun `lieq-mlx analyze --json`") from None
    return result_from_dict(data, path, expected_num_layers)
