"""Prefill tokens per second of one model with and without a preloaded system OpenBLAS.

MLX's Linux CPU wheel calls the reference BLAS for float32 matrix products. This script
runs the same timed prefill in two child processes, one with `LD_PRELOAD` set to the
system OpenBLAS and one without, and prints both rates and their ratio (Linux only).

    python benchmarks/openblas_prefill.py --model demo --prompt-tokens 128 --trials 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD_FLAG = "--child"


def measure_in_this_process(model_spec: str, prompt_tokens: int, trials: int) -> dict:
    """Time one warm-up and `trials` prefills of a random prompt; return rates and the BLAS."""
    from lieq_mlx.bench.measure import random_prompt, run_trial
    from lieq_mlx.models import load_model
    from lieq_mlx.platform import blas_in_use

    model, _ = load_model(model_spec)
    prompt = random_prompt(model, prompt_tokens)
    run_trial(model, prompt, generation_tokens=1)
    rates = [run_trial(model, prompt, generation_tokens=1)[0].prefill_tokens_per_second for _ in range(trials)]
    return {"blas": blas_in_use(), "prefill_tokens_per_second": rates}


def run_child(model_spec: str, prompt_tokens: int, trials: int, preload: str | None) -> dict:
    """Run the measurement in a child process with or without `preload` in LD_PRELOAD."""
    from lieq_mlx.platform import NO_OPENBLAS_ENV

    env = dict(os.environ)
    env.pop("LD_PRELOAD", None)
    env[NO_OPENBLAS_ENV] = "1"
    if preload:
        env["LD_PRELOAD"] = preload
    command = [sys.executable, __file__, CHILD_FLAG, "--model", model_spec,
               "--prompt-tokens", str(prompt_tokens), "--trials", str(trials)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"child process failed ({result.returncode}): {result.stderr.strip()}")
    return json.loads(result.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model spec, as for lieq-mlx (default: demo)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="random prompt length (default: 128)")
    parser.add_argument("--trials", type=int, default=3, help="timed prefills after one warm-up (default: 3)")
    parser.add_argument(CHILD_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(json.dumps(measure_in_this_process(args.model, args.prompt_tokens, args.trials)))
        return 0

    from statistics import median

    from lieq_mlx.platform import find_openblas

    library = find_openblas()
    if library is None:
        raise SystemExit("no system OpenBLAS found; install libopenblas0-pthread (Debian, Ubuntu)")
    runs = {
        "with OpenBLAS": run_child(args.model, args.prompt_tokens, args.trials, library),
        "without": run_child(args.model, args.prompt_tokens, args.trials, None),
    }
    for label, run in runs.items():
        rates = run["prefill_tokens_per_second"]
        print(f"{label:>14}: BLAS {run['blas']:<9} prefill {median(rates):8.1f} tokens/s "
              f"(median of {len(rates)}; min {min(rates):.1f}, max {max(rates):.1f})")
    speedup = median(runs["with OpenBLAS"]["prefill_tokens_per_second"]) / median(
        runs["without"]["prefill_tokens_per_second"]
    )
    print(f"{'ratio':>14}: {speedup:.1f}x ({args.prompt_tokens}-token random prompt, model {args.model})")
    print(json.dumps({"preload": library, "prompt_tokens": args.prompt_tokens, **runs}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
