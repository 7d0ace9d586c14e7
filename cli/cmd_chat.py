"""`lieq-mlx chat`: a local chat REPL, or one reply for scripts with --prompt or piped input.

Reply text streams to standard output with plain writes. The header, notices and the
statistics line go to standard error through the rich console. Ctrl-C during a reply stops
that reply and keeps the session: the partial reply stays in the conversation.
"""

from __future__ import annotations

import argparse
import signal
import sys

from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from lieq_mlx import chat
from lieq_mlx.errors import LieqError
from lieq_mlx.models import cache_dir, load_model, resolve_model
from lieq_mlx.platform import compute_dtype, device_name, metal_available
from lieq_mlx.weight_bits import read_weight_bits
from lieq_mlx_cli.chat_input import (
    load_history,
    read_message_interruptible,
    restore_terminal,
    save_history,
    save_terminal,
)
from lieq_mlx_cli.console import print_error
from lieq_mlx_cli.options import add_model_option

NAME = "chat"
HELP = "chat with a model in the terminal, or answer one prompt (--prompt or piped input)"
HISTORY_FILE = "chat_history"
PROMPT = ">>> "

HELP_TEXT = """\
Commands:
  /help           show this help
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt and keep the conversation; /system alone
                  restores the model's default
  /stats          token counts, prefill and generation speed and peak memory
  /quit           leave (Ctrl-D at the prompt does the same)

Input:
  A line ending with \\ continues on the next line.
  A line starting with \"\"\" opens a block that ends at a line ending with \"\"\".
  Up and down arrows recall earlier lines; the history is kept in {history}.

Ctrl-C during a reply stops it; the partial reply stays in the conversation.
Ctrl-C at the prompt, a continuation prompt included, leaves.
When the conversation outgrows the context window, the oldest turns are dropped."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_option(parser)
    parser.add_argument("--system", help="system prompt (default: the chat template's own)")
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=chat.DEFAULT_MAX_TOKENS,
        help=f"maximum tokens per reply (default {chat.DEFAULT_MAX_TOKENS})",
    )
    parser.add_argument(
        "--temp",
        type=float,
        default=chat.DEFAULT_TEMP,
        help=f"sampling temperature; 0 picks the most likely token (default {chat.DEFAULT_TEMP})",
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=chat.DEFAULT_TOP_P,
        help=f"nucleus sampling: sample from the smallest token set of this total probability "
        f"(default {chat.DEFAULT_TOP_P})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of sampling (default 0)")
    parser.add_argument(
        "--max-kv-size",
        type=int,
        default=None,
        help="maximum tokens kept in the key-value cache; also caps the context window "
        "(default: the model's max_position_embeddings)",
    )
    parser.add_argument(
        "--prompt",
        help="answer this prompt once, print only the reply to standard output and exit; "
        "without it, piped standard input is read as the prompt",
    )


def run(args: argparse.Namespace, console: Console) -> int:
    interactive = args.prompt is None and sys.stdin.isatty()
    prompt = args.prompt
    if not interactive and prompt is None:
        # Strip the trailing newline of piped text (echo adds one), because the model would see it.
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise LieqError("standard input is empty; pipe a prompt in or pass --prompt TEXT")
    if not interactive and not prompt.strip():
        raise LieqError(f"--prompt {prompt!r} is empty; pass the text to answer, e.g. --prompt 'Hello'")

    with console.status(f"loading {args.model}"):
        folder = resolve_model(args.model)
        model, tokenizer = load_model(args.model)
        kernel_status = install_kernels(model)
    session = chat.ChatSession(
        model,
        tokenizer,
        system=args.system,
        max_tokens=args.max_tokens,
        temp=args.temp,
        top_p=args.top_p,
        seed=args.seed,
        max_kv_size=args.max_kv_size,
    )

    if not interactive:
        stream_reply(session, prompt, console, show_stats=False)
        return 0

    print_header(console, args, folder, model, kernel_status, session)
    return repl(session, console)


def install_kernels(model) -> str:
    """Install the custom kernel layers when that module exists; return the status line."""
    try:
        from lieq_mlx import kernel_layers
    except ImportError:
        return "off (no Metal)" if not metal_available() else "off (kernel layers not available)"
    kernel_layers.install_kernels(model)
    return kernel_layers.kernels_status(model)


def print_header(console: Console, args, folder, model, kernel_status: str, session: chat.ChatSession) -> None:
    bits = read_weight_bits(model, folder)
    dtype = str(compute_dtype()).replace("mlx.core.", "")
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("model", f"{folder.name}  [dim]{folder}[/dim]")
    grid.add_row("bits", bits.describe())
    grid.add_row("device", f"{device_name()}, computing in {dtype}")
    grid.add_row("custom kernels", kernel_status)
    grid.add_row(
        "context",
        f"{session.context_length} tokens, up to {session.max_tokens} tokens per reply, "
        f"temp {args.temp}, top-p {args.top_p}, seed {args.seed}",
    )
    if session.system:
        grid.add_row("system", session.system)
    console.print(Panel(grid, title="lieq-mlx chat", title_align="left", expand=False))
    console.print("[dim]Type /help for commands; Ctrl-D or /quit leaves.[/dim]")


def repl(session: chat.ChatSession, console: Console) -> int:
    """Read messages and commands until /quit, end of input or Ctrl-C at the prompt."""
    history_path = cache_dir() / HISTORY_FILE
    load_history(history_path)
    terminal_settings = save_terminal()
    try:
        while True:
            try:
                text = read_message_interruptible(PROMPT)
            except (EOFError, KeyboardInterrupt):
                restore_terminal(terminal_settings)
                sys.stdout.write("\n")
                sys.stdout.flush()
                return 0
            if not text.strip():
                continue
            if text.startswith("/") and "\n" not in text:
                if not run_command(text, session, console, history_path):
                    return 0
                continue
            try:
                stream_reply(session, text, console, show_stats=True)
            except chat.PromptTooLongError as error:
                print_error(console, str(error))
            except KeyboardInterrupt:
                # Ctrl-C just before or after the reply's SIGINT handler was installed.
                sys.stdout.write("\n")
                console.print("[yellow]reply stopped by Ctrl-C[/yellow]")
    finally:
        save_history(history_path)


def run_command(line: str, session: chat.ChatSession, console: Console, history_path) -> bool:
    """Run one slash command; return False when the REPL should end."""
    name, _, argument = line.partition(" ")
    argument = argument.strip()
    if name in ("/quit", "/exit", "/bye"):
        return False
    if name == "/help":
        console.print(Text(HELP_TEXT.format(history=history_path)))
    elif name == "/reset":
        session.reset()
        console.print("[dim]conversation cleared[/dim]")
    elif name == "/system":
        session.set_system(argument or None)
        shown = f"system prompt set: {argument}" if argument else "system prompt restored to the model's default"
        console.print(Text(shown, style="dim"))
    elif name == "/stats":
        print_stats(session, console)
    else:
        print_error(console, f"unknown command {name}; type /help for the list")
    return True


class StopFlag:
    """A SIGINT handler that records Ctrl-C instead of raising KeyboardInterrupt."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopFlag":
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __call__(self) -> bool:
        return self.requested


