"""Layer geometry analysis: the proxy that scores decoder layers, and its saliency check.

    from lieq_mlx.analysis import AnalysisOptions, analyze
    result = analyze(model, windows, AnalysisOptions(measure="rank"))
    result.scores  # one float per decoder layer
"""

from lieq_mlx.analysis.analyze import Spectra, analyze, collect_spectra
from lieq_mlx.analysis.capture import capture_layer_inputs
from lieq_mlx.analysis.reference import random_model
from lieq_mlx.analysis.result import AnalysisResult, ModelInfo, Timings
from lieq_mlx.analysis.saliency import SaliencyResult, layer_drop_saliency, spearman
from lieq_mlx.analysis.schema import load_scores, read_saliency, save_scores
from lieq_mlx.analysis.scores import AnalysisOptions, LayerScore, ProjectionStats, parse_projections

__all__ = [
    "AnalysisOptions",
    "AnalysisResult",
    "LayerScore",
    "ModelInfo",
    "ProjectionStats",
    "SaliencyResult",
    "Spectra",
    "Timings",
    "analyze",
    "capture_layer_inputs",
    "collect_spectra",
    "layer_drop_saliency",
    "load_scores",
    "parse_projections",
    "random_model",
    "read_saliency",
    "save_scores",
    "spearman",
]
