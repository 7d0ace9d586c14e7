"""`lieq-mlx analyze`: score every decoder layer with the geometry proxy.

Reads calibration text, runs it through the model once, and prints a table of per-layer
scores and a bar chart. Options check the scores against layer-drop saliency (perplexity
with each layer skipped), write them as JSON for `quantize --scores`, and plot them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.panel import Panel
from rich.table import Table

from lieq_mlx.errors import DataError, LieqError

NAME = "analyze"
HELP = "score decoder layers with the geometry proxy (which layers keep more bits)"

DEFAULT_SAMPLES = 8
DEFAULT_SEQ_LEN = 256
SHORT_NAMES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from lieq_mlx.analysis.scores import AnalysisOptions, MEASURES, REFERENCES

    from lieq_mlx_cli.options import add_model_option

    defaults = AnalysisOptions()
    add_model_option(parser)
    group = parser.add_argument_group("calibration")
    group.add_argument("--calib", type=Path, metavar="FILE", help="calibration text, plain UTF-8 (required)")
    group.add_argument("--samples", type=int, default=DEFAULT_SAMPLES, metavar="N", help=f"calibration windows (default {DEFAULT_SAMPLES})")
    group.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN, metavar="L", help=f"tokens per calibration window (default {DEFAULT_SEQ_LEN})")
    group.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the window positions and of the random reference model (default 0)")

    group = parser.add_argument_group("proxy variant")
    group.add_argument("--reference", choices=REFERENCES, default=defaults.reference,
                       help="untrained reference: random weights on the trained inputs, a whole random model "
                            f"on the same tokens, or none (default {defaults.reference})")
    group.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=defaults.normalize,
                       help="centre the projection outputs over tokens and scale each row to unit norm "
                            f"(default {'on' if defaults.normalize else 'off'})")
    group.add_argument("--measure", choices=MEASURES, default=defaults.measure,
                       help="effective rank or top-k energy of the projection outputs, compared with the reference "
                            f"when there is one (default {defaults.measure})")
    group.add_argument("--top-k", type=int, default=defaults.top_k, metavar="K", help=f"directions counted by the energy measure (default {defaults.top_k})")
    group.add_argument("--projections", default=None, metavar="SET",
                       help="projections averaged into a layer score: all, qkv, attention, mlp or names such as "
                            f"q_proj,o_proj (default {','.join(defaults.projections)})")
    group.add_argument("--decomposition", choices=("eigvalsh", "svd"), default=defaults.decomposition,
                       help=f"how singular values are computed (default {defaults.decomposition})")

    group = parser.add_argument_group("saliency check")
    group.add_argument("--saliency", action="store_true", help="measure the perplexity increase of skipping each layer and its Spearman correlation with the scores")
    group.add_argument("--data", type=Path, metavar="FILE", help="text scored for saliency (plain UTF-8)")
    group.add_argument("--windows", type=int, default=5, metavar="N", help="consecutive saliency windows from the start of --data (default 5)")
    group.add_argument("--saliency-seq-len", type=int, default=512, metavar="L", help="tokens per saliency window (default 512)")
    group.add_argument("--saliency-from", type=Path, metavar="FILE",
                       help="reuse the saliency stored in a JSON file (a scores file written with --saliency, "
                            "or a saliency cache of benchmarks/proxy_variants.py) instead of measuring it")

    group = parser.add_argument_group("output")
    group.add_argument("--json", type=Path, metavar="FILE", help="write the scores as JSON (input of quantize --scores)")
    group.add_argument("--plot", type=Path, metavar="FILE.png", help="plot the scores (and saliency) to a PNG file; needs matplotlib")


def _options(args):
    from lieq_mlx.analysis.scores import AnalysisOptions, parse_projections

    defaults = AnalysisOptions()
    try:
        projections = defaults.projections if args.projections is None else parse_projections(args.projections)
        return AnalysisOptions(
            reference=args.reference,
            normalize=args.normalize,
            measure=args.measure,
            top_k=args.top_k,
            projections=projections,
            seed=args.seed,
            decomposition=args.decomposition,
        )
    except ValueError as error:
        raise LieqError(f"{error}") from None


def _check_arguments(args) -> None:
    if args.calib is None:
        raise DataError(
            "no calibration text; pass --calib FILE with a few thousand tokens of plain UTF-8 text, "
            "for example the validation split of WikiText-2 (wikitext-2-raw-v1 on the Hugging Face Hub)"
        )
    for option, value, least in (("--samples", args.samples, 1), ("--seq-len", args.seq_len, 2),
                                 ("--windows", args.windows, 1), ("--saliency-seq-len", args.saliency_seq_len, 2),
                                 ("--top-k", args.top_k, 1)):
        if value < least:
            raise LieqError(f"{option} {value} is invalid; use at least {least}")
    if args.saliency and args.saliency_from is not None:
        raise LieqError("--saliency measures saliency and --saliency-from reads it; pass only one of them")
    if args.saliency and args.data is None:
        raise DataError("--saliency needs --data FILE, the text whose perplexity is measured")
    if args.data is not None and not args.saliency:
        raise LieqError("--data is only read with --saliency; add --saliency or drop --data")
    if args.plot is not None:
        from lieq_mlx.analysis.plot import require_matplotlib

        if args.plot.suffix.lower() != ".png":
            raise LieqError(f"--plot {args.plot} is not a .png file name; pass a path ending in .png")

        require_matplotlib()


def run(args, console) -> int:
    from lieq_mlx.analysis import analyze, layer_drop_saliency, read_saliency, save_scores
    from lieq_mlx.data import consecutive_windows, read_text, sample_windows, tokenize
    from lieq_mlx.models import load_model
    from lieq_mlx_cli.console import progress_bar, progress_callback

    _check_arguments(args)
    options = _options(args)

    # Read the texts before loading the model so that a bad file fails at once.
    calib_text = read_text(args.calib)
    data_text = read_text(args.data) if args.saliency else None
    stored_saliency = read_saliency(args.saliency_from) if args.saliency_from is not None else None

    with console.status(f"loading model {args.model}"):
        model, tokenizer = load_model(args.model)
    if stored_saliency is not None and len(stored_saliency.skipped_perplexity) != len(model.layers):
        raise LieqError(
            f"--saliency-from {args.saliency_from} lists {len(stored_saliency.skipped_perplexity)} layers, "
            f"not the {len(model.layers)} of model {args.model}; measure it with --saliency --data FILE"
        )
    calib_tokens = tokenize(tokenizer, calib_text)
    windows = sample_windows(calib_tokens, args.seq_len, args.samples, args.seed, source=str(args.calib))
    saliency_windows = None
    if data_text is not None:
        data_tokens = tokenize(tokenizer, data_text)
        saliency_windows = consecutive_windows(data_tokens, args.saliency_seq_len, args.windows, source=str(args.data))

    calibration = {"source": args.calib.name, "samples": args.samples, "seq_len": args.seq_len, "seed": args.seed}
    with progress_bar(console) as progress:
        result = analyze(
            model,
            windows,
            options,
            progress=progress_callback(progress, "analysing decoder layers"),
            model_name=args.model,
            calibration=calibration,
        )
        if saliency_windows is not None:
            result.saliency = layer_drop_saliency(
                model,
                saliency_windows,
                progress=progress_callback(progress, "skipping each layer (perplexity passes)"),
                source=args.data.name,
            )

    if stored_saliency is not None:
        result.saliency = stored_saliency

    _print_table(console, result)
    _print_chart(console, result)
    _print_summary(console, result)

    if args.json is not None:
        path = save_scores(result, args.json)
        console.print(f"scores written to {path}")
    if args.plot is not None:
        from lieq_mlx.analysis.plot import plot_scores

        path = plot_scores(result, args.plot)
        console.print(f"plot written to {path}")
    return 0


def _describe(options) -> str:
    normalized = "rows centred and normalised" if options.normalize else "raw outputs"
    reference = {"trained-inputs": "random weights on trained inputs", "random-model": "whole random model",
                 "none": "no reference"}[options.reference]
    measure = "effective rank" if options.measure == "rank" else f"top-{options.top_k} energy"
    return f"{measure}, {reference}, {normalized}, projections {','.join(SHORT_NAMES[p] for p in options.projections)}"


def _print_table(console, result) -> None:
    options = result.options
    if options.reference == "none":
        per_projection = "1 - C/max_rank" if options.measure == "rank" else f"E_{options.top_k}"
    else:
        per_projection = "dr" if options.measure == "rank" else f"gain E_{options.top_k}"
    table = Table(title=f"layer scores: {_describe(options)}", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("score", justify="right", style="bold")
    names = list(result.layers[0].projections)
    for name in names:
        mark = "*" if name in options.projections else ""
        table.add_column(f"{per_projection} {SHORT_NAMES[name]}{mark}", justify="right")
    # With the rank measure, the energy gain is a second view; with energy it is the score.
    show_gain = options.reference != "none" and options.measure == "rank"
    if show_gain:
        table.add_column(f"mean gain E_{options.top_k}", justify="right")
    if result.saliency is not None:
        table.add_column("skip: ppl increase", justify="right")

    for layer in result.layers:
        row = [str(layer.index), f"{layer.score:.4f}"]
        row += [f"{layer.projections[name].score(options.measure):.2f}" for name in names]
        if show_gain:
            gains = [layer.projections[name].energy_gain for name in options.projections]
            row.append(f"{sum(gains) / len(gains):+.2f}")
        if result.saliency is not None:
            row.append(f"{result.saliency.increase[layer.index]:,.1f}")
        table.add_row(*row)
    table.caption = f"* averaged into the score; {_legend(options)}"
    console.print(table)


def _legend(options) -> str:
    outputs = "X W^T" + (" with rows centred and normalised" if options.normalize else "")
    if options.measure == "rank":
        if options.reference == "none":
            return f"C = effective rank of {outputs}, max_rank = min(tokens, out_features)"
        return f"dr = (C~ - C) / C~, C = effective rank of {outputs}, C~ of the reference"
    energy = f"E_{options.top_k} = energy fraction of the {options.top_k} largest singular values of {outputs}"
    if options.reference == "none":
        return energy
    return f"gain = E_{options.top_k} - E~_{options.top_k} of the reference; {energy}"


def _print_chart(console, result, width: int = 40) -> None:
    scores = result.scores
    low, high = min(scores), max(scores)
    span = high - low or 1.0
    console.print(f"score per layer (bar length from min {low:.4f} to max {high:.4f})")
    for index, score in enumerate(scores):
        cells = 1 + round((score - low) / span * (width - 1))
        console.print(f"{index:>4} {'█' * cells:<{width}} {score:.4f}")


def _print_summary(console, result) -> None:
    timings = result.timings
    lines = [
        f"calibration: {result.calibration['samples']} windows x {result.calibration['seq_len']} tokens "
        f"= {result.calibration['tokens']} tokens from {result.calibration.get('source', '?')}",
        f"time: {timings.forward_seconds:.1f} s forward passes, {timings.decomposition_seconds:.1f} s decompositions"
        + (f", {timings.reference_seconds:.1f} s drawing the random reference model" if timings.reference_seconds else ""),
    ]
    if result.saliency is not None:
        saliency = result.saliency
        lines.append(
            f"saliency: perplexity {saliency.base_perplexity:.2f} with all layers, on {saliency.windows} windows x "
            f"{saliency.seq_len} tokens of {saliency.source} ({saliency.seconds:.0f} s)"
        )
        lines.append(f"[bold]Spearman rank correlation of scores with saliency: {result.spearman:+.3f}[/bold]")
    console.print(Panel("\n".join(lines), title="analysis", expand=False))
