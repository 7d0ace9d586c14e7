"""Measure every variant of the layer-importance proxy against layer-drop saliency.

Saliency (perplexity increase with each decoder layer skipped) is computed once on the
first windows of a test text and cached as JSON; each variant of the proxy is then scored
on calibration text and compared with it by Spearman rank correlation.

    python benchmarks/proxy_variants.py --data wiki.test.raw --calib valid.txt \
        --saliency-cache docs/data/saliency_demo.json --out docs/data/proxy_variants.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from lieq_mlx.analysis.saliency import SaliencyResult, layer_drop_saliency
from lieq_mlx.data import consecutive_windows, read_text, tokenize
from lieq_mlx.models import load_model


def load_or_compute_saliency(model, tokenizer, data: Path, windows: int, seq_len: int, cache: Path) -> SaliencyResult:
    """Read the cached saliency from `cache`, or compute and write it when missing."""
    if cache.is_file():
        return SaliencyResult.from_dict(json.loads(cache.read_text())["saliency"])
    tokens = tokenize(tokenizer, read_text(data))
    batch = consecutive_windows(tokens, seq_len, windows, source=str(data))

    def report(done: int, total: int) -> None:
        print(f"\rsaliency: {done}/{total} passes", end="", file=sys.stderr, flush=True)

    result = layer_drop_saliency(model, batch, progress=report, source=data.name)
    print(file=sys.stderr)
    cache.parent.mkdir(parents=True, exist_ok=True)
    record = {"model": "demo", "data": data.name, "windows": "first consecutive", "saliency": result.to_dict()}
    cache.write_text(json.dumps(record, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", type=Path, required=True, help="text for saliency (perplexity)")
    parser.add_argument("--windows", type=int, default=8, help="saliency windows (default 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="saliency window length in tokens")
    parser.add_argument("--saliency-cache", type=Path, required=True, help="JSON file to read or write")
    parser.add_argument("--saliency-only", action="store_true", help="stop after the saliency")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    saliency = load_or_compute_saliency(model, tokenizer, args.data, args.windows, args.seq_len, args.saliency_cache)
    print(f"saliency: base perplexity {saliency.base_perplexity:.3f}, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.saliency_only:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
