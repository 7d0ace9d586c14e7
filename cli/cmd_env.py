"""`lieq-mlx env`: the MLX version, device, BLAS and where the demo model is cached."""

from __future__ import annotations

import platform as host

import mlx.core as mx
from rich.text import Text

import lieq_mlx
from lieq_mlx import models, platform

NAME = "env"
HELP = "show MLX version, device, BLAS in use, custom kernel status and the model cache"


def add_arguments(parser) -> None:
    pass


def kernel_status() -> str:
    try:
        from lieq_mlx.kernel_layers import kernels_status
    except ImportError:
        return "active" if platform.metal_available() else "off (no Metal: mx.quantized_matmul is used)"
    return kernels_status()


def run(args, console) -> int:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mlx_lm_version = version("mlx-lm")
    except PackageNotFoundError:
        mlx_lm_version = "not installed"
    demo_dir = models.demo_model_dir()
    try:
        demo_source = str(models.demo_gguf_path())
    except models.DemoModelMissingError as error:
        demo_source = f"missing: {error}"

    table = FactList()
    table.add_row("lieq-mlx", lieq_mlx.__version__)
    table.add_row("mlx", mx.__version__)
    table.add_row("mlx-lm", mlx_lm_version)
    table.add_row("python", host.python_version())
    table.add_row("system", f"{host.system()} {host.machine()}")
    table.add_row("device", platform.device_name())
    table.add_row("compute dtype", str(platform.compute_dtype()).replace("mlx.core.", ""))
    blas = platform.blas_in_use()
    if blas == "reference" and platform.find_openblas() is None and host.system() == "Linux":
        blas += " (slow; install Debian's libopenblas0-pthread)"
    table.add_row("BLAS", blas)
    table.add_row("custom kernels", kernel_status())
    table.add_row("cache", str(models.cache_dir()))
    cached = "imported" if (demo_dir / "config.json").is_file() else "not imported yet"
    table.add_row("demo model", f"{demo_dir} ({cached})")
    table.add_row("demo GGUF", demo_source)
    table.print(console)
    return 0


class FactList:
    """Name and value lines, aligned, never wrapped: paths stay whole for copying."""

    def __init__(self):
        self.rows: list[tuple[str, str]] = []

    def add_row(self, name: str, value: str) -> None:
        self.rows.append((name, value))

    def print(self, console) -> None:
        width = max(len(name) for name, _ in self.rows)
        for name, value in self.rows:
            line = Text.assemble((name.ljust(width), "bold"), "  ", value)
            console.print(line, soft_wrap=True)
