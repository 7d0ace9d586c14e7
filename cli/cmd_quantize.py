"""`lieq-mlx quantize`: allocate bits per decoder layer under a budget and write the model."""

from __future__ import annotations

import math
from pathlib import Path

from rich.table import Table

from lieq_mlx.errors import BudgetError
from lieq_mlx.pipeline import COUNTS, DEFAULT_EMBED_BITS, QuantizeSettings
from lieq_mlx.allocation import POLICIES
from lieq_mlx.quantize import DISTORTIONS, ROUNDINGS, SCALINGS
from lieq_mlx_cli.console import bit_strip
from lieq_mlx_cli.options import add_model_option
from lieq_mlx_cli.quantize_flow import describe_settings, run_quantize

NAME = "quantize"
HELP = "quantize a model to mixed precision (one width per decoder layer) under an average-bit budget"


def parse_widths(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise BudgetError(f"--bits {text!r} is invalid; give comma-separated widths such as 2,4 or 1,2,3,4") from None


def add_arguments(parser) -> None:
    add_model_option(parser)
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="DIR", help="output model folder")
    parser.add_argument("--target-bits", type=float, default=2.5, help="average bits per weight to meet (default: 2.5)")
    parser.add_argument("--count", choices=COUNTS, default="nominal",
                        help="how --target-bits is counted: nominal (decoder-layer weights only, no scales) "
                        "or effective (every stored bit of the model per parameter); default: nominal")
    parser.add_argument("--policy", choices=POLICIES, default="lieq",
                        help="lieq (exact knapsack over the widths, default), paper (two widths, top layers "
                        "by score get the high one), uniform or random (baselines)")
    parser.add_argument("--bits", metavar="W,W", help="candidate widths per layer (default: 1,2,3,4 for lieq, 2,4 for paper and random, 2,3,4 for uniform)")
    parser.add_argument("--group-size", type=int, default=64, help="weights per scale and bias: 32, 64 or 128 (default: 64)")
    parser.add_argument("--embed-bits", type=int, default=DEFAULT_EMBED_BITS,
                        help=f"bits of the token embedding and output head; 16 keeps them unquantized (default: {DEFAULT_EMBED_BITS})")
    parser.add_argument("--distortion", choices=DISTORTIONS, default="output",
                        help="layer error used by the lieq policy: output (on calibration inputs, default) or weight")
    parser.add_argument("--rounding", choices=ROUNDINGS, default="gptq",
                        help="gptq (error-compensating, uses the calibration text; default) or nearest "
                        "(round to nearest after a per-group clipping search; with --scaling none it needs no data)")
    parser.add_argument("--scaling", choices=SCALINGS, default="awq",
                        help="awq (scale input channels by their activations before rounding, folded into the "
                        "norms; uses the calibration text; default) or none")
    parser.add_argument("--scores", type=Path, metavar="FILE", help="reuse layer scores from `lieq-mlx analyze --json FILE`")
    parser.add_argument("--calib", type=Path, metavar="FILE", help="calibration text (default: text sampled from the model itself)")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows (default: 8)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of calibration sampling, the reference model and the random policy")
    parser.add_argument("--force", action="store_true", help="replace the output folder if it exists")


def settings_from_args(args) -> QuantizeSettings:
    if not math.isfinite(args.target_bits):
        raise BudgetError(f"--target-bits {args.target_bits} is invalid; pass a number such as 2.5")
    return QuantizeSettings(
        target_bits=args.target_bits,
        count=args.count,
        policy=args.policy,
        widths=parse_widths(args.bits),
        group_size=args.group_size,
        embed_bits=args.embed_bits,
        distortion=args.distortion,
        rounding=args.rounding,
        scaling=args.scaling,
        seed=args.seed,
    )


def summary_table(run, settings: QuantizeSettings, title: str) -> Table:
    result = run.result
    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("settings", describe_settings(settings))
    table.add_row("bits per layer", bit_strip(result.allocation))
    table.add_row("nominal bits", f"{result.nominal_bits:.3f} (mean width of decoder-layer weights, no scales)")
    table.add_row("effective bits", f"{result.effective_bits:.3f} (every stored bit / every parameter)")
    table.add_row("size on disk", f"{run.size_bytes / 2**20:.1f} MiB")
    table.add_row("time", ", ".join(f"{name} {value:.1f} s" for name, value in run.seconds.items()))
    table.add_row("output", str(run.output))
    return table


def check_input_files(args) -> None:
    """Reject a given --scores or --calib path that does not exist, even when unused."""
    for option, path in (("--scores", args.scores), ("--calib", args.calib)):
        if path is not None and not Path(path).expanduser().is_file():
            raise BudgetError(f"{option} file {path} not found; pass an existing file or leave the option out")


def run(args, console) -> int:
    check_input_files(args)
    for option, value in (("--samples", args.samples), ("--seq-len", args.seq_len)):
        if value < 1 or (option == "--seq-len" and value < 2):
            raise BudgetError(f"{option} {value} is invalid; use a positive number")
    settings = settings_from_args(args)
    quantized = run_quantize(
        console,
        args.model,
        settings,
        args.output,
        calib=args.calib,
        samples=args.samples,
        seq_len=args.seq_len,
        seed=args.seed,
        scores_path=args.scores,
        force=args.force,
    )
    console.print(summary_table(quantized, settings, f"quantized {args.model}"))
    return 0
