"""The outcome of an analysis: per-layer scores, projection statistics, settings, timings."""

from __future__ import annotations

from dataclasses import dataclass, field

from lieq_mlx.analysis.saliency import SaliencyResult, spearman
from lieq_mlx.analysis.scores import AnalysisOptions, LayerScore


@dataclass(frozen=True)
class ModelInfo:
    """Name and shape of the analysed model; the fingerprint that a scores file must match."""

    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    model_type: str = ""

    def to_dict(self) -> dict:
        """Return the model description as a JSON-ready dict."""
        return {
            "name": self.name,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "model_type": self.model_type,
        }


@dataclass(frozen=True)
class Timings:
    """Wall-clock seconds of the analysis steps."""

    forward_seconds: float = 0.0  # forward passes that capture projection inputs
    decomposition_seconds: float = 0.0  # Z = X W^T, Gram matrices and eigenvalues
    reference_seconds: float = 0.0  # building the random reference model

    @property
    def total_seconds(self) -> float:
        """Sum of the steps."""
        return self.forward_seconds + self.decomposition_seconds + self.reference_seconds


@dataclass
class AnalysisResult:
    """Per-layer scores of one model and the settings that produced them."""

    model: ModelInfo
    options: AnalysisOptions
    layers: list[LayerScore]
    calibration: dict = field(default_factory=dict)  # source, samples, seq_len, seed, tokens
    timings: Timings = field(default_factory=Timings)
    saliency: SaliencyResult | None = None

    @property
    def scores(self) -> list[float]:
        """Score of every decoder layer, in layer order."""
        return [layer.score for layer in self.layers]

    @property
    def spearman(self) -> float | None:
        """Spearman rank correlation of the scores with the saliency increases, when measured."""
        if self.saliency is None:
            return None
        return spearman(self.scores, self.saliency.increase)
