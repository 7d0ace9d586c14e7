"""Compare the perplexity of LieQ allocations with the usual baselines at equal bits.

Every lieq-mlx row comes from one candidate set per quantizer (AWQ-scaled GPTQ, the
product's default; GPTQ without scaling, an ablation; the clipping search), widths 1 to 4,
group 64: the chosen width's dequantized weights (and scaled norms) are swapped into the
float32 model, scored, and the original weights put back. The tied embedding of every
lieq-mlx row is the product's 6-bit embedding (clipping search, group 64), so the
effective bits count what a written folder stores. mlx-lm rows quantize a float16 copy
with mlx-lm's own code (recipes of `mlx_lm.convert`, `mlx_lm.quant.dynamic_quant`), count
bits per weight with `mlx_lm.utils.compute_bits_per_weight`, and are scored the same way
from their dequantized float32 weights.

Results go row by row into a JSON cache; a rerun skips the rows already there.

    python benchmarks/quality.py                # run the missing rows, then render
    python benchmarks/quality.py --fresh        # recompute every row
    python benchmarks/quality.py --render-only  # table and plot from the JSON
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import platform
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_JSON = REPO / "docs" / "data" / "quality.json"
DEFAULT_PLOT = REPO / "docs" / "quality.png"
DEFAULT_DOC = REPO / "docs" / "benchmarks.md"
TABLE_START = "<!-- quality-table:start -->"
TABLE_END = "<!-- quality-table:end -->"

GROUP_SIZE = 64
EMBED_GROUP_SIZE = 64
BUDGETS = (2.25, 2.5, 3.0)  # nominal bits of the decoder-layer linear weights
SEEDS = (0, 1, 2)
GPTQ_WIDTHS = (1, 2, 3, 4)
CLIP_WIDTHS = (2, 3, 4)
# Bits of the mlx-lm recipes (low, high), from `mlx_lm.convert.mixed_quant_predicate_builder`.
RECIPES = {"mixed_2_6": (2, 6), "mixed_3_4": (3, 4), "mixed_3_6": (3, 6), "mixed_4_6": (4, 6)}
SCHEMA = "lieq-mlx-quality"


@dataclass(frozen=True)
class RowSpec:
    """One row of the benchmark: how its weights are made."""

    key: str
    kind: str  # full, rtn, clip, gptq, random, paper, lieq, equal, recipe, lieq-match, dynamic
    widths: tuple[int, ...] = ()
    budget: float | None = None  # nominal target bits
    seed: int | None = None
    recipe: str | None = None  # mlx-lm recipe run, or whose effective bits are matched
    low_high: tuple[int, int] | None = None  # dynamic quantization's two widths
    match_row: str | None = None  # row whose measured effective bits are matched
    embed_bits: int = 6  # width of the tied embedding in lieq-mlx rows
    quantizer: str = "gptq-awq"  # candidate set of lieq-mlx rows: gptq-awq, gptq (no scaling) or nearest


def _widths_tag(widths) -> str:
    return "".join(str(w) for w in widths)


def plan_rows(include_extra: bool = True) -> list[RowSpec]:
    """Return every row, most important first, so that a cut-short run keeps the core rows."""
    rows = [RowSpec("full", "full")]
    rows += [RowSpec(f"gptq-{b}", "gptq", (b,)) for b in (4, 3)]

    def lieq_set(kind: str, widths) -> list[RowSpec]:
        return [RowSpec(f"{kind}-w{_widths_tag(widths)}-b{b}", kind, widths, b) for b in BUDGETS]

    def random_set(widths, seeds) -> list[RowSpec]:
        return [
            RowSpec(f"random-w{_widths_tag(widths)}-b{b}-s{s}", "random", widths, b, seed=s)
            for s in seeds
            for b in BUDGETS
        ]

    def recipe_pair(recipe: str) -> list[RowSpec]:
        return [
            RowSpec(f"recipe-{recipe}", "recipe", recipe=recipe),
            RowSpec(f"lieq-match-{recipe}", "lieq-match", (1, 2, 3, 4), recipe=recipe),
        ]

    rows += lieq_set("lieq", (1, 2, 3, 4)) + random_set((1, 2, 3, 4), SEEDS[:1])
    rows += recipe_pair("mixed_2_6") + recipe_pair("mixed_3_4")
    rows.append(RowSpec("dynamic-34-match-mixed_3_4", "dynamic", recipe="mixed_3_4", low_high=(3, 4)))
    # mlx-lm's threshold search can land above its target, so LieQ also matches what it reached.
    rows.append(RowSpec("lieq-match-dynamic-34", "lieq-match", (1, 2, 3, 4), match_row="dynamic-34-match-mixed_3_4"))
    # The recipes store the embedding at their low width, so LieQ with a 4-bit embedding too.
    rows.append(RowSpec("lieq-match-mixed_3_4-e4", "lieq-match", (1, 2, 3, 4), recipe="mixed_3_4", embed_bits=4))
    rows.append(RowSpec("lieq-match-dynamic-34-e4", "lieq-match", (1, 2, 3, 4), match_row="dynamic-34-match-mixed_3_4",
                        embed_bits=4))
    rows += [RowSpec("rtn-3", "rtn", (3,)), RowSpec("clip-3", "clip", (3,))]
    rows += lieq_set("equal", (1, 2, 3, 4))
    rows += lieq_set("paper", (2, 4)) + random_set((2, 4), SEEDS[:1])
    rows += random_set((1, 2, 3, 4), SEEDS[1:])
    rows += [RowSpec("rtn-4", "rtn", (4,)), RowSpec("clip-4", "clip", (4,)), RowSpec("gptq-2", "gptq", (2,))]
    rows += lieq_set("lieq", (2, 3, 4)) + random_set((2, 3, 4), SEEDS[:1])
    rows += [RowSpec("rtn-2", "rtn", (2,)), RowSpec("clip-2", "clip", (2,))]
    # Ablation: the same GPTQ without activation scaling.
    rows += [RowSpec(f"gptq-{b}-noscale", "gptq", (b,), quantizer="gptq") for b in (4, 3)]
    rows += [RowSpec(f"lieq-w1234-b{b}-noscale", "lieq", (1, 2, 3, 4), b, quantizer="gptq") for b in BUDGETS]
    if include_extra:
        rows += recipe_pair("mixed_3_6") + recipe_pair("mixed_4_6")
        rows.append(RowSpec("dynamic-26-match-mixed_2_6", "dynamic", recipe="mixed_2_6", low_high=(2, 6)))
    rows += random_set((2, 4), SEEDS[1:]) + random_set((2, 3, 4), SEEDS[1:])
    return rows


def module_at(model: nn.Module, path: str) -> nn.Module:
    """Return the submodule at a dotted path such as `model.layers.3.mlp.down_proj`."""
    module = model
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def projection_path(index: int, name: str) -> str:
    parent = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{index}.{parent}.{name}"


class Bench:
    """The float32 model, its data and the lazily built inputs that rows share."""

    def __init__(self, model, tokenizer, eval_windows: mx.array, calibration: mx.array, meta: dict):
        from lieq_mlx.pipeline import DEFAULT_EMBED_BITS
        from lieq_mlx.quantize import build_accounting

        self.model = model
        self.tokenizer = tokenizer
        self.eval_windows = eval_windows
        self.calibration = calibration
        self.meta = meta  # JSON-ready facts shared by rows: scores, costs, recipe bits
        self.embed_bits = DEFAULT_EMBED_BITS
        self.accounting = build_accounting(model, GROUP_SIZE, self.embed_bits, EMBED_GROUP_SIZE)
        self.num_layers = len(self.accounting.layer_params)
        self._candidates: dict[str, object] = {}
        self._embed: dict[int, mx.array] = {}  # dequantized embedding by width
        self.work_dir: Path | None = None  # candidate sets kept between runs
        self.rows: dict[str, dict] = {}  # finished rows, for rows that match another's bits

    # Shared inputs, each built on first use.

    def candidate_file(self, quantizer: str) -> Path | None:
        """Return where candidates of `quantizer` are kept between runs (None: not kept)."""
        if self.work_dir is None:
            return None
        # NOTE: the file name encodes the calibration settings only, so a changed quantizer
        # reuses stale candidates until --fresh deletes them.
        calibration = self.meta.get("settings", {}).get("calibration", {})
        tag = "-".join(str(calibration.get(k)) for k in ("samples", "seq_len", "seed"))
        return self.work_dir / f"candidates-{quantizer}-{tag}.safetensors"

    def candidates(self, quantizer: str):
        """Return the candidate set of `quantizer` (gptq-awq and gptq: widths 1-4, nearest: 2-4)."""
        from lieq_mlx.quantize import quantize_candidates

        if quantizer not in self._candidates:
            rounding = "nearest" if quantizer == "nearest" else "gptq"
            widths = GPTQ_WIDTHS if rounding == "gptq" else CLIP_WIDTHS
            stored = self.candidate_file(quantizer)
            if stored is not None and stored.is_file():
                log(f"reading {quantizer} candidates from {stored}")
                self._candidates[quantizer] = read_candidates(stored, widths)
                return self._candidates[quantizer]
            log(f"quantizing {quantizer} candidates at widths {widths}")
            start = time.perf_counter()
            calibration = self.calibration if rounding == "gptq" else None
            found = quantize_candidates(self.model, widths, GROUP_SIZE, calibration, rounding=rounding,
                                        scaling=quantizer == "gptq-awq")
            seconds = time.perf_counter() - start
            self._candidates[quantizer] = found
            if stored is not None:
                write_candidates(stored, found)
            self.meta.setdefault("candidates", {})[quantizer] = {
                "widths": list(widths),
                "seconds": seconds,
                "output_error": None if found.output_error is None else found.output_error.tolist(),
            }
            log(f"{quantizer} candidates took {seconds:.0f} s")
        return self._candidates[quantizer]

    def embedding(self, bits: int | None = None) -> mx.array:
        """Return the embedding quantized as the product does (clipping search), dequantized to float32."""
        from lieq_mlx.quantizers import quantize_weight

        bits = bits or self.embed_bits
        if bits not in self._embed:
            original = self.model.model.embed_tokens.weight.astype(mx.float32)
            packed, scales, biases = quantize_weight(original, bits, EMBED_GROUP_SIZE, mx.float16)
            self._embed[bits] = mx.dequantize(packed, scales, biases, group_size=EMBED_GROUP_SIZE, bits=bits)
            mx.eval(self._embed[bits])
        return self._embed[bits]

    def accounting_for(self, embed_bits: int):
        """Return the bit accounting of the model with the embedding at `embed_bits`."""
        from lieq_mlx.quantize import build_accounting

        if embed_bits == self.embed_bits:
            return self.accounting
        return build_accounting(self.model, GROUP_SIZE, embed_bits, EMBED_GROUP_SIZE)

    def scores(self) -> list[float]:
        """Return the LieQ layer scores, timing the analysis on the calibration windows."""
        from lieq_mlx.analysis import AnalysisOptions, analyze

        if "scores" not in self.meta:
            log("analysing layers")
            start = time.perf_counter()
            result = analyze(self.model, self.calibration, AnalysisOptions())
            seconds = time.perf_counter() - start
            self.meta["scores"] = [float(s) for s in result.scores]
            costs = self.meta.setdefault("costs", {})
            costs["lieq_analyze_seconds"] = seconds
            costs["lieq_analyze_timings"] = asdict(result.timings)
        return self.meta["scores"]

    def sensitivities(self, low: int, high: int) -> dict[str, float]:
        """Return mlx-lm's dynamic-quantization sensitivities for (low, high) bits, timed."""
        from mlx_lm.quant.dynamic_quant import estimate_sensitivities

        key = f"sensitivities_{low}_{high}"
        if key not in self.meta:
            log(f"estimating mlx-lm sensitivities ({low}, {high} bits)")
            start = time.perf_counter()
            # The calibration windows are the data batch of mlx-lm's function, in float32.
            found = estimate_sensitivities(
                self.model, self.calibration, low, GROUP_SIZE, high, GROUP_SIZE, batch_size=4
            )
            seconds = time.perf_counter() - start
            self.meta[key] = dict(found)
            self.meta.setdefault("costs", {})[f"mlx_lm_sensitivities_{low}_{high}_seconds"] = seconds
        return self.meta[key]

    def recipe_model(self, recipe: str) -> nn.Module:
        """Return a float16 copy of the model quantized by an mlx-lm recipe."""
        from mlx_lm.convert import mixed_quant_predicate_builder
        from mlx_lm.utils import quantize_model

        copied = self.float16_copy()
        predicate = mixed_quant_predicate_builder(recipe, copied, GROUP_SIZE)
        low, _ = RECIPES[recipe]
        quantize_model(copied, {}, GROUP_SIZE, low, quant_predicate=predicate)
        return copied

    def recipe_bits(self, recipe: str) -> float:
        """Return the effective bits of an mlx-lm recipe on this model (cached in meta)."""
        from mlx_lm.utils import compute_bits_per_weight

        table = self.meta.setdefault("recipe_effective_bits", {})
        if recipe not in table:
            table[recipe] = float(compute_bits_per_weight(self.recipe_model(recipe)))
        return table[recipe]

    def float16_copy(self) -> nn.Module:
        """Return a float16 copy, so that mlx-lm stores float16 scales and norms as a converted folder does."""
        copied = copy.deepcopy(self.model)
        copied.set_dtype(mx.float16, predicate=lambda dtype: mx.issubdtype(dtype, mx.floating))
        return copied


