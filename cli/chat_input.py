"""Line input of the chat REPL: readline editing and history, and multi-line messages.

A message spans several lines in two ways:
- a line that ends with a backslash continues on the next line;
- a line that starts with three double quotes opens a block that ends at the line ending
  with three double quotes (both may sit on one line).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

try:
    import readline
except ImportError:  # Windows builds of Python ship without readline.
    readline = None

HISTORY_LENGTH = 1000
BLOCK_QUOTE = '"""'
CONTINUATION_PROMPT = "... "

ReadLine = Callable[[str], str]


class InputCancelled(Exception):
    """Ctrl-C at a continuation prompt: the partly typed message is dropped."""


def load_history(path: Path) -> None:
    """Read the readline history file, creating its folder; do nothing without readline."""
    if readline is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    readline.set_history_length(HISTORY_LENGTH)
    if path.is_file():
        try:
            readline.read_history_file(str(path))
        except OSError:
            pass  # An unreadable history file only costs the old entries.


def save_history(path: Path) -> None:
    """Write the readline history file; do nothing without readline."""
    if readline is None:
        return
    try:
        readline.write_history_file(str(path))
    except OSError:
        pass  # A read-only cache folder only costs the new entries.


def read_message(read_line: ReadLine, prompt: str) -> str:
    """Read one message, joining continued lines and quoted blocks with newlines.

    Raises EOFError at end of input and KeyboardInterrupt for Ctrl-C at the first prompt.
    Ctrl-C at a continuation prompt raises `InputCancelled`.
    """
    line = read_line(prompt)
    try:
        if line.lstrip().startswith(BLOCK_QUOTE):
            return _read_block(read_line, line.lstrip()[len(BLOCK_QUOTE):])
        parts = []
        while line.endswith("\\"):
            parts.append(line[:-1])
            line = read_line(CONTINUATION_PROMPT)
        parts.append(line)
        return "\n".join(parts)
    except KeyboardInterrupt:
        raise InputCancelled from None


def _read_block(read_line: ReadLine, first: str) -> str:
    lines = []
    line = first
    while not line.rstrip().endswith(BLOCK_QUOTE):
        lines.append(line)
        line = read_line(CONTINUATION_PROMPT)
    lines.append(line.rstrip()[: -len(BLOCK_QUOTE)])
    # The lines holding only the quotes add no text.
    if not lines[-1].strip():
        lines.pop()
    if lines and not lines[0].strip():
        lines.pop(0)
    return "\n".join(lines)
