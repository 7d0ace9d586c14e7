"""PNG plot of per-layer scores, with the layer-drop saliency when it was measured.

matplotlib is an optional dependency (the `plot` extra): it is imported only here.
"""

from __future__ import annotations

from pathlib import Path

from lieq_mlx.analysis.result import AnalysisResult
from lieq_mlx.errors import LieqError


def require_matplotlib():
    """Import matplotlib with a file-only backend; raise LieqError when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise LieqError("plotting needs matplotlib; install it with: pip install 'lieq-mlx[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def plot_scores(result: AnalysisResult, path: str | Path) -> Path:
    """Draw the scores as bars and the saliency (log scale) as a line; write a PNG to `path`."""
    pyplot = require_matplotlib()
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = list(range(len(result.scores)))

    figure, axis = pyplot.subplots(figsize=(9, 4), dpi=120)
    axis.bar(layers, result.scores, color="tab:blue", label="proxy score")
    axis.set_xlabel("decoder layer")
    axis.set_ylabel("proxy score", color="tab:blue")
    title = f"{result.model.name or 'model'}: layer scores"
    if result.saliency is not None:
        other = axis.twinx()
        increases = [max(value, 1e-3) for value in result.saliency.increase]
        other.plot(layers, increases, color="tab:red", marker="o", label="perplexity increase when skipped")
        other.set_yscale("log")
        other.set_ylabel("perplexity increase when skipped", color="tab:red")
        title += f" (Spearman {result.spearman:+.2f} with saliency)"
    axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path
