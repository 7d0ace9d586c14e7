"""Run `mx.fast.metal_kernel` dispatches on the CPU by compiling the Metal bodies as C++.

`Emulator.run(launch)` takes the same `KernelLaunch` that lieq_mlx.kernels hands to MLX on a
Mac. It writes the kernel signature the way MLX 0.32 writes it: template parameters, one
`const device T* name` per input, `name_shape` and its siblings when the body mentions them,
one `device T* name` per output, then the thread attributes the body mentions, in MLX's
order. The body follows unchanged. g++ compiles the result against metal_standin.h, and
every thread of the grid runs through the stand-in's thread runtime.

Libraries are cached by the hash of their generated source, so each distinct kernel
instance is compiled once per build folder. The stand-in header is compiled once into a
precompiled header there, which saves g++ about a second per library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from lieq_mlx.kernels import KernelLaunch

STANDIN_HEADER = Path(__file__).with_name("metal_standin.h")
COMPILER = os.environ.get("CXX", "g++")
COMPILE_FLAGS = (
    "-std=c++20",
    "-O1",
    "-shared",
    "-fPIC",
    "-pthread",
    "-Wall",
    "-Wno-attributes",
    "-Wno-unused-variable",
    "-Wno-unused-but-set-variable",
)

# MLX's type names (get_type_string) with the numpy dtype that has the same layout.
DTYPES: dict[Any, tuple[str, Any]] = {
    mx.float32: ("float", np.float32),
    mx.float16: ("float16_t", np.float16),
    mx.uint32: ("uint32_t", np.uint32),
    mx.int32: ("int32_t", np.int32),
    mx.uint8: ("uint8_t", np.uint8),
    mx.int64: ("int64_t", np.int64),
    mx.bool_: ("bool", np.bool_),
}

# Thread attributes in the order MLX appends them to a signature, with their Metal type.
# Each one maps to the member of metal_emulation::ThreadIds with the same name.
MLX_ATTRIBUTES = (
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
)
EMULATED_ATTRIBUTES = {
    "simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup",
    "thread_execution_width",
    "thread_index_in_simdgroup",
    "thread_index_in_threadgroup",
    "thread_position_in_grid",
    "thread_position_in_threadgroup",
    "threadgroup_position_in_grid",
    "threadgroups_per_grid",
    "threads_per_grid",
    "threads_per_simdgroup",
    "threads_per_threadgroup",
}

# Upper bound on kernel instances per compiled library, to spread compiling over cores.
INSTANCES_PER_LIBRARY = 24

# MLX passes inputs with fewer elements than this in the `constant` address space.
MAX_CONSTANT_ARRAY_SIZE = 8

THREADGROUP_ARRAY = re.compile(r"\bthreadgroup\s+[\w:<>]+\s+\w+\s*\[")


class EmulationError(RuntimeError):
    """A kernel that the emulator cannot compile or run."""


@dataclass(frozen=True)
class InputBinding:
    """How one input appears in the generated signature."""

    name: str
    type_name: str
    ndim: int
    location: str  # "device" or "constant", as MLX picks it
    has_shape: bool
    has_strides: bool
    has_ndim: bool


@dataclass(frozen=True)
class KernelInstance:
    """Everything that makes two launches compile to the same C++ function."""

    name: str
    source: str
    header: str
    template: tuple[tuple[str, str, str], ...]  # (name, parameter kind, argument text)
    inputs: tuple[InputBinding, ...]
    outputs: tuple[tuple[str, str], ...]

    def key(self) -> str:
        """Return a stable hash of the instance."""
        return hashlib.sha256(repr(self).encode()).hexdigest()[:16]


def template_value(value: Any) -> tuple[str, str]:
    """Return (C++ template parameter kind, argument text) for one MLX template argument."""
    if isinstance(value, bool):
        return "bool", "1" if value else "0"
    if isinstance(value, int):
        return "int", str(value)
    if isinstance(value, mx.Dtype):
        if value not in DTYPES:
            raise EmulationError(f"dtype {value} is not emulated; use float32 or float16")
        return "typename", DTYPES[value][0]
    raise EmulationError(f"template argument {value!r} is not an int, bool or mx.Dtype")


def instance_of(launch: KernelLaunch) -> KernelInstance:
    """Describe the C++ function that MLX would generate for `launch`."""
    if THREADGROUP_ARRAY.search(launch.source) or THREADGROUP_ARRAY.search(launch.header):
        raise EmulationError(
            f"kernel {launch.name} declares a threadgroup array, which the emulator would "
            "turn into per-thread memory"
        )
    inputs = []
    for name, array in zip(launch.input_names, launch.inputs):
        if array.dtype not in DTYPES:
            raise EmulationError(f"input {name} has dtype {array.dtype}, which is not emulated")
        inputs.append(
            InputBinding(
                name=name,
                type_name=DTYPES[array.dtype][0],
                ndim=array.ndim,
                location="constant" if array.size < MAX_CONSTANT_ARRAY_SIZE else "device",
                has_shape=f"{name}_shape" in launch.source,
                has_strides=f"{name}_strides" in launch.source,
                has_ndim=f"{name}_ndim" in launch.source,
            )
        )
    outputs = []
    for name, dtype in zip(launch.output_names, launch.output_dtypes):
        if dtype not in DTYPES:
            raise EmulationError(f"output {name} has dtype {dtype}, which is not emulated")
        outputs.append((name, DTYPES[dtype][0]))
    return KernelInstance(
        name=launch.name,
        source=launch.source,
        header=launch.header,
        template=tuple((name, *template_value(value)) for name, value in launch.template),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
    )


def used_attributes(source: str) -> list[tuple[str, str]]:
    """Return the thread attributes MLX adds for `source`, rejecting ones not emulated."""
    used = [(name, kind) for name, kind in MLX_ATTRIBUTES if name in source]
    missing = [name for name, _ in used if name not in EMULATED_ATTRIBUTES]
    if missing:
        raise EmulationError(f"thread attributes {missing} are not emulated")
    return used


def write_instance(instance: KernelInstance, function: str) -> str:
    """Write the kernel function for one instance and its extern "C" entry point."""
    lines = []
    if instance.template:
        template_params = ", ".join(f"{kind} {name}" for name, kind, _ in instance.template)
        lines.append(f"template <{template_params}>")
    lines.append(f"[[kernel]] void {function}(")

    params: list[str] = []
    call_args: list[str] = []
    buffer = 0
    for binding in instance.inputs:
        reference = "&" if binding.ndim == 0 else "*"
        params.append(
            f"  const {binding.location} {binding.type_name}{reference} {binding.name} "
            f"[[buffer({buffer})]]"
        )
        pointer = f"static_cast<const {binding.type_name}*>(buffers[{buffer}])"
        call_args.append(f"*{pointer}" if binding.ndim == 0 else pointer)
        buffer += 1
        if binding.ndim == 0:
            continue
        extras = (
            (binding.has_shape, f"const constant int* {binding.name}_shape", "const int*"),
            (binding.has_strides, f"const constant int64_t* {binding.name}_strides", "const int64_t*"),
            (binding.has_ndim, f"const constant int& {binding.name}_ndim", None),
        )
        for present, declaration, cast in extras:
            if not present:
                continue
            params.append(f"  {declaration} [[buffer({buffer})]]")
            if cast is None:
                call_args.append(f"*static_cast<const int*>(buffers[{buffer}])")
            else:
                call_args.append(f"static_cast<{cast}>(buffers[{buffer}])")
            buffer += 1
    for name, type_name in instance.outputs:
        params.append(f"  device {type_name}* {name} [[buffer({buffer})]]")
        call_args.append(f"static_cast<{type_name}*>(buffers[{buffer}])")
        buffer += 1
    for name, kind in used_attributes(instance.source):
        params.append(f"  {kind} {name} [[{name}]]")
        call_args.append(f"ids.{name}")

    lines.append(",\n".join(params) + ") {")
    lines.append(instance.source)
    lines.append("}")

    template_args = ", ".join(text for _, _, text in instance.template)
    callee = f"{function}<{template_args}>" if instance.template else function
    joined_args = ",\n        ".join(call_args)
    lines.append(
        f'extern "C" void {function}_launch(void* const* buffers, const unsigned* grid,\n'
        f"                                  const unsigned* group) {{\n"
        f"  metal_emulation::dispatch_threads(\n"
        f"      uint3{{grid[0], grid[1], grid[2]}}, uint3{{group[0], group[1], group[2]}},\n"
        f"      [&](const metal_emulation::ThreadIds& ids) {{\n"
        f"        {callee}(\n        {joined_args});\n"
        f"      }});\n"
        f"}}\n"
    )
    return "\n".join(lines)


@dataclass
class CompiledInstance:
    """A loaded kernel instance: the library that contains it and its entry point."""

    library: ctypes.CDLL
    symbol: str


class Emulator:
    """Compile and run kernel launches on the CPU, caching libraries in `build_dir`."""

    def __init__(self, build_dir: Path) -> None:
        if shutil.which(COMPILER) is None:
            raise EmulationError(f"C++ compiler {COMPILER!r} not found; install g++ 12 or newer")
        self.build_dir = Path(build_dir)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        self._compiled: dict[str, CompiledInstance] = {}
        self.standin = self._precompile_standin()

    def _precompile_standin(self) -> Path:
        """Copy the stand-in header into the build folder and precompile it there.

        g++ picks up `metal_standin.h.gch` next to the header when the flags match, and
        silently parses the header itself when they do not, so a failed precompile only
        costs time.
        """
        text = STANDIN_HEADER.read_text()
        digest = hashlib.sha256((text + " ".join(COMPILE_FLAGS)).encode()).hexdigest()[:16]
        folder = self.build_dir / f"standin_{digest}"
        header = folder / STANDIN_HEADER.name
        if header.exists():
            return header
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "metal_standin.h.partial"
        partial.write_text(text)
        flags = [flag for flag in COMPILE_FLAGS if flag != "-shared"]
        command = [COMPILER, *flags, "-x", "c++-header", str(partial), "-o", str(header) + ".gch"]
        subprocess.run(command, capture_output=True, text=True)
        partial.rename(header)
        return header

    def prepare(self, launches: list[KernelLaunch]) -> None:
        """Compile every instance `launches` need that is not loaded yet.

        Instances of the same body share one library, and the libraries compile in
        parallel, one g++ process per CPU core.
        """
        pending: dict[tuple[str, str, str], dict[str, KernelInstance]] = {}
        for launch in launches:
            instance = instance_of(launch)
            key = instance.key()
            if key in self._compiled:
                continue
            group = pending.setdefault((launch.name, launch.source, launch.header), {})
            group[key] = instance

        # Split large groups so that every core gets a similar share of the compile work.
        jobs = []
        for members in pending.values():
            items = sorted(members.items())
            for start in range(0, len(items), INSTANCES_PER_LIBRARY):
                jobs.append(dict(items[start : start + INSTANCES_PER_LIBRARY]))
        workers = max(1, min(len(jobs), os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(self._build_library, jobs))
        for loaded in results:
            self._compiled.update(loaded)

    def _build_library(
        self, members: dict[str, KernelInstance]
    ) -> dict[str, CompiledInstance]:
        parts = [f'#include "{self.standin}"', ""]
        header = next(iter(members.values())).header
        parts.append(header)
        symbols = {}
        for key, instance in sorted(members.items()):
            function = f"custom_kernel_{instance.name}_{key}"
            parts.append(write_instance(instance, function))
            symbols[key] = f"{function}_launch"
        text = "\n".join(parts)

        digest = hashlib.sha256(
            (text + STANDIN_HEADER.read_text() + " ".join(COMPILE_FLAGS)).encode()
        ).hexdigest()[:20]
        source_path = self.build_dir / f"kernels_{digest}.cpp"
        library_path = self.build_dir / f"kernels_{digest}.so"
        if not library_path.exists():
            source_path.write_text(text)
            partial = library_path.with_suffix(".so.partial")
            command = [COMPILER, *COMPILE_FLAGS, str(source_path), "-o", str(partial)]
            completed = subprocess.run(command, capture_output=True, text=True)
            if completed.returncode != 0:
                raise EmulationError(
                    f"g++ failed on {source_path}:\n{completed.stderr[-6000:]}"
                )
            partial.rename(library_path)
        library = ctypes.CDLL(str(library_path))
        return {key: CompiledInstance(library, symbol) for key, symbol in symbols.items()}

    def run(self, launch: KernelLaunch) -> list[np.ndarray]:
        """Run `launch` over its whole grid and return its outputs as numpy arrays.

        Outputs start as NaN (or the maximum integer), so elements the kernel never writes
        show up in comparisons.
        """
        instance = instance_of(launch)
        key = instance.key()
        if key not in self._compiled:
            self.prepare([launch])
        compiled = self._compiled[key]

        keep_alive: list[np.ndarray] = []
        pointers: list[int] = []

        def add(array: np.ndarray) -> None:
            keep_alive.append(array)
            pointers.append(array.ctypes.data)

        for binding, array in zip(instance.inputs, launch.inputs):
            host = np.ascontiguousarray(np.asarray(array))
            add(host)
            if binding.ndim == 0:
                continue
            if binding.has_shape:
                add(np.array(array.shape, dtype=np.int32))
            if binding.has_strides:
                add(np.array(host.strides, dtype=np.int64) // host.itemsize)
            if binding.has_ndim:
                add(np.array([array.ndim], dtype=np.int32))
        outputs = []
        for shape, dtype in zip(launch.output_shapes, launch.output_dtypes):
            numpy_dtype = DTYPES[dtype][1]
            output = np.empty(shape, dtype=numpy_dtype)
            if np.issubdtype(numpy_dtype, np.floating):
                output.fill(np.nan)
            elif np.issubdtype(numpy_dtype, np.integer):
                output.fill(np.iinfo(numpy_dtype).max)
            add(output)
            outputs.append(output)

        buffers = (ctypes.c_void_p * len(pointers))(*pointers)
        grid = (ctypes.c_uint * 3)(*launch.grid)
        group = (ctypes.c_uint * 3)(*launch.threadgroup)
        getattr(compiled.library, compiled.symbol)(buffers, grid, group)
        return outputs


def with_source(launch: KernelLaunch, source: str | None = None, header: str | None = None):
    """Return a copy of `launch` with its kernel body or header text replaced."""
    return replace(
        launch,
        source=launch.source if source is None else source,
        header=launch.header if header is None else header,
    )