def write_candidates(path: Path, candidates) -> None:
    """Write a candidate set's packed weights and output errors to one safetensors file."""
    arrays = {}
    for index, per_width in enumerate(candidates.weights):
        for bits, by_name in per_width.items():
            for name, quantized in by_name.items():
                for field in ("weight", "scales", "biases"):
                    arrays[f"{index}.{bits}.{name}.{field}"] = getattr(quantized, field)
    for index, scales in enumerate(candidates.scales):
        for producer, value in scales.items():
            arrays[f"scale.{index}.{producer}"] = value
    if candidates.output_error is not None:
        arrays["output_error"] = mx.array(candidates.output_error.astype(np.float32))
    path.parent.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path), arrays)


def read_candidates(path: Path, widths):
    """Read a candidate set that `write_candidates` wrote."""
    from lieq_mlx.analysis.model_parts import PROJECTIONS
    from lieq_mlx.quantize import LayerCandidates, QuantizedWeight

    arrays = mx.load(str(path))
    layers = 1 + max(int(key.split(".")[0]) for key in arrays if key[0].isdigit())
    candidates = LayerCandidates(widths=tuple(widths), group_size=GROUP_SIZE)
    for index in range(layers):
        per_width = {}
        for bits in widths:
            per_width[bits] = {
                name: QuantizedWeight(*(arrays[f"{index}.{bits}.{name}.{f}"] for f in ("weight", "scales", "biases")),
                                      bits, GROUP_SIZE)
                for name in PROJECTIONS
            }
        candidates.weights.append(per_width)
        prefix = f"scale.{index}."
        candidates.scales.append({key[len(prefix):]: value for key, value in arrays.items() if key.startswith(prefix)})
    if "output_error" in arrays:
        candidates.output_error = np.asarray(arrays["output_error"]).astype(np.float64)
    return candidates


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Building the weights of each row: {module path: float32 weight} plus the row's facts.


