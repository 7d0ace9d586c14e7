"""The Metal kernel bodies, compiled with g++ against a Metal stand-in and run on the CPU.

Each case plans a launch with the same lieq_mlx.kernels code that dispatches on a Mac
(template parameters, grid, threadgroup), runs every thread of the grid in the emulator and
compares the outputs with `mx.quantized_matmul` on the CPU. All kernel instances compile
once per session, in one g++ process per CPU core.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from emulation.emulator import Emulator, KernelLaunch, with_source
from lieq_mlx.kernels import (
    KERNEL_TOLERANCE,
    ROWS_PER_THREADGROUP,
    PackedWeight,
    plan_fused_gate_up,
    plan_fused_qkv,
    plan_quantized_matvec,
)

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not installed")

GROUP_SIZES = (32, 64, 128)
# Block of K that one pass of the 32 lanes covers: 32 words of 32 / bits codes each.
BLOCK_K = {1: 1024, 2: 512}


@dataclass(frozen=True)
class Case:
    """One emulated dispatch and its MLX reference."""

    kernel: str  # "qmv", "qkv" or "gate_up"
    rows: int  # M
    bits: int
    group_size: int
    input_dims: int  # K
    output_dims: tuple[int, ...]  # N of each weight
    dtype: mx.Dtype = mx.float32

    @property
    def id(self) -> str:
        dtype = "f16" if self.dtype == mx.float16 else "f32"
        dims = "x".join(str(n) for n in self.output_dims)
        return (
            f"{self.kernel}-M{self.rows}-b{self.bits}-g{self.group_size}"
            f"-K{self.input_dims}-N{dims}-{dtype}"
        )


def qmv_cases() -> list[Case]:
    # K values: below one block, between one and two blocks, above two 2-bit blocks; none
    # is a multiple of the 1- or 2-bit block. N values are not multiples of 4 rows.
    input_dims = (384, 640, 1152)
    output_dims = (37, 21, 6)
    cases = []
    index = 0
    for bits in (1, 2):
        for group_size in GROUP_SIZES:
            for rows in range(1, 9):
                cases.append(
                    Case(
                        "qmv",
                        rows,
                        bits,
                        group_size,
                        input_dims[index % 3],
                        (output_dims[index % 3],),
                    )
                )
                index += 1
    return cases


def fused_cases(kernel: str, output_dims: tuple[int, ...]) -> list[Case]:
    cases = []
    for bits in (1, 2):
        for rows in range(1, 9):
            group_size = GROUP_SIZES[rows % 3]
            cases.append(Case(kernel, rows, bits, group_size, 640, output_dims))
    return cases


def half_cases() -> list[Case]:
    return [
        Case("qmv", 1, 2, 64, 640, (37,), mx.float16),
        Case("qmv", 5, 1, 128, 1152, (21,), mx.float16),
        Case("qkv", 3, 2, 32, 384, (20, 9, 9), mx.float16),
        Case("gate_up", 2, 2, 64, 640, (45,), mx.float16),
        Case("gate_up", 8, 1, 32, 384, (18,), mx.float16),
    ]


ALL_CASES = (
    qmv_cases()
    + fused_cases("qkv", (20, 9, 9))
    + fused_cases("gate_up", (45,))
    + half_cases()
)


# Largest error of a float16 kernel output against the same computation in float32 on the
# same float16 operands, relative to the largest output: a little over one float16 rounding.
HALF_ROUNDING_TOLERANCE = 1e-3


@dataclass
class Prepared:
    """A planned launch for one case, MLX's outputs for the same operands, and the same
    computation in float32 (equal to `references` for float32 cases)."""

    launch: KernelLaunch
    references: list[np.ndarray]
    exact: list[np.ndarray]


def make_packed(key: mx.array, output_dims: int, case: Case) -> PackedWeight:
    """Quantize a random (N, K) weight as nn.quantize would and return its packed form."""
    weight = mx.random.normal((output_dims, case.input_dims), key=key) * 0.05
    packed, scales, biases = mx.quantize(weight, group_size=case.group_size, bits=case.bits)
    return PackedWeight(packed, scales.astype(case.dtype), biases.astype(case.dtype))


def reference_matmul(x: mx.array, packed: PackedWeight, case: Case) -> mx.array:
    return mx.quantized_matmul(
        x,
        packed.weight,
        packed.scales,
        packed.biases,
        transpose=True,
        group_size=case.group_size,
        bits=case.bits,
    )


def as_float32(packed: PackedWeight) -> PackedWeight:
    return PackedWeight(
        packed.weight, packed.scales.astype(mx.float32), packed.biases.astype(mx.float32)
    )


def mlx_outputs(case: Case, x: mx.array, packs: list[PackedWeight]) -> list[np.ndarray]:
    """Compute the case's outputs with mx.quantized_matmul (and nn.silu for gate/up)."""
    if case.kernel == "gate_up":
        gate_out = reference_matmul(x, packs[0], case)
        up_out = reference_matmul(x, packs[1], case)
        outputs = [nn.silu(gate_out) * up_out]
    else:
        outputs = [reference_matmul(x, packed, case) for packed in packs]
    return [np.array(output.astype(mx.float32)) for output in outputs]


