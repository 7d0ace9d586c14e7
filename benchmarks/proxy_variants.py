"""Measure every variant of the layer-importance proxy against layer-drop saliency.

Saliency (perplexity increase with each decoder layer skipped) is computed once on the
first windows of a test text and cached as JSON. Each variant of the proxy is then scored
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

from lieq_mlx.analysis import AnalysisOptions, analyze, collect_spectra, random_model
from lieq_mlx.analysis.model_parts import PROJECTIONS
from lieq_mlx.analysis.saliency import SaliencyResult, layer_drop_saliency, spearman
from lieq_mlx.analysis.scores import PROJECTION_SETS, REFERENCES
from lieq_mlx.data import consecutive_windows, read_text, sample_windows, tokenize
from lieq_mlx.models import load_model

SETS = {**PROJECTION_SETS, **{name: (name,) for name in PROJECTIONS}}


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


def variant_grid(top_ks: list[int]) -> list[dict]:
    """List every variant: reference x normalize x measure (rank, energy at each k)."""
    variants = []
    for reference in REFERENCES:
        for normalize in (False, True):
            measures = [("rank", top_ks[0])] + [("energy", k) for k in top_ks]
            for measure, top_k in measures:
                variants.append({"reference": reference, "normalize": normalize, "measure": measure, "top_k": top_k})
    return variants


def study_variants(spectra, saliency: SaliencyResult, top_ks: list[int]) -> list[dict]:
    """Score every variant and projection set from one `Spectra`; return one row per pair."""
    rows = []
    for variant in variant_grid(top_ks):
        for set_name, projections in SETS.items():
            options = AnalysisOptions(projections=projections, **variant)
            scores = [layer.score for layer in spectra.score_layers(options)]
            rows.append({**variant, "projections": set_name, "spearman": spearman(scores, saliency.increase), "scores": scores})
    return rows


def random_vs_random(model, windows, seeds: tuple[int, int]) -> dict:
    """Score a random model against another random model, per reference; shifts should be near 0."""
    subject = random_model(model, seeds[0])
    reference = random_model(model, seeds[1])
    record = {}
    for name in ("trained-inputs", "random-model"):
        for normalize in (False, True):
            options = AnalysisOptions(reference=name, normalize=normalize, measure="rank")
            result = analyze(subject, windows, options, reference=reference)
            shifts = [stats.shift for layer in result.layers for stats in layer.projections.values()]
            gains = [stats.energy_gain for layer in result.layers for stats in layer.projections.values()]
            key = f"{name}, {'normalized' if normalize else 'raw'}"
            record[key] = {
                "mean_shift": sum(shifts) / len(shifts),
                "max_abs_shift": max(abs(value) for value in shifts),
                "mean_energy_gain": sum(gains) / len(gains),
                "max_abs_energy_gain": max(abs(value) for value in gains),
                "layer_scores": result.scores,
            }
    return record


def seed_stability(model, tokens, args, saliency: SaliencyResult, seeds: list[int]) -> list[dict]:
    """Spearman of the leading variants for other calibration seeds (other windows and random model)."""
    candidates = {
        "none, normalized, energy k=8, mlp": AnalysisOptions(reference="none", normalize=True, measure="energy", top_k=8, projections=SETS["mlp"]),
        "none, normalized, energy k=8, all": AnalysisOptions(reference="none", normalize=True, measure="energy", top_k=8, projections=SETS["all"]),
        "random-model, normalized, energy k=8, all": AnalysisOptions(reference="random-model", normalize=True, measure="energy", top_k=8, projections=SETS["all"]),
        "random-model, normalized, rank, all": AnalysisOptions(reference="random-model", normalize=True, measure="rank", projections=SETS["all"]),
    }
    rows = []
    for seed in seeds:
        windows = sample_windows(tokens, args.calib_seq_len, args.samples, seed, source=str(args.calib))
        spectra = collect_spectra(model, windows, references=("random-model",), normalize=(True,), seed=seed)
        for name, options in candidates.items():
            scores = [layer.score for layer in spectra.score_layers(options)]
            rows.append({"seed": seed, "variant": name, "spearman": spearman(scores, saliency.increase)})
            print(f"seed {seed}: {name}: Spearman {rows[-1]['spearman']:+.3f}")
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Lay the Spearman values out as one row per variant and one column per projection set."""
    header = "| reference | normalize | measure | " + " | ".join(SETS) + " |"
    lines = [header, "|" + " --- |" * (3 + len(SETS))]
    for variant in variant_grid(sorted({row["top_k"] for row in rows if row["measure"] == "energy"})):
        cells = [row for row in rows if all(row[key] == value for key, value in variant.items())]
        measure = "rank" if variant["measure"] == "rank" else f"energy k={variant['top_k']}"
        values = " | ".join(f"{row['spearman']:+.2f}" for row in cells)
        lines.append(f"| {variant['reference']} | {'yes' if variant['normalize'] else 'no'} | {measure} | {values} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", type=Path, required=True, help="text for saliency (perplexity)")
    parser.add_argument("--windows", type=int, default=8, help="saliency windows (default 8)")
    parser.add_argument("--seq-len", type=int, default=512, help="saliency window length in tokens")
    parser.add_argument("--saliency-cache", type=Path, required=True, help="JSON file to read or write")
    parser.add_argument("--saliency-only", action="store_true", help="stop after the saliency")
    parser.add_argument("--calib", type=Path, help="calibration text for the proxy")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows (default 8)")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of windows and random reference")
    parser.add_argument("--top-k", type=int, nargs="+", default=[8, 32], help="k values of the energy measure")
    parser.add_argument("--stability-seeds", type=int, nargs="*", default=[],
                        help="also score the leading variants with these calibration seeds")
    parser.add_argument("--stability-only", action="store_true", help="skip the full variant grid")
    parser.add_argument("--out", type=Path, help="JSON file for every variant's Spearman and scores")
    args = parser.parse_args(argv)

    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    saliency = load_or_compute_saliency(model, tokenizer, args.data, args.windows, args.seq_len, args.saliency_cache)
    print(f"saliency: base perplexity {saliency.base_perplexity:.3f}, {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.saliency_only:
        return 0
    if args.calib is None or args.out is None:
        parser.error("--calib and --out are needed unless --saliency-only is given")

    tokens = tokenize(tokenizer, read_text(args.calib))
    if args.stability_only:
        rows = seed_stability(model, tokens, args, saliency, args.stability_seeds)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"calibration": {"source": args.calib.name, "samples": args.samples,
                                                        "seq_len": args.calib_seq_len}, "stability": rows}, indent=1) + "\n")
        return 0
    windows = sample_windows(tokens, args.calib_seq_len, args.samples, args.seed, source=str(args.calib))
    start = time.perf_counter()
    spectra = collect_spectra(
        model, windows, references=("trained-inputs", "random-model"), normalize=(False, True), seed=args.seed
    )
    print(f"spectra of every variant: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    rows = study_variants(spectra, saliency, args.top_k)
    start = time.perf_counter()
    baseline = random_vs_random(model, windows, (args.seed + 1, args.seed + 2))
    print(f"random vs random: {time.perf_counter() - start:.1f} s", file=sys.stderr)

    best = max(rows, key=lambda row: row["spearman"])
    record = {
        "calibration": {"source": args.calib.name, "samples": args.samples, "seq_len": args.calib_seq_len, "seed": args.seed},
        "saliency": saliency.to_dict(),
        "variants": rows,
        "best": {key: value for key, value in best.items() if key != "scores"},
        "random_vs_random": baseline,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(markdown_table(rows))
    print(f"\nbest: {record['best']}")
    for key, value in baseline.items():
        print(f"random vs random ({key}): mean dr {value['mean_shift']:+.4f}, max |dr| {value['max_abs_shift']:.4f}, "
              f"mean energy gain {value['mean_energy_gain']:+.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
