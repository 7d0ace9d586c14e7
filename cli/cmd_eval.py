"""`lieq-mlx eval`: perplexity of a model on consecutive windows of a text file."""

from __future__ import annotations

import time

from rich.table import Table

from lieq_mlx.data import WIKITEXT_HINT, consecutive_windows, read_text, tokenize
from lieq_mlx.errors import DataError
from lieq_mlx.models import load_model
from lieq_mlx.perplexity import evaluate_perplexity
from lieq_mlx_cli.console import progress_bar, progress_callback
from lieq_mlx_cli.options import add_model_option

NAME = "eval"
HELP = "perplexity on consecutive token windows of a text file (no BOS, whole text tokenized once)"


def add_arguments(parser) -> None:
    add_model_option(parser)
    parser.add_argument("--data", metavar="FILE", help="plain text file to score, e.g. WikiText-2 test (required)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per window (default: 512)")
    parser.add_argument("--windows", type=int, default=None, help="score the first N windows (default: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")


def run(args, console) -> int:
    if not args.data:
        raise DataError(f"--data is required: {WIKITEXT_HINT}")
    for option, value in (("--batch-size", args.batch_size), ("--windows", args.windows)):
        if value is not None and value < 1:
            raise DataError(f"{option} {value} is invalid; pass a positive number")
    text = read_text(args.data)

    start = time.perf_counter()
    with console.status(f"loading {args.model}"):
        model, tokenizer = load_model(args.model)
    load_seconds = time.perf_counter() - start

    tokens = tokenize(tokenizer, text)
    windows = consecutive_windows(tokens, args.seq_len, args.windows, source=str(args.data))
    with progress_bar(console) as progress:
        result = evaluate_perplexity(
            model, windows, batch_size=args.batch_size, progress=progress_callback(progress, "scoring windows")
        )

    table = Table(title=f"perplexity of {args.model}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("perplexity", f"{result.perplexity:.3f} ± {result.standard_error:.3f} (1 standard error)")
    table.add_row("windows", f"{result.windows} of {args.seq_len} tokens")
    table.add_row("tokens scored", f"{result.tokens_scored:,}")
    table.add_row("speed", f"{result.tokens_per_second:,.0f} tokens/s (prefill, all window tokens)")
    table.add_row("load time", f"{load_seconds:.1f} s")
    console.print(table)
    print(f"perplexity {result.perplexity:.4f} +/- {result.standard_error:.4f}")
    return 0
