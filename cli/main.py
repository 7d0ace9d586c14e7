"""Entry point of the `lieq-mlx` command: argument parsing and error display.

Each command lives in its own module of this package and exposes `NAME`, `HELP`,
`add_arguments(parser)` and `run(args, console) -> int`. This module only dispatches,
turns library errors into one red line, and preloads OpenBLAS on Linux before MLX runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lieq_mlx import platform

# Command modules, in the order `--help` lists them.
COMMAND_MODULES = (
    "env",
    "import_gguf",
    "analyze",
    "quantize",
    "eval",
    "chat",
    "bench",
    "demo",
)


def load_commands():
    commands = []
    for name in COMMAND_MODULES:
        try:
            commands.append(importlib.import_module(f"lieq_mlx_cli.cmd_{name}"))
        except ModuleNotFoundError as error:
            if error.name != f"lieq_mlx_cli.cmd_{name}":
                raise
    return commands


def build_parser(commands) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lieq-mlx",
        description="Mixed-precision quantization of small language models on MLX.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in commands:
        sub = subparsers.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        sub.add_argument("--debug", action="store_true", help="show tracebacks of errors")
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    platform.reexec_with_openblas()

    from lieq_mlx.errors import LieqError
    from lieq_mlx_cli.console import make_console, print_error

    commands = load_commands()
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2

    console = make_console()
    try:
        return int(args.run(args, console) or 0)
    except LieqError as error:
        if args.debug:
            console.print_exception()
        print_error(console, str(error))
        return 1
    except KeyboardInterrupt:
        print_error(console, "interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