def allocation_weights(bench: Bench, quantizer: str, allocation, embed_bits: int = 6) -> dict[str, mx.array]:
    """Return the dequantized float32 weights of an allocation, the quantized embedding included."""
    from lieq_mlx.analysis.model_parts import PROJECTIONS

    from lieq_mlx.scaling import norm_weights

    candidates = bench.candidates(quantizer)
    weights = {"model.embed_tokens": bench.embedding(embed_bits)}
    for index, bits in enumerate(allocation):
        layer = module_at(bench.model, f"model.layers.{index}")
        for name, weight in norm_weights(layer, candidates.scales[index] if candidates.scales else {}).items():
            weights[f"model.layers.{index}.{name}"] = weight
        for name in PROJECTIONS:
            weights[projection_path(index, name)] = candidates.weights[index][bits][name].dequantized().astype(mx.float32)
    return weights


def rtn_weights(bench: Bench, bits: int) -> dict[str, mx.array]:
    """Return plain `mx.quantize` (min/max, group 64) weights at `bits`, the 6-bit embedding included."""
    from lieq_mlx.analysis.model_parts import PROJECTIONS

    weights = {"model.embed_tokens": bench.embedding()}
    for index in range(bench.num_layers):
        for name in PROJECTIONS:
            path = projection_path(index, name)
            original = module_at(bench.model, path).weight.astype(mx.float32)
            packed, scales, biases = mx.quantize(original, group_size=GROUP_SIZE, bits=bits)
            weights[path] = mx.dequantize(packed, scales, biases, group_size=GROUP_SIZE, bits=bits)
    return weights


