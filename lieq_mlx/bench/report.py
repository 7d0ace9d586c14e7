"""The JSON record of a benchmark run: settings, machine, bandwidth and every raw trial.

The key set of each level is fixed for a given `REPORT_VERSION`. A change to it bumps the
version, so that scripts reading old records can tell them apart.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform as python_platform
from importlib import metadata

import mlx.core as mx

from lieq_mlx.bench.bandwidth import Bandwidth, cpu_name
from lieq_mlx.bench.bound import decode_bound
from lieq_mlx.bench.measure import BenchSettings, ModelBench, Spread
from lieq_mlx.platform import blas_in_use, device_name

REPORT_SCHEMA = "lieq-mlx-bench"
REPORT_VERSION = 1


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict:
    """Describe the machine and software that ran the benchmark."""
    return {
        "platform": python_platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "device": device_name(),
        "blas": blas_in_use(),
        "python": python_platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": _package_version("mlx-lm"),
        "lieq_mlx": _package_version("lieq-mlx"),
    }


def _spread(spread: Spread) -> dict:
    return {"median": spread.median, "min": spread.min, "max": spread.max}


def percent_of_bound(result: ModelBench, bandwidth: Bandwidth) -> float:
    """Return the median generation rate as a percentage of the decode bound."""
    return 100.0 * result.generation.median / decode_bound(bandwidth.gigabytes_per_second, result.traffic)


def ratios_to(result: ModelBench, first: ModelBench) -> dict:
    """Divide the model's median rates, size and peak memory by those of `first`."""
    return {
        "prefill_tokens_per_second": result.prefill.median / first.prefill.median,
        "generation_tokens_per_second": result.generation.median / first.generation.median,
        "size_on_disk": result.size_on_disk_bytes / first.size_on_disk_bytes,
        "peak_memory": result.peak_memory_bytes / first.peak_memory_bytes,
    }


def model_record(result: ModelBench, bandwidth: Bandwidth, first: ModelBench) -> dict:
    """Build the JSON record of one model."""
    traffic = result.traffic
    return {
        "model": result.spec,
        "folder": str(result.folder),
        "load_seconds": result.load_seconds,
        "size_on_disk_bytes": result.size_on_disk_bytes,
        "nominal_bits": result.bits.nominal_bits,
        "effective_bits": result.bits.effective_bits,
        "bits_source": result.bits.source,
        "prefill_tokens_per_second": _spread(result.prefill),
        "generation_tokens_per_second": _spread(result.generation),
        "peak_memory_bytes": result.peak_memory_bytes,
        "bytes_read_per_token": {
            "weights": traffic.weight_bytes,
            "kv_cache": traffic.kv_cache_bytes,
            "total": traffic.total_bytes,
            "mean_context_tokens": traffic.mean_context,
        },
        "decode_bound_tokens_per_second": decode_bound(bandwidth.gigabytes_per_second, traffic),
        "percent_of_bound": percent_of_bound(result, bandwidth),
        "ratios_to_first": ratios_to(result, first),
        "warmup": dataclasses.asdict(result.warmup),
        "trials": [dataclasses.asdict(trial) for trial in result.trials],
    }


def bench_report(results: list[ModelBench], settings: BenchSettings, bandwidth: Bandwidth) -> dict:
    """Build the JSON record of a run over several models; ratios are to the first model."""
    if not results:
        raise ValueError("a report needs at least one model result")
    return {
        "schema": REPORT_SCHEMA,
        "version": REPORT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": dataclasses.asdict(settings),
        "machine": machine_info(),
        "bandwidth": dataclasses.asdict(bandwidth),
        "models": [model_record(result, bandwidth, results[0]) for result in results],
    }
