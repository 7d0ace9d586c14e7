"""Options shared by several commands."""

from __future__ import annotations

import argparse


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default="demo",
        help="'demo' (SmolLM2-135M-Instruct, the default), a model folder, a .gguf file "
        "or a Hugging Face repo id",
    )
