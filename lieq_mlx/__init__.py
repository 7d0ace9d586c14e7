"""lieq-mlx: layer-wise mixed-precision quantization of small language models on MLX."""

__version__ = "0.1.0"


def load(path):
    """Load a model folder that lieq-mlx wrote (or any mlx-lm folder); return (model, tokenizer)."""
    from lieq_mlx.models import load_model

    return load_model(path)