def mlx_lm_weights(quantized: nn.Module) -> tuple[dict[str, mx.array], float, float, dict]:
    """Return (float32 weights, nominal bits, effective bits, bits per path) of an mlx-lm model."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import compute_bits_per_weight

    effective = float(compute_bits_per_weight(quantized))
    weights = {}
    layer_bits = 0.0
    layer_params = 0
    widths = {}
    leaves = tree_flatten(quantized.leaf_modules(), is_leaf=nn.Module.is_module)
    for path, module in leaves:
        if not isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            continue
        restored = mx.dequantize(
            module.weight, module.scales, module.biases, group_size=module.group_size, bits=module.bits
        ).astype(mx.float32)
        weights[path] = restored
        widths[path] = int(module.bits)
        if ".layers." in path and isinstance(module, nn.QuantizedLinear):
            layer_bits += module.bits * restored.size
            layer_params += restored.size
    return weights, layer_bits / layer_params, effective, widths


def lieq_allocation(bench: Bench, spec: RowSpec, scores, target: float, count: str) -> list[int]:
    from lieq_mlx.allocation import allocate_lieq, check_budget

    accounting = bench.accounting_for(spec.embed_bits)
    cap = check_budget(accounting, spec.widths, target, count)
    distortion = bench.candidates(spec.quantizer).output_error
    columns = [GPTQ_WIDTHS.index(w) for w in spec.widths]
    return allocate_lieq(accounting, scores, distortion[:, columns], spec.widths, cap)


CANDIDATE_KINDS = ("gptq", "random", "paper", "lieq", "equal", "lieq-match")


def build_row(bench: Bench, spec: RowSpec) -> tuple[dict[str, mx.array], dict]:
    """Return the weights that `spec` swaps in and the row's description."""
    from lieq_mlx.allocation import allocate_paper, allocate_random, check_budget

    info: dict = {"key": spec.key, "kind": spec.kind, "widths": list(spec.widths)}
    if spec.kind in CANDIDATE_KINDS:
        info["quantizer"] = spec.quantizer
    if spec.kind == "full":
        return {}, {**info, "nominal_bits": None, "effective_bits": None}

    if spec.kind in ("rtn", "clip", "gptq"):
        allocation = [spec.widths[0]] * bench.num_layers
        if spec.kind == "rtn":
            weights = rtn_weights(bench, spec.widths[0])
        else:
            weights = allocation_weights(bench, spec.quantizer if spec.kind == "gptq" else "nearest", allocation)
    elif spec.kind in ("random", "paper", "lieq", "equal"):
        cap = check_budget(bench.accounting, spec.widths, spec.budget, "nominal")
        if spec.kind == "random":
            allocation = allocate_random(bench.accounting, spec.widths, cap, spec.seed)
        elif spec.kind == "paper":
            allocation = allocate_paper(bench.accounting, bench.scores(), spec.widths, cap)
        else:
            scores = bench.scores() if spec.kind == "lieq" else [0.0] * bench.num_layers
            allocation = lieq_allocation(bench, spec, scores, spec.budget, "nominal")
        weights = allocation_weights(bench, spec.quantizer, allocation)
        info.update(budget=spec.budget, seed=spec.seed)
    elif spec.kind == "lieq-match":
        if spec.match_row is not None:
            if spec.match_row not in bench.rows:
                raise ValueError(f"row {spec.key} needs row {spec.match_row}, which is not in the cache yet")
            target = bench.rows[spec.match_row]["effective_bits"]
        else:
            target = bench.recipe_bits(spec.recipe)
        allocation = lieq_allocation(bench, spec, bench.scores(), target, "effective")
        weights = allocation_weights(bench, spec.quantizer, allocation, spec.embed_bits)
        info.update(recipe=spec.recipe, match_row=spec.match_row, target_effective_bits=target)
    elif spec.kind == "recipe":
        weights, nominal, effective, widths = mlx_lm_weights(bench.recipe_model(spec.recipe))
        info.update(recipe=spec.recipe, widths=sorted(set(widths.values())), nominal_bits=nominal,
                    effective_bits=effective, module_bits=widths)
        return weights, info
    elif spec.kind == "dynamic":
        weights, info = dynamic_row(bench, spec, info)
        return weights, info
    else:
        raise ValueError(f"row kind {spec.kind!r} is unknown")

    accounting = bench.accounting_for(spec.embed_bits)
    info.update(
        allocation=[int(b) for b in allocation],
        embed_bits=spec.embed_bits,
        nominal_bits=accounting.nominal_bits(allocation),
        effective_bits=accounting.effective_bits(allocation),
    )
    return weights, info


