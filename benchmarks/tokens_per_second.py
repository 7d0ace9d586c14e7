"""The tokens-per-second table of docs/benchmarks.md: the demo model against quantized copies.

Writes mlx-lm round-to-nearest copies of the demo model into `--out` unless they are
there: 4-bit and 2-bit, group 64, with every linear layer and the tied embeddings
quantized. Then runs `lieq-mlx bench` once over the demo model, the 4-bit copy, any extra
folders and the 2-bit copy, so that the ratios are to the model as imported.

    python benchmarks/tokens_per_second.py --out /tmp/lieq-bench --extra LIEQ_FOLDER --json bench.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MLX_LM_WIDTHS = (4, 2)
GROUP_SIZE = 64


def ensure_mlx_lm_copy(out: Path, bits: int) -> Path:
    """Write an mlx-lm `bits`-bit copy of the demo model into `out`, once; return its folder."""
    from mlx_lm.convert import convert

    from lieq_mlx.models import resolve_model

    folder = out / f"demo-mlx-lm-{bits}bit-g{GROUP_SIZE}"
    if not (folder / "config.json").is_file():
        convert(str(resolve_model("demo")), mlx_path=str(folder), quantize=True, q_bits=bits, q_group_size=GROUP_SIZE)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the mlx-lm quantized copies")
    parser.add_argument("--extra", nargs="*", default=[], help="more model folders to bench, e.g. a LieQ model")
    parser.add_argument("-p", "--prompt-tokens", default="128", help="prompt tokens (default: 128)")
    parser.add_argument("-g", "--generation-tokens", default="64", help="generated tokens (default: 64)")
    parser.add_argument("-n", "--trials", default="3", help="timed trials (default: 3)")
    parser.add_argument("--json", help="JSON record to write")
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    copies = [ensure_mlx_lm_copy(args.out, bits) for bits in MLX_LM_WIDTHS]
    command = [
        sys.executable, "-m", "lieq_mlx_cli", "bench", "demo", str(copies[0]), *args.extra, *map(str, copies[1:]),
        "-p", args.prompt_tokens, "-g", args.generation_tokens, "-n", args.trials,
    ]
    if args.json:
        command += ["--json", args.json]
    print(" ".join(command), file=sys.stderr)
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
