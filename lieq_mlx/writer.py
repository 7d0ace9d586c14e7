"""Write a quantized model folder that stock `mlx_lm.load` opens.

The folder contains `config.json` with a `quantization` section (defaults plus one entry per
quantized module), safetensors, the source's tokenizer files and `lieq.json`, the record
of how the model was made. It is written to a temporary sibling folder and renamed at
the end, so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.utils import save_config

from lieq_mlx.atomic import atomic_folder
from lieq_mlx.gguf_import import save_weights

# Files of a model folder that describe weights; everything else (tokenizer, chat
# template, generation settings) is copied from the source unchanged.
_WEIGHT_FILES = ("config.json", "model.safetensors.index.json", "lieq.json", "lieq_import.json")
_COPIED_SUFFIXES = (".json", ".model", ".jinja", ".tiktoken", ".txt")


def copy_tokenizer_files(source: Path, destination: Path) -> None:
    for path in sorted(source.iterdir()):
        if not path.is_file() or path.name in _WEIGHT_FILES or path.name.startswith("model"):
            continue
        if path.suffix in _COPIED_SUFFIXES:
            shutil.copy2(path, destination / path.name)


def write_quantized_model(
    model: nn.Module,
    source_dir: Path,
    output_dir: Path,
    config: dict,
    quantization: dict,
    record: dict,
    force: bool = False,
) -> Path:
    """Write `model` (already quantized, parameters in storage dtype) as a model folder."""
    config = dict(config)
    config["quantization"] = quantization
    config["torch_dtype"] = "float16"
    weights = dict(tree_flatten(model.parameters()))
    with atomic_folder(output_dir, force=force) as staging:
        save_weights(weights, staging)
        save_config(config, staging / "config.json")
        copy_tokenizer_files(source_dir, staging)
        (staging / "lieq.json").write_text(json.dumps(record, indent=2) + "\n")
    return Path(output_dir).expanduser().resolve()


def folder_size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())