def dynamic_row(bench: Bench, spec: RowSpec, info: dict) -> tuple[dict[str, mx.array], dict]:
    """Quantize with mlx-lm's dynamic quantization at the effective bits of `spec.recipe`."""
    from mlx_lm.quant.dynamic_quant import estimate_threshold
    from mlx_lm.utils import quantize_model

    low, high = spec.low_high
    target = bench.recipe_bits(spec.recipe)
    sensitivities = bench.sensitivities(low, high)
    copied = bench.float16_copy()
    threshold = estimate_threshold(copied, sensitivities, target, low, GROUP_SIZE, high, GROUP_SIZE)

    # The predicate of mlx-lm's dynamic_quant command: above the threshold, the high width.
    def predicate(path, module):
        if not hasattr(module, "to_quantized"):
            return False
        if sensitivities[path] > threshold:
            return {"bits": high, "group_size": GROUP_SIZE}
        return True

    quantize_model(copied, {}, GROUP_SIZE, low, quant_predicate=predicate)
    weights, nominal, effective, widths = mlx_lm_weights(copied)
    info.update(recipe=spec.recipe, target_effective_bits=target, widths=[low, high], nominal_bits=nominal,
                effective_bits=effective, module_bits=widths, threshold=threshold)
    return weights, info


def score_row(bench: Bench, weights: dict[str, mx.array]):
    """Swap `weights` into the model, measure perplexity, and restore the originals."""
    from lieq_mlx.perplexity import evaluate_perplexity

    originals = {}
    try:
        for path, weight in weights.items():
            module = module_at(bench.model, path)
            originals[path] = module.weight
            module.weight = weight
        return evaluate_perplexity(bench.model, bench.eval_windows, batch_size=4)
    finally:
        for path, weight in originals.items():
            module_at(bench.model, path).weight = weight


def run_row(bench: Bench, spec: RowSpec) -> dict:
    """Build, score and describe one row."""
    start = time.perf_counter()
    weights, info = build_row(bench, spec)
    mx.eval(list(weights.values()))
    build_seconds = time.perf_counter() - start
    result = score_row(bench, weights)
    info.update(
        perplexity=result.perplexity,
        standard_error=result.standard_error,
        mean_nll=result.mean_nll,
        tokens_scored=result.tokens_scored,
        build_seconds=build_seconds,
        eval_seconds=result.seconds,
    )
    return info


# The JSON cache.


def load_cache(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"schema": SCHEMA, "version": 1, "meta": {}, "rows": {}}


