"""Time the analysis of a model at the default settings of `lieq-mlx analyze`.

Reports the seconds spent building the random reference, in forward passes and in
decompositions, and times `eigvalsh` on the smaller Gram matrix against `svd` once for
each output shape of the demo model's projections.

    python benchmarks/analysis_time.py --calib valid.txt [--model demo] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx

from lieq_mlx.analysis import AnalysisOptions, analyze
from lieq_mlx.analysis.spectrum import energy_fractions
from lieq_mlx.data import read_text, sample_windows, tokenize
from lieq_mlx.models import load_model
from lieq_mlx.platform import blas_in_use, device_name
from lieq_mlx_cli.cmd_analyze import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN


def time_decompositions(tokens: int, widths: list[int], repeats: int) -> list[tuple[int, float, float]]:
    """Return (out_features, eigvalsh seconds, svd seconds) for random Z of each width (best of `repeats`)."""
    rows = []
    for width in widths:
        z = mx.random.normal((tokens, width), key=mx.random.key(width))  # (tokens, out_features)
        mx.eval(z)
        best = {}
        for method in ("eigvalsh", "svd"):
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                energy_fractions(z, method)
                times.append(time.perf_counter() - start)
            best[method] = min(times)
        rows.append((width, best["eigvalsh"], best["svd"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--calib", type=Path, required=True, help="calibration text")
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    parser.add_argument("--repeats", type=int, default=2, help="analysis runs; the fastest is reported")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    tokens = tokenize(tokenizer, read_text(args.calib))
    windows = sample_windows(tokens, args.seq_len, args.samples, seed=0, source=str(args.calib))
    options = AnalysisOptions()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, device {device_name()}, BLAS {blas_in_use()}, "
          f"mlx {mx.__version__}, load average {os.getloadavg()[0]:.1f}")
    print(f"model {args.model}, {args.samples} windows x {args.seq_len} tokens, options {options.to_dict()}")
    runs = []
    for repeat in range(args.repeats):
        cpu_start = time.process_time()
        result = analyze(model, windows, options)
        timings = result.timings
        runs.append(timings)
        print(f"run {repeat + 1}: total {timings.total_seconds:.1f} s = reference {timings.reference_seconds:.1f} s "
              f"+ forward {timings.forward_seconds:.1f} s + decompositions {timings.decomposition_seconds:.1f} s "
              f"(process CPU time {time.process_time() - cpu_start:.1f} s)")
    best = min(runs, key=lambda t: t.total_seconds)
    print(f"fastest: {best.total_seconds:.1f} s (wall clock)")

    widths = sorted({layer.weight.shape[0] for layer in (model.layers[0].self_attn.q_proj, model.layers[0].self_attn.k_proj,
                                                          model.layers[0].mlp.gate_proj)})
    print(f"decomposition of one Z ({windows.size} tokens x out_features), best of 3:")
    for width, eig_seconds, svd_seconds in time_decompositions(windows.size, widths, repeats=3):
        print(f"  out_features {width:>5}: eigvalsh of Gram {eig_seconds * 1000:8.1f} ms, svd {svd_seconds * 1000:8.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
