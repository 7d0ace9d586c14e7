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
    """Yield a rich `Progress` display for steps that take more than a second or two."""
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


class StageProgress:
    """Progress bars keyed by stage name, for library callbacks `(stage, done, total)`."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.tasks: dict[str, int] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


# One block per width, from 1 to 8 bits, for compact per-layer strips.
_BLOCKS = {1: "▁", 2: "▂", 3: "▃", 4: "▄", 5: "▅", 6: "▆", 8: "█"}
_COLORS = {1: "red", 2: "yellow", 3: "cyan", 4: "green", 5: "blue", 6: "magenta", 8: "white"}


def bit_strip(allocation) -> Text:
    """Render per-layer widths as a strip of digits over coloured blocks, one per layer."""
    text = Text()
    for bits in allocation:
        text.append(str(bits), style=_COLORS.get(bits, "white"))
    text.append("\n")
    for bits in allocation:
        text.append(_BLOCKS.get(bits, "?"), style=_COLORS.get(bits, "white"))
    return text