def save_cache(path: Path, cache: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(json.dumps(cache, indent=1) + "\n")
    temporary.replace(path)


def environment(args) -> dict:
    import mlx_lm

    import lieq_mlx
    from lieq_mlx.platform import blas_in_use, device_name

    return {
        "mlx": mx.__version__,
        "mlx_lm": mlx_lm.__version__,
        "lieq_mlx": lieq_mlx.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "device": device_name(),
        "blas": blas_in_use(),
        "model": args.model,
        "compute_dtype": "float32",
        "eval": {"file": "wikitext-2-raw/wiki.test.raw", "windows": args.windows, "seq_len": args.seq_len,
                 "layout": "first consecutive windows, no BOS"},
        "calibration": {"file": "wikitext-2-valid/valid.txt", "samples": args.samples,
                        "seq_len": args.calib_seq_len, "seed": args.seed},
        "group_size": GROUP_SIZE,
        "embed_bits": 6,
        "embed_group_size": EMBED_GROUP_SIZE,
    }


def setup(args) -> Bench:
    """Load the model and the windows that every row uses."""
    from lieq_mlx.data import consecutive_windows, read_text, sample_windows, tokenize
    from lieq_mlx.models import load_model

    data = Path(args.data)
    model, tokenizer = load_model(args.model)
    test_tokens = tokenize(tokenizer, read_text(data / "wikitext-2-raw" / "wiki.test.raw"))
    calib_tokens = tokenize(tokenizer, read_text(data / "wikitext-2-valid" / "valid.txt"))
    eval_windows = consecutive_windows(test_tokens, args.seq_len, args.windows, "wiki.test.raw")
    calibration = sample_windows(calib_tokens, args.calib_seq_len, args.samples, args.seed, "valid.txt")
    return Bench(model, tokenizer, eval_windows, calibration, meta={})


def run(args) -> dict:
    """Run every planned row that the cache lacks; return the cache."""
    path = Path(args.json)
    cache = load_cache(path)
    settings = environment(args)
    if args.fresh or cache.get("meta", {}).get("settings", {}).get("eval") != settings["eval"]:
        cache = {"schema": SCHEMA, "version": 1, "meta": {}, "rows": {}}

    bench = setup(args)
    bench.meta = cache["meta"]
    bench.meta["settings"] = settings
    bench.rows = cache["rows"]
    bench.work_dir = None if args.no_candidate_cache else Path(args.work_dir).expanduser()
    if args.fresh and bench.work_dir is not None:
        for quantizer in ("gptq-awq", "gptq", "nearest"):
            stale = bench.candidate_file(quantizer)
            if stale.is_file():
                stale.unlink()

    plan = plan_rows(include_extra=not args.core_only)
    if args.rows:
        patterns = args.rows.split(",")
        plan = [spec for spec in plan if any(fnmatch.fnmatchcase(spec.key, pattern) for pattern in patterns)]
    failed: list[str] = []
    for spec in plan:
        if spec.key in cache["rows"]:
            continue
        log(f"row {spec.key}")
        try:
            row = run_row(bench, spec)
        except Exception:  # noqa: BLE001 - one failed row must not lose the rows after it
            failed.append(spec.key)
            log(f"row {spec.key} failed:\n{traceback.format_exc()}")
            continue

        row["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        cache["rows"][spec.key] = row
        save_cache(path, cache)
        log(f"row {spec.key}: perplexity {row['perplexity']:.2f} (eval {row['eval_seconds']:.0f} s)")

    # Both analysis costs must come from one run: time them here when no row needed them.
    bench.scores()
    bench.sensitivities(3, 4)
    save_cache(path, cache)
    if failed:
        log(f"{len(failed)} rows failed and are not cached: {', '.join(failed)}")
    return cache


# Rendering.

METHOD_NAMES = {
    "full": ("full precision (float32)", "-"),
    "rtn": ("uniform, round to nearest (mx.quantize min/max)", "uniform"),
    "clip": ("uniform, clipping search (lieq-mlx nearest)", "uniform"),
    "gptq": ("uniform, {q} (lieq-mlx)", "uniform"),
    "random": ("random allocation, {q}, 3 seeds", "random"),
    "paper": ("LieQ, {q}", "paper"),
    "lieq": ("LieQ, {q}", "lieq"),
    "equal": ("ablation: equal scores, {q}", "lieq"),
    "lieq-match": ("LieQ, {q}, at the recipe's effective bits", "lieq"),
    "recipe": ("mlx-lm recipe", "-"),
    "dynamic": ("mlx-lm dynamic_quant", "-"),
}
# Table names of the candidate sets.
QUANTIZER_NAMES = {"gptq-awq": "AWQ-scaled GPTQ", "gptq": "GPTQ without scaling (ablation)"}


def quantizer_of(row: dict) -> str:
    """Return the candidate set of a lieq-mlx row: gptq-awq unless the row names another."""
    return row.get("quantizer", "gptq-awq")


def table_rows(cache: dict) -> list[dict]:
    """Return display rows: random seeds merged into mean and min-max, others as they are."""
    rows = cache["rows"]
    full = rows.get("full", {}).get("perplexity")
    merged: dict[str, list[dict]] = {}
    display = []
    for key, row in rows.items():
        if row["kind"] == "random":
            merged.setdefault(key.rsplit("-s", 1)[0], []).append(row)
        else:
            display.append(dict(row))
    for key, group in merged.items():
        values = [r["perplexity"] for r in group]
        first = group[0]
        display.append({
            **first,
            "key": key,
            "perplexity": float(np.mean(values)),
            "standard_error": None,
            "spread": (min(values), max(values)),
            "seeds": len(group),
            "nominal_bits": float(np.mean([r["nominal_bits"] for r in group])),
            "effective_bits": float(np.mean([r["effective_bits"] for r in group])),
        })
    for row in display:
        row["ratio"] = row["perplexity"] / full if full else None
    display.sort(key=lambda r: display_order(r, rows))
    return display


WIDTH_GROUPS = ((1, 2, 3, 4), (2, 3, 4), (2, 4))
BUDGET_KINDS = {"lieq": 0, "paper": 0, "random": 1, "equal": 2}
MATCHED_KINDS = {"recipe": 0, "lieq-match": 1, "dynamic": 2}


def display_order(row: dict, rows: dict) -> tuple:
    """Return the sort key of a table row.

    Full precision, then the uniform rows, then each nominal budget (LieQ next to random
    allocation over the same widths), then each mlx-lm row next to LieQ at its bits.
    """
    kind = row["kind"]
    if kind == "full":
        return (0, 0.0, 0, 0)
    if kind in ("rtn", "clip", "gptq"):
        return (1, row["nominal_bits"], ("rtn", "clip", "gptq").index(kind), 0)
    if kind in BUDGET_KINDS:
        return (2, row["budget"], WIDTH_GROUPS.index(tuple(row["widths"])), BUDGET_KINDS[kind])
    if kind == "recipe":
        return (3, row["effective_bits"], 0, 0)
    if row.get("match_row"):
        matched = rows.get(row["match_row"], {})
        return (3, matched.get("target_effective_bits", row["target_effective_bits"]), 3, 0)
    return (3, row["target_effective_bits"], MATCHED_KINDS[kind], 0)


def _number(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def markdown_table(cache: dict) -> str:
    """Return the results as a markdown table."""
    lines = [
        "| method | policy | widths | nominal bits | effective bits | perplexity | ratio to full precision |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in table_rows(cache):
        name, policy = METHOD_NAMES[row["kind"]]
        if row["kind"] == "recipe":
            name = f"mlx-lm {row['recipe']}"
        if row["kind"] == "dynamic":
            name = f"mlx-lm dynamic_quant, target {row['recipe']}'s bits"
        if row["kind"] == "lieq-match":
            matched = "dynamic_quant" if row.get("match_row") else row["recipe"]
            name = f"LieQ, {{q}}, at {matched}'s bits"
            if row.get("embed_bits", 6) != 6:
                name += f", {row['embed_bits']}-bit embedding"
        if row["kind"] == "random":
            name = f"random allocation, {{q}} ({row['seeds']} seed{'s' if row['seeds'] > 1 else ''})"
        name = name.replace("{q}", QUANTIZER_NAMES.get(quantizer_of(row), ""))
        widths = ",".join(str(w) for w in row["widths"]) or "-"
        nominal = "-" if row["nominal_bits"] is None else f"{row['nominal_bits']:.3f}"
        effective = "-" if row["effective_bits"] is None else f"{row['effective_bits']:.3f}"
        if row.get("spread") and row["seeds"] > 1:
            low, high = row["spread"]
            perplexity = f"{_number(row['perplexity'])} (min {_number(low)}, max {_number(high)})"
        elif row.get("standard_error") is None:
            perplexity = _number(row["perplexity"])
        else:
            perplexity = f"{_number(row['perplexity'])} ± {_number(row['standard_error'])}"
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        lines.append(f"| {name} | {policy} | {widths} | {nominal} | {effective} | {perplexity} | {ratio} |")
    return "\n".join(lines)


def cost_lines(cache: dict) -> str:
    """Return the analysis cost comparison as markdown bullet lines."""
    costs = cache["meta"].get("costs", {})
    lieq = costs.get("lieq_analyze_seconds")
    mlx_lm = costs.get("mlx_lm_sensitivities_3_4_seconds")
    if lieq is None or mlx_lm is None:
        return "- analysis costs: not measured yet"
    calibration = cache["meta"]["settings"]["calibration"]
    return (
        f"- LieQ analysis (`analyze`, default proxy): {lieq:.1f} s; mlx-lm `estimate_sensitivities` "
        f"(3 and 4 bits, batch 4): {mlx_lm:.1f} s, on the same {calibration['samples']} x "
        f"{calibration['seq_len']} calibration tokens in the same run: mlx-lm / LieQ = {mlx_lm / lieq:.2f}"
    )


SERIES = (
    ("rtn", (), "uniform RTN (mx.quantize)", "v", "tab:gray"),
    ("clip", (), "uniform clipping search", "^", "tab:brown"),
    ("gptq", (), "uniform AWQ-scaled GPTQ", "s", "tab:blue"),
    ("gptq-noscale", (), "uniform GPTQ, no scaling", "s", "lightsteelblue"),
    ("lieq-noscale", (1, 2, 3, 4), "LieQ 1-4, GPTQ without scaling", "o", "darkseagreen"),
    ("random", (1, 2, 3, 4), "random allocation 1-4 (mean, min-max)", "x", "tab:orange"),
    ("random", (2, 3, 4), "random allocation 2,3,4 (mean, min-max)", "+", "goldenrod"),
    ("random", (2, 4), "random allocation 2,4 (mean, min-max)", "1", "chocolate"),
    ("paper", (2, 4), "LieQ paper policy 2,4", "D", "tab:purple"),
    ("lieq", (1, 2, 3, 4), "LieQ lieq policy 1-4", "o", "tab:green"),
    ("lieq", (2, 3, 4), "LieQ lieq policy 2,3,4", "o", "darkgreen"),
    ("equal", (1, 2, 3, 4), "equal scores 1-4 (ablation)", "P", "tab:olive"),
    ("lieq-match", (1, 2, 3, 4), "LieQ 1-4 at mlx-lm's bits", "*", "tab:green"),
    ("recipe", (), "mlx-lm recipes", "h", "tab:red"),
    ("dynamic", (), "mlx-lm dynamic_quant", "X", "tab:pink"),
)


def series_kind(row: dict) -> str:
    """Return the row's kind, with the unscaled-GPTQ ablation rows as their own series."""
    if row["kind"] in CANDIDATE_KINDS and quantizer_of(row) == "gptq":
        return f"{row['kind']}-noscale"
    return row["kind"]


def plot(cache: dict, path: Path) -> None:
    """Plot perplexity against effective bits, log y, one marker set per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table_rows(cache)
    figure, axes = plt.subplots(figsize=(10, 6.5))
    for kind, widths, label, marker, color in SERIES:
        chosen = [r for r in rows if series_kind(r) == kind and (not widths or tuple(r["widths"]) == widths)]
        chosen.sort(key=lambda r: r["effective_bits"])
        if not chosen:
            continue
        x = [r["effective_bits"] for r in chosen]
        y = [r["perplexity"] for r in chosen]
        if kind == "random":
            low = [r["perplexity"] - r["spread"][0] for r in chosen]
            high = [r["spread"][1] - r["perplexity"] for r in chosen]
            axes.errorbar(x, y, yerr=[low, high], fmt=marker, color=color, label=label, capsize=3, markersize=9)
        else:
            line = "-" if kind in ("rtn", "clip", "gptq", "gptq-noscale", "lieq", "lieq-noscale", "paper", "equal") else ""
            axes.plot(x, y, marker=marker, linestyle=line, color=color, label=label, markersize=8, alpha=0.9)
    full = cache["rows"].get("full")
    if full:
        axes.axhline(full["perplexity"], color="black", linestyle="--", label=f"full precision ({full['perplexity']:.2f})")
    axes.set_yscale("log")
    axes.set_xlabel("effective bits per parameter (all parameters, scales and biases included)")
    axes.set_ylabel("perplexity, WikiText-2 test (log scale)")
    settings = cache["meta"].get("settings", {})
    axes.set_title(f"SmolLM2-135M-Instruct, {settings.get('eval', {}).get('windows', '?')} windows of 512 tokens")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def render(cache: dict, plot_path: Path, doc_path: Path | None) -> str:
    """Write the plot, put the table between the markers of `doc_path` when present; return it."""
    table = markdown_table(cache) + "\n\n" + cost_lines(cache)
    plot(cache, plot_path)
    if doc_path is not None and doc_path.is_file():
        text = doc_path.read_text()
        if TABLE_START in text and TABLE_END in text:
            head, rest = text.split(TABLE_START, 1)
            _, tail = rest.split(TABLE_END, 1)
            doc_path.write_text(f"{head}{TABLE_START}\n{table}\n{TABLE_END}{tail}")
    return table


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo", help="model to quantize (default: demo)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="folder with wikitext-2-raw/ and wikitext-2-valid/")
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows (default: 40)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per perplexity window (default: 512)")
    parser.add_argument("--samples", type=int, default=8, help="calibration windows (default: 8)")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (default: 0)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="result cache (default: docs/data/quality.json)")
    parser.add_argument("--plot", default=str(DEFAULT_PLOT), help="plot file (default: docs/quality.png)")
    parser.add_argument("--doc", default=str(DEFAULT_DOC), help="markdown file whose quality-table markers get the table")
    parser.add_argument("--fresh", action="store_true", help="recompute every row, ignoring the cache")
    parser.add_argument("--render-only", action="store_true", help="render the table and plot from the cache only")
    parser.add_argument("--work-dir", default="~/.cache/lieq-mlx/quality",
                        help="folder that keeps candidate sets between runs (default: ~/.cache/lieq-mlx/quality)")
    parser.add_argument("--no-candidate-cache", action="store_true", help="quantize candidates again on every run")
    parser.add_argument("--rows", default="",
                        help="run only the rows whose keys match these comma-separated shell patterns")
    parser.add_argument("--core-only", action="store_true", help="skip mixed_3_6, mixed_4_6 and the 2/6 dynamic row")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render_only:
        cache = load_cache(Path(args.json))
        if not cache["rows"]:
            print(f"no rows in {args.json}; run without --render-only first", file=sys.stderr)
            return 1
    else:
        cache = run(args)
    print(render(cache, Path(args.plot), Path(args.doc)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
