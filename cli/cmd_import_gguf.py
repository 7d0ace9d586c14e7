"""`lieq-mlx import-gguf FILE -o DIR`: convert a llama GGUF file into an MLX model folder."""

from __future__ import annotations

import time

from lieq_mlx.gguf_import import STORAGE_DTYPES, import_gguf

NAME = "import-gguf"
HELP = "convert a llama-architecture GGUF file (F32, F16, Q8_0, Q4_0, Q4_1) into a model folder"


def add_arguments(parser) -> None:
    parser.add_argument("gguf", metavar="FILE.gguf", help="GGUF file to import")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="output model folder")
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=sorted(STORAGE_DTYPES),
        help="storage type of the dequantized weights (default: float16)",
    )
    parser.add_argument("--force", action="store_true", help="replace DIR if it exists")


def run(args, console) -> int:
    start = time.perf_counter()
    with console.status(f"importing {args.gguf}"):
        folder = import_gguf(args.gguf, args.output, dtype=args.dtype, force=args.force)
    console.print(f"imported [bold]{args.gguf}[/] into [bold]{folder}[/] in {time.perf_counter() - start:.1f} s")
    return 0
