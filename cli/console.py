"""Terminal output shared by the commands: one console, error lines, progress bars."""

from __future__ import annotations

from contextlib import contextmanager

from rich.console import Console
from rich.text import Text
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)


def make_console() -> Console:
    # Messages go to standard error so that standard output carries only results
    # (a chat reply in --prompt mode, JSON) and stays usable in pipes.
    return Console(stderr=True, highlight=False)


def print_error(console: Console, message: str) -> None:
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


@contextmanager
def progress_bar(console: Console):
    """A rich progress display for steps over a second or two; yields `Progress`."""
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        yield progress


def progress_callback(progress: Progress, description: str):
    """Return a `callback(done, total)` that drives one task of `progress`."""
    task = progress.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        progress.update(task, completed=done, total=total)

    return update
