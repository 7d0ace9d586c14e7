"""`lieq-mlx demo`: the main job in one command on the demo model.

Imports SmolLM2-135M-Instruct from its GGUF, scores its layers, quantizes it under a
default budget, answers one chat prompt with the quantized model and prints a summary.
"""

from __future__ import annotations

import time
from pathlib import Path

from mlx_lm import generate
from rich.table import Table

from lieq_mlx.data import consecutive_windows, read_text, tokenize
from lieq_mlx.models import cache_dir, resolve_model
from lieq_mlx.perplexity import evaluate_perplexity
from lieq_mlx.pipeline import QuantizeSettings
from lieq_mlx_cli.console import bit_strip, progress_bar, progress_callback
from lieq_mlx_cli.cmd_quantize import parse_widths
from lieq_mlx_cli.quantize_flow import describe_settings, run_quantize

NAME = "demo"
HELP = "import the demo model, analyze it, quantize it, chat once with the result and summarize"
DEFAULT_PROMPT = "What is the capital of France?"
# The product's own defaults: 3 nominal bits over widths 1 to 4. SmolLM2-135M still answers
# simple chat prompts there, at about 2.1 times the imported model's perplexity
# (docs/benchmarks.md). Below 3 bits perplexity climbs fast: 5.6 times at 2.5 bits.
DEFAULT_TARGET_BITS = 3.0
DEFAULT_WIDTHS = "1,2,3,4"


def add_arguments(parser) -> None:
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="DIR",
                        help="where to write the quantized model (default: the cache folder; replaced on every run)")
    parser.add_argument("--target-bits", type=float, default=DEFAULT_TARGET_BITS,
                        help=f"nominal bits per decoder-layer weight (default: {DEFAULT_TARGET_BITS})")
    parser.add_argument("--bits", default=DEFAULT_WIDTHS, metavar="W,W",
                        help=f"candidate widths per layer (default: {DEFAULT_WIDTHS})")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="chat prompt for the quantized model")
    parser.add_argument("--calib", type=Path, metavar="FILE", help="calibration text (default: text sampled from the model)")
    parser.add_argument("--data", type=Path, metavar="FILE", help="text to score perplexity on, e.g. WikiText-2 test")
    parser.add_argument("--windows", type=int, default=5, help="perplexity windows of 512 tokens when --data is given (default: 5)")


def chat_once(model, tokenizer, prompt: str, max_tokens: int = 64) -> str:
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(model, tokenizer, text, max_tokens=max_tokens).strip()


def perplexity_of(console, model, tokenizer, data: Path, windows: int) -> float:
    from mlx_lm.utils import dequantize_model

    tokens = tokenize(tokenizer, read_text(data))
    batch = consecutive_windows(tokens, 512, windows, source=str(data))
    # Dequantized float32 weights hold the same values and score about 25 times faster on the CPU.
    dequantize_model(model)
    with progress_bar(console) as progress:
        return evaluate_perplexity(model, batch, progress=progress_callback(progress, "perplexity")).perplexity


def run(args, console) -> int:
    start = time.perf_counter()
    with console.status("importing the demo model (first run only)"):
        source = resolve_model("demo")
    import_seconds = time.perf_counter() - start

    output = args.output or cache_dir() / "models" / "SmolLM2-135M-Instruct-lieq"
    settings = QuantizeSettings(
        target_bits=args.target_bits, count="nominal", policy="lieq", widths=parse_widths(args.bits)
    )
    quantized = run_quantize(console, "demo", settings, output, calib=args.calib, force=args.output is None)

    start = time.perf_counter()
    with console.status("chatting with the quantized model"):
        reply = chat_once(quantized.model, quantized.tokenizer, args.prompt)
    chat_seconds = time.perf_counter() - start

    perplexity = None
    if args.data:
        perplexity = perplexity_of(console, quantized.model, quantized.tokenizer, args.data, args.windows)

    result = quantized.result
    table = Table(title="lieq-mlx demo: SmolLM2-135M-Instruct", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("source", str(source))
    table.add_row("settings", describe_settings(settings))
    table.add_row("bits per layer", bit_strip(result.allocation))
    table.add_row("nominal bits", f"{result.nominal_bits:.3f} (decoder-layer weights, no scales)")
    table.add_row("effective bits", f"{result.effective_bits:.3f} (every stored bit / every parameter)")
    table.add_row("size on disk", f"{quantized.size_bytes / 2**20:.1f} MiB")
    if perplexity is not None:
        table.add_row("perplexity", f"{perplexity:.2f} (first {args.windows} windows of 512 tokens of {args.data.name})")
    steps = {"import": import_seconds, **quantized.seconds, "chat": chat_seconds}
    table.add_row("time", ", ".join(f"{name} {value:.1f} s" for name, value in steps.items()))
    table.add_row("output", str(quantized.output))
    table.add_row("prompt", args.prompt)
    table.add_row("reply", reply)
    console.print(table)
    print(reply)
    return 0