def prepare_case(case: Case, seed: int) -> Prepared:
    keys = mx.random.split(mx.random.key(seed), 4)
    x = mx.random.normal((case.rows, case.input_dims), key=keys[0]).astype(case.dtype)
    if case.kernel == "gate_up":
        packs = [make_packed(keys[i + 1], case.output_dims[0], case) for i in range(2)]
    else:
        packs = [make_packed(keys[i + 1], n, case) for i, n in enumerate(case.output_dims)]
    options = dict(group_size=case.group_size, bits=case.bits)

    if case.kernel == "qmv":
        launch = plan_quantized_matvec(x, packs[0], **options)
    elif case.kernel == "qkv":
        launch = plan_fused_qkv(x, *packs, **options)
    else:
        launch = plan_fused_gate_up(x, *packs, **options)
    references = mlx_outputs(case, x, packs)
    exact = mlx_outputs(
        Case(case.kernel, case.rows, case.bits, case.group_size, case.input_dims,
             case.output_dims, mx.float32),
        x.astype(mx.float32),
        [as_float32(packed) for packed in packs],
    )
    return Prepared(launch, references, exact)


@pytest.fixture(scope="session")
def emulator(tmp_path_factory) -> Emulator:
    return Emulator(tmp_path_factory.mktemp("metal_emulation"))


@pytest.fixture(scope="session")
def prepared_cases(emulator) -> dict[str, Prepared]:
    prepared = {case.id: prepare_case(case, seed) for seed, case in enumerate(ALL_CASES)}
    emulator.prepare([item.launch for item in prepared.values()])
    return prepared


def max_relative_error(outputs: list[np.ndarray], references: list[np.ndarray]) -> float:
    worst = 0.0
    for output, reference in zip(outputs, references):
        scale = max(float(np.abs(reference).max()), 1e-6)
        difference = np.abs(output.astype(np.float32) - reference).max()
        worst = max(worst, float(difference) / scale)
    return worst


def test_cases_cover_hard_shapes():
    qmv = [case for case in ALL_CASES if case.kernel == "qmv"]
    assert {case.rows for case in qmv} == set(range(1, 9))
    assert {(case.bits, case.group_size) for case in qmv} == {
        (bits, size) for bits in (1, 2) for size in GROUP_SIZES
    }
    assert all(case.input_dims % BLOCK_K[case.bits] != 0 for case in ALL_CASES)
    assert any(case.input_dims > BLOCK_K[case.bits] for case in qmv)
    assert all(sum(case.output_dims) % ROWS_PER_THREADGROUP != 0 for case in ALL_CASES)


@pytest.mark.parametrize("case", ALL_CASES, ids=lambda case: case.id)
def test_emulated_kernel_matches_mlx(case, emulator, prepared_cases):
    prepared = prepared_cases[case.id]
    outputs = emulator.run(prepared.launch)

    assert len(outputs) == len(prepared.references)
    for output, reference in zip(outputs, prepared.references):
        assert output.shape == reference.shape
        assert not np.isnan(output.astype(np.float32)).any(), "kernel left outputs unwritten"
    assert max_relative_error(outputs, prepared.references) <= KERNEL_TOLERANCE[case.dtype]
    if case.dtype == mx.float16:
        assert max_relative_error(outputs, prepared.exact) <= HALF_ROUNDING_TOLERANCE


# Each mutation breaks the index arithmetic (or the epilogue) of one kernel while keeping
# every memory access inside its buffer, so the emulated run finishes with wrong numbers.
MUTATIONS = [
    ("header", "(packed >> (j * BITS))", "(packed >> ((j ^ 1) * BITS))", "qmv"),
    ("header", "const int group = k0 / GROUP_SIZE;", "const int group = k0 / (2 * GROUP_SIZE);", "qmv"),
    ("header", "word += LOWBIT_SIMD_WIDTH", "word += LOWBIT_SIMD_WIDTH + 1", "qmv"),
    ("source", "scales + row * groups_per_row", "scales + (row / 2) * groups_per_row", "qmv"),
    ("source", "scales_base = scales_k;", "scales_base = scales_v;", "qkv"),
    ("source", "metal::exp(-gate)", "metal::exp(gate)", "gate_up"),
]
MUTATION_CASES = {
    "qmv": Case("qmv", 3, 2, 64, 640, (37,)),
    "qkv": Case("qkv", 2, 2, 64, 640, (20, 9, 9)),
    "gate_up": Case("gate_up", 2, 1, 32, 384, (18,)),
}


