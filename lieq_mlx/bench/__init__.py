"""Benchmarking: tokens per second of prefill and generation, with the decode bound.

`bench_model` runs the timed trials of one model, `memory_bandwidth` finds the bandwidth
that bounds decoding, and `bench_report` turns several models' results into the JSON
record that `lieq-mlx bench --json` writes.
"""

from lieq_mlx.bench.bandwidth import Bandwidth, memory_bandwidth
from lieq_mlx.bench.bits import BitCounts, stored_bits
from lieq_mlx.bench.bound import TokenTraffic, decode_bound, token_traffic
from lieq_mlx.bench.measure import BenchSettings, ModelBench, Spread, Trial, bench_model
from lieq_mlx.bench.report import REPORT_SCHEMA, REPORT_VERSION, bench_report, machine_info

__all__ = [
    "Bandwidth",
    "BenchSettings",
    "BitCounts",
    "ModelBench",
    "REPORT_SCHEMA",
    "REPORT_VERSION",
    "Spread",
    "TokenTraffic",
    "Trial",
    "bench_model",
    "bench_report",
    "decode_bound",
    "machine_info",
    "memory_bandwidth",
    "stored_bits",
    "token_traffic",
]