def stream_reply(session: chat.ChatSession, text: str, console: Console, show_stats: bool) -> None:
    """Generate one reply, writing its text to standard output as it arrives."""
    with StopFlag() as stop:
        reply = session.ask(text, should_stop=stop)
        if reply.dropped_turns:
            console.print(
                f"[yellow]dropped the oldest {reply.dropped_turns} turn(s) to fit the context "
                f"window of {session.context_length} tokens[/yellow]"
            )
        ends_with_newline = True
        for segment in reply:
            sys.stdout.write(segment)
            sys.stdout.flush()
            ends_with_newline = segment.endswith("\n")
    if not ends_with_newline or not reply.text:
        sys.stdout.write("\n")
        sys.stdout.flush()

    if not show_stats:
        return
    stats = reply.stats
    if stats.finish_reason == "interrupted":
        kept = "the partial reply stays in the conversation" if reply.text else "nothing was kept"
        console.print(f"[yellow]reply stopped by Ctrl-C; {kept}[/yellow]")
    elif stats.finish_reason == "length":
        console.print(f"[yellow]reply cut at {stats.generation_tokens} tokens (--max-tokens or the context window)[/yellow]")
    console.print(
        f"[dim]{stats.generation_tokens} tokens at {stats.generation_tokens_per_second:.1f} tokens/s "
        f"generation; prompt {stats.prefill_tokens} new of {stats.prompt_tokens} tokens at "
        f"{stats.prefill_tokens_per_second:.1f} tokens/s prefill[/dim]"
    )


def print_stats(session: chat.ChatSession, console: Console) -> None:
    last = session.last_stats
    total = session.stats
    if last is None:
        console.print("[dim]no reply yet[/dim]")
        return
    table = Table(title="chat statistics", title_justify="left")
    table.add_column("measure")
    table.add_column("last reply", justify="right")
    table.add_column(f"session ({total.replies} replies)", justify="right")
    table.add_row("prompt tokens (whole conversation)", str(last.prompt_tokens), "")
    table.add_row("prefill tokens (not in the prompt cache)", str(last.prefill_tokens), str(total.prefill_tokens))
    table.add_row(
        "prefill speed (tokens/s)",
        f"{last.prefill_tokens_per_second:.1f}",
        f"{total.prefill_tokens_per_second:.1f}",
    )
    table.add_row("generated tokens", str(last.generation_tokens), str(total.generation_tokens))
    table.add_row(
        "generation speed (tokens/s after the first token)",
        f"{last.generation_tokens_per_second:.1f}",
        f"{total.generation_tokens_per_second:.1f}",
    )
    table.add_row(
        "peak memory (MB, mx.get_peak_memory)",
        f"{last.peak_memory_bytes / 1e6:.0f}",
        f"{total.peak_memory_bytes / 1e6:.0f}",
    )
    table.add_row("tokens in the prompt cache now", str(len(session.cached_tokens)), "")
    console.print(table)