def mutate(launch: KernelLaunch, part: str, old: str, new: str) -> KernelLaunch:
    text = launch.header if part == "header" else launch.source
    assert text.count(old) == 1, f"mutation target {old!r} not found exactly once"
    mutated = text.replace(old, new)
    if part == "header":
        return with_source(launch, header=mutated)
    return with_source(launch, source=mutated)


@pytest.fixture(scope="session")
def mutation_launches(emulator) -> dict[str, tuple[Prepared, KernelLaunch]]:
    launches = {}
    for index, (part, old, new, kernel) in enumerate(MUTATIONS):
        prepared = prepare_case(MUTATION_CASES[kernel], 1000 + index)
        launches[old] = (prepared, mutate(prepared.launch, part, old, new))
    emulator.prepare([pair[0].launch for pair in launches.values()])
    emulator.prepare([pair[1] for pair in launches.values()])
    return launches


@pytest.mark.parametrize("part,old,new,kernel", MUTATIONS, ids=lambda v: str(v)[:24])
def test_broken_kernel_fails_comparison(part, old, new, kernel, emulator, mutation_launches):
    prepared, mutated = mutation_launches[old]
    tolerance = KERNEL_TOLERANCE[mx.float32]

    intact = emulator.run(prepared.launch)
    assert max_relative_error(intact, prepared.references) <= tolerance

    broken = emulator.run(mutated)
    assert max_relative_error(broken, prepared.references) > 100 * tolerance


# ---- The emulator's own SIMD-group and barrier semantics ---------------------------------

LANE_SUM_BODY = """
const uint index = thread_position_in_grid.x;
if (index >= uint(values_shape[0]) || (index % 7) == 3) {
  return;
}
const float total = metal::simd_sum(values[index]);
const float next = metal::simd_shuffle_down(values[index], 1);
out[index] = total;
shifted[index] = next;
"""

BARRIER_BODY = """
const uint index = thread_position_in_grid.x;
const uint local = thread_position_in_threadgroup.x;
const uint size = threads_per_threadgroup.x;
scratch[index] = values[index] * 2.0f;
metal::threadgroup_barrier(metal::mem_flags::mem_device);
const uint mirror = index - local + (size - 1 - local);
out[index] = scratch[mirror];
"""


def test_emulator_simd_sum_skips_exited_lanes(emulator):
    count = 80  # three SIMD groups, the last one half full
    values = mx.arange(count, dtype=mx.float32) * 0.5 + 1.0
    launch = KernelLaunch(
        name="lane_sum_check",
        input_names=("values",),
        output_names=("out", "shifted"),
        source=LANE_SUM_BODY,
        header="",
        inputs=(values,),
        template=(),
        grid=(96, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=((count,), (count,)),
        output_dtypes=(mx.float32, mx.float32),
    )
    out, shifted = emulator.run(launch)

    host = np.array(values)
    running = np.array([(i % 7) != 3 for i in range(count)])
    for start in range(0, count, 32):
        lanes = np.arange(start, min(start + 32, count))
        active = lanes[running[lanes]]
        expected = host[active].sum()
        np.testing.assert_allclose(out[active], expected, rtol=1e-6)
        assert np.isnan(out[lanes[~running[lanes]]]).all()
        for lane in active:
            source = lane + 1
            in_group = source < start + 32 and source < count and running[source]
            assert shifted[lane] == (host[source] if in_group else host[lane])


def test_emulator_threadgroup_barrier_orders_writes(emulator):
    count = 256
    values = mx.random.normal((count,), key=mx.random.key(7))
    launch = KernelLaunch(
        name="barrier_check",
        input_names=("values",),
        output_names=("scratch", "out"),
        source=BARRIER_BODY,
        header="",
        inputs=(values,),
        template=(),
        grid=(count, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=((count,), (count,)),
        output_dtypes=(mx.float32, mx.float32),
    )
    _, out = emulator.run(launch)

    doubled = np.array(values) * 2.0
    expected = np.concatenate([doubled[:128][::-1], doubled[128:][::-1]])
    np.testing.assert_array_equal(out, expected)
