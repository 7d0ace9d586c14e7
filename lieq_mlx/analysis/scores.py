"""Options, per-projection statistics and layer scores of the geometry proxy.

A projection's statistics compare the spectrum of its outputs Z = X W^T in the trained
model with that of an untrained reference:
- compactness shift dr = (C~ - C) / C~, positive when training made Z more compact;
- energy gain E_k - E~_k, positive when training put more energy in the top k directions.
Without a reference, the score comes from the trained spectrum alone: 1 - C / max_rank
(`rank`) or E_k (`energy`). A layer's score is the mean over the chosen projections.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lieq_mlx.analysis.model_parts import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, PROJECTIONS

REFERENCES = ("trained-inputs", "random-model", "none")
MEASURES = ("rank", "energy")
PROJECTION_SETS = {
    "all": PROJECTIONS,
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "attention": ATTENTION_PROJECTIONS,
    "mlp": MLP_PROJECTIONS,
}


def parse_projections(text: str) -> tuple[str, ...]:
    """Parse `all`, `qkv`, `attention`, `mlp` or a comma-separated list of projection names."""
    text = text.strip()
    if text in PROJECTION_SETS:
        return PROJECTION_SETS[text]
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in PROJECTIONS]
    if not names or unknown:
        raise ValueError(
            f"invalid projection set {text!r}; use all, qkv, attention, mlp or a comma-separated "
            f"list of {', '.join(PROJECTIONS)}"
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class AnalysisOptions:
    """Variant of the proxy and how it is computed.

    reference: `trained-inputs` multiplies the trained model's inputs X by random weights
    (X W~^T). `random-model` runs a whole random model on the same tokens (X~ W~^T).
    `none` scores the trained spectrum alone.
    normalize: centre Z over tokens and scale each row to unit L2 norm before the spectrum.
    measure: `rank` (effective rank, compactness shift) or `energy` (top-k energy gain).

    The defaults are the variant with the highest mean Spearman correlation with
    layer-drop saliency over four calibration draws on SmolLM2-135M-Instruct
    (docs/analysis.md lists every variant).
    """

    # NOTE: chosen on one 30-layer model; the runner-up (a whole random model as the
    # reference) is within the sampling error of Spearman there.
    reference: str = "none"
    normalize: bool = True
    measure: str = "energy"
    top_k: int = 8
    projections: tuple[str, ...] = PROJECTIONS
    seed: int = 0
    decomposition: str = "eigvalsh"

    def __post_init__(self):
        if self.reference not in REFERENCES:
            raise ValueError(f"invalid reference {self.reference!r}; use one of {', '.join(REFERENCES)}")
        if self.measure not in MEASURES:
            raise ValueError(f"invalid measure {self.measure!r}; use one of {', '.join(MEASURES)}")
        if self.top_k < 1:
            raise ValueError(f"invalid top_k {self.top_k}; use at least 1")
        if not self.projections or any(name not in PROJECTIONS for name in self.projections):
            raise ValueError(f"invalid projections {self.projections!r}; use names from {', '.join(PROJECTIONS)}")

    def to_dict(self) -> dict:
        """Return the options as a JSON-ready dict."""
        return {
            "reference": self.reference,
            "normalize": self.normalize,
            "measure": self.measure,
            "top_k": self.top_k,
            "projections": list(self.projections),
            "seed": self.seed,
            "decomposition": self.decomposition,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "AnalysisOptions":
        """Build options from `to_dict` output."""
        return cls(
            reference=str(data["reference"]),
            normalize=bool(data["normalize"]),
            measure=str(data["measure"]),
            top_k=int(data["top_k"]),
            projections=tuple(data["projections"]),
            seed=int(data["seed"]),
            decomposition=str(data.get("decomposition", "eigvalsh")),
        )


@dataclass(frozen=True)
class ProjectionStats:
    """Spectral statistics of one projection's outputs, trained and reference."""

    compactness: float
    energy: float
    max_rank: int
    reference_compactness: float | None = None
    reference_energy: float | None = None

    @property
    def shift(self) -> float | None:
        """Relative compactness shift (C~ - C) / C~; None without a reference."""
        if self.reference_compactness is None or self.reference_compactness == 0.0:
            return None
        return (self.reference_compactness - self.compactness) / self.reference_compactness

    @property
    def energy_gain(self) -> float | None:
        """Top-k energy gain E_k - E~_k; None without a reference."""
        if self.reference_energy is None:
            return None
        return self.energy - self.reference_energy

    def score(self, measure: str) -> float:
        """Return this projection's score under `measure` (rank or energy)."""
        if measure == "rank":
            shift = self.shift
            return 1.0 - self.compactness / self.max_rank if shift is None else shift
        gain = self.energy_gain
        return self.energy if gain is None else gain

    def to_dict(self) -> dict:
        """Return the statistics as a JSON-ready dict, derived values included."""
        return {
            "compactness": self.compactness,
            "energy": self.energy,
            "max_rank": self.max_rank,
            "reference_compactness": self.reference_compactness,
            "reference_energy": self.reference_energy,
            "shift": self.shift,
            "energy_gain": self.energy_gain,
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ProjectionStats":
        """Build statistics from `to_dict` output."""
        optional = lambda value: None if value is None else float(value)  # noqa: E731
        return cls(
            compactness=float(data["compactness"]),
            energy=float(data["energy"]),
            max_rank=int(data["max_rank"]),
            reference_compactness=optional(data.get("reference_compactness")),
            reference_energy=optional(data.get("reference_energy")),
        )


@dataclass(frozen=True)
class LayerScore:
    """Score of one decoder layer and the statistics of its projections."""

    index: int
    score: float
    projections: dict[str, ProjectionStats] = field(default_factory=dict)


def layer_score(stats: dict[str, ProjectionStats], options: AnalysisOptions) -> float:
    """Return the mean score of the projections in `options.projections`."""
    values = [stats[name].score(options.measure) for name in options.projections]
    return sum(values) / len(values)
