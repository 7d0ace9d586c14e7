"""Line input of the chat REPL: readline editing and history, and multi-line messages.

A message spans several lines in two ways:
- a line that ends with a backslash continues on the next line;
- a line that starts with three double quotes opens a block that ends at the line ending
  with three double quotes (both may sit on one line).
"""

from __future__ import annotations

import queue
import sys
import threading
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

    Raises EOFError at end of input.
    """
    line = read_line(prompt)
    if line.lstrip().startswith(BLOCK_QUOTE):
        return _read_block(read_line, line.lstrip()[len(BLOCK_QUOTE):])
    parts = []
    while line.endswith("\\"):
        parts.append(line[:-1])
        line = read_line(CONTINUATION_PROMPT)
    parts.append(line)
    return "\n".join(parts)


def read_message_interruptible(prompt: str) -> str:
    """Read one message with `input` on a helper thread; Ctrl-C raises KeyboardInterrupt here.

    The kernel may deliver SIGINT to any thread of the process (MLX and OpenBLAS start
    several), and then readline's wait for a key in the main thread is never interrupted.
    The main thread therefore only waits on a queue, with a timeout, and Python raises
    KeyboardInterrupt there whichever thread received the signal. After a Ctrl-C the helper
    thread stays blocked in readline, so the caller must leave, after `restore_terminal`.
    Raises EOFError at end of input.
    """
    results: queue.Queue = queue.Queue()

    def read() -> None:
        try:
            results.put((True, read_message(input, prompt)))
        except BaseException as error:  # passed on to the main thread
            results.put((False, error))

    threading.Thread(target=read, name="chat-input", daemon=True).start()
    while True:
        try:
            ok, value = results.get(timeout=0.1)
        except queue.Empty:
            continue
        if ok:
            return value
        raise value


def save_terminal():
    """Return the terminal settings of standard input, or None when it is not a terminal."""
    try:
        import termios

        return termios.tcgetattr(sys.stdin.fileno())
    except (ImportError, OSError, ValueError):
        return None


def restore_terminal(settings) -> None:
    """Restore terminal settings that readline, interrupted mid-line, left changed."""
    if settings is None:
        return
    import termios

    try:
        termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, settings)
    except (OSError, termios.error):
        pass


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
