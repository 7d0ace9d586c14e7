"""`lieq-mlx bench`: prefill and generation tokens per second, next to the decode bound."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from lieq_mlx.bench import BenchSettings, ModelBench, bench_model, bench_report, memory_bandwidth
from lieq_mlx.bench.measure import DEFAULT_GENERATION_TOKENS, DEFAULT_PROMPT_TOKENS, DEFAULT_TRIALS
from lieq_mlx.bench.report import percent_of_bound, ratios_to
from lieq_mlx.errors import LieqError
from lieq_mlx.models import resolve_model
from lieq_mlx.platform import metal_available
from lieq_mlx_cli.console import progress_bar

NAME = "bench"
HELP = "tokens per second of prefill and generation, peak memory and bits, for one or more models"
TABLE_WIDTH = 160


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid count {text!r}; pass a whole number of at least 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid count {value}; pass a whole number of at least 1")
    return value


def add_arguments(parser) -> None:
    parser.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        help="'demo', a model folder, a .gguf file or a Hugging Face repo id; ratios are to the first",
    )
    parser.add_argument(
        "-p", "--prompt-tokens", type=positive_int, default=DEFAULT_PROMPT_TOKENS,
        help=f"random prompt length in tokens (default: {DEFAULT_PROMPT_TOKENS})",
    )
    parser.add_argument(
        "-g", "--generation-tokens", type=positive_int, default=DEFAULT_GENERATION_TOKENS,
        help=f"tokens to generate per trial, EOS ignored (default: {DEFAULT_GENERATION_TOKENS})",
    )
    parser.add_argument(
        "-n", "--trials", type=positive_int, default=DEFAULT_TRIALS,
        help=f"timed trials per model after one warm-up (default: {DEFAULT_TRIALS})",
    )
    parser.add_argument("--json", metavar="FILE", help="also write every raw trial and the machine info to FILE")
    parser.add_argument(
        "--kernels", action="store_true",
        help="time lieq-mlx's 1- and 2-bit Metal kernels against mx.quantized_matmul per layer (Metal only)",
    )


def _spread_text(median: float, low: float, high: float) -> str:
    return f"{median:,.1f} [{low:,.1f}-{high:,.1f}]"


def results_table(results: list[ModelBench], bandwidth, settings: BenchSettings) -> Table:
    """Build the summary table: one row per model, ratios to the first model."""
    table = Table(
        title=escape(
            f"tokens per second, prompt {settings.prompt_tokens} tokens, {settings.generation_tokens} "
            f"generated, median [min-max] of {settings.trials} trials after 1 warm-up; "
            "bits nom/eff: nominal and effective bits per weight"
        ),
    )
    columns = (
        "model", "load s", "prefill tok/s", "gen tok/s", "% bound",
        "peak GB", "disk MB", "bits nom/eff", "vs first: prefill, gen, disk",
    )
    for column in columns:
        table.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for result in results:
        ratios = ratios_to(result, results[0])
        table.add_row(
            escape(result.spec),
            f"{result.load_seconds:.1f}",
            escape(_spread_text(result.prefill.median, result.prefill.min, result.prefill.max)),
            escape(_spread_text(result.generation.median, result.generation.min, result.generation.max)),
            f"{percent_of_bound(result, bandwidth):.0f}%",
            f"{result.peak_memory_bytes / 1e9:.2f}",
            f"{result.size_on_disk_bytes / 1e6:,.1f}",
            f"{result.bits.nominal_bits:.2f}/{result.bits.effective_bits:.2f}",
            f"{ratios['prefill_tokens_per_second']:.2f}, {ratios['generation_tokens_per_second']:.2f}, "
            f"{ratios['size_on_disk']:.2f}",
        )
    return table


def print_notes(console, results: list[ModelBench], bandwidth) -> None:
    console.print(
        f"decode bound = {bandwidth.gigabytes_per_second:.1f} GB/s ({bandwidth.source}: {bandwidth.detail}) "
        "/ bytes read per generated token, counted from the arrays in memory (float32 on the CPU): "
        "decoder layers, norms, output head, one embedding row and the KV cache at the mean context"
    )
    def bits_origin(source: str) -> str:
        return source if source.startswith("computed") else f"from {source}"

    for result in results:
        traffic = result.traffic
        console.print(
            f"  {escape(result.spec)}: {traffic.total_bytes / 1e6:,.1f} MB per token "
            f"({traffic.weight_bytes / 1e6:,.1f} MB weights + {traffic.kv_cache_bytes / 1e6:,.2f} MB KV cache "
            f"at {traffic.mean_context:.1f} tokens); bits {bits_origin(result.bits.source)}"
        )
    console.print(
        "nominal bits: parameter-weighted mean width of the decoder layers' linear weights, stored dtype "
        "for unquantized ones; effective bits: all stored bits / parameters (mlx_lm compute_bits_per_weight); "
        "peak memory: MLX peak allocation, weights included; size on disk: *.safetensors files"
    )


def write_json(path: Path, record: dict) -> None:
    """Write `record` to `path` through a temporary file, so that no half-written file remains."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


def print_kernel_timings(console, spec: str) -> None:
    from lieq_mlx.bench.kernels import compare_layer_kernels
    from lieq_mlx.models import load_model

    model, _ = load_model(spec)
    timings = compare_layer_kernels(model)
    if not timings:
        console.print(f"{escape(spec)}: no 1- or 2-bit decoder layers, so no custom kernel runs")
        return
    table = Table(title=f"{escape(spec)}: custom Metal kernels against mx.quantized_matmul, one input row, median of 50 calls")
    for column in ("layer", "operation", "bits", "kernel µs", "mx.quantized_matmul µs", "speed-up"):
        table.add_column(column, justify="right")
    for timing in timings:
        table.add_row(
            str(timing.layer), timing.operation, str(timing.bits), f"{timing.kernel_us:.1f}",
            f"{timing.reference_us:.1f}", f"{timing.reference_us / timing.kernel_us:.2f}x",
        )
    console.print(table)


def run(args, console) -> int:
    if args.kernels and not metal_available():
        raise LieqError("--kernels needs Metal (an Apple Silicon GPU) and MLX runs on the CPU here; run without --kernels")
    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise LieqError(f"folder {json_path.parent} for --json does not exist; create it or pass another path")
    for spec in args.models:
        resolve_model(spec)

    settings = BenchSettings(args.prompt_tokens, args.generation_tokens, args.trials)
    results = []
    with progress_bar(console) as progress:
        task = progress.add_task("measuring memory bandwidth", total=None)
        bandwidth = memory_bandwidth()
        steps_per_model = settings.trials + 2
        progress.update(task, total=len(args.models) * steps_per_model, completed=0)
        for spec in args.models:

            def on_step(description: str, spec: str = spec) -> None:
                progress.update(task, description=f"{spec}: {description}")
                if description != "loading":
                    progress.advance(task)

            results.append(bench_model(spec, settings, on_step))
            progress.advance(task)

    if not console.is_terminal:
        # Rich wraps at 80 columns when the output is not a terminal; the table needs more.
        console.width = TABLE_WIDTH
    console.print(results_table(results, bandwidth, settings))
    print_notes(console, results, bandwidth)
    if json_path is not None:
        write_json(json_path, bench_report(results, settings, bandwidth))
        console.print(f"wrote {json_path}")
    if args.kernels:
        for spec in args.models:
            print_kernel_timings(console, spec)
    return 0
