"""A multi-turn chat with a loaded model: messages, prompt cache and timing statistics.

`ChatSession` renders the whole conversation with the tokenizer's chat template on every
turn, but feeds the model only the tokens that its prompt cache does not already hold. The
session keeps the token ids in the cache (`cached_tokens`), compares them with the new
prompt's ids, trims the cache back to the common prefix with
`mlx_lm.models.cache.trim_prompt_cache` and prefills the rest. Generation runs through
`mlx_lm.generate.stream_generate`.

The context window is the model's `max_position_embeddings`, or `max_kv_size` when that is
smaller. A conversation that no longer fits loses its oldest turns first, and the reply
reports how many it dropped.

A reply that stops early (its `should_stop` callback returns True, the caller stops
iterating, or an exception) keeps its partial text in the history when it produced any, and
otherwise leaves the user message out of the history too. The library never prints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import make_sampler

from lieq_mlx.errors import LieqError, UnsupportedModelError

DEFAULT_MAX_TOKENS = 512
DEFAULT_TEMP = 0.7
DEFAULT_TOP_P = 0.9
# Prompt tokens fed per model call. Smaller than mlx-lm's 2048 so that a stop request
# during a long prefill is seen within a second or two on a CPU.
PREFILL_STEP_SIZE = 512
# NOTE: used only when the model's arguments carry no max_position_embeddings; it is a
# guess, so pass `context_length` for such models.
FALLBACK_CONTEXT_LENGTH = 4096

Message = dict[str, str]


class PromptTooLongError(LieqError):
    """The newest user message alone does not fit the context window."""


class EmptyMessageError(LieqError):
    """A user message with no text."""


@dataclass
class ReplyStats:
    """Token counts and timings of one reply.

    `prompt_tokens` counts the whole rendered conversation; `prefill_tokens` counts the
    part of it the model processed because the prompt cache did not hold it.
    `generation_tokens` counts every sampled token, the end-of-sequence token included.
    """

    prompt_tokens: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_bytes: int = 0
    finish_reason: str = "interrupted"  # "stop", "length" or "interrupted"

    @property
    def prefill_tokens_per_second(self) -> float:
        """Prefill tokens per second of the time until the first sampled token."""
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        """Sampled tokens after the first, per second of time after the first token."""
        decoded = self.generation_tokens - 1
        return decoded / self.generation_seconds if decoded > 0 and self.generation_seconds > 0 else 0.0


@dataclass
class SessionStats:
    """Totals over every reply of a session since it was created (a reset keeps them)."""

    replies: int = 0
    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    generation_tokens: int = 0
    generation_seconds: float = 0.0
    peak_memory_bytes: int = 0

    def add(self, reply: ReplyStats) -> None:
        """Add one reply's counts and times; keep the larger peak memory."""
        self.replies += 1
        self.prefill_tokens += reply.prefill_tokens
        self.prefill_seconds += reply.prefill_seconds
        self.generation_tokens += reply.generation_tokens
        self.generation_seconds += reply.generation_seconds
        self.peak_memory_bytes = max(self.peak_memory_bytes, reply.peak_memory_bytes)

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prefill_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def generation_tokens_per_second(self) -> float:
        """Sampled tokens after each reply's first, per second of time after the first token."""
        decoded = self.generation_tokens - self.replies
        return decoded / self.generation_seconds if decoded > 0 and self.generation_seconds > 0 else 0.0


@dataclass
class Reply:
    """One assistant reply. Iterate it to generate and stream its text segments.

    `dropped_turns` is known before iteration starts; `text` and `stats` are complete once
    iteration ends. A reply that is never iterated changes nothing in the session.
    """

    dropped_turns: int
    prompt_tokens: int
    text: str = ""
    stats: ReplyStats = field(default_factory=ReplyStats)
    _segments: Iterator[str] | None = field(default=None, repr=False)

    def __iter__(self) -> Iterator[str]:
        return self._segments if self._segments is not None else iter(())

    def close(self) -> None:
        """Stop generating; the session keeps what was generated so far."""
        if self._segments is not None:
            self._segments.close()


class _PrefillStopped(Exception):
    """Raised from the prefill progress callback when the caller requested a stop."""

    def __init__(self, processed: int) -> None:
        super().__init__(processed)
        self.processed = processed


def common_prefix_length(first: list[int], second: list[int]) -> int:
    """Return how many leading token ids the two lists share."""
    length = 0
    for a, b in zip(first, second):
        if a != b:
            break
        length += 1
    return length


def model_context_length(model: nn.Module) -> int:
    """Return the model's `max_position_embeddings`, or the fallback when it has none."""
    value = getattr(getattr(model, "args", None), "max_position_embeddings", None)
    return int(value) if value else FALLBACK_CONTEXT_LENGTH


class ChatSession:
    """A conversation with one model that reuses its prompt cache between turns."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        system: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temp: float = DEFAULT_TEMP,
        top_p: float = DEFAULT_TOP_P,
        seed: int | None = None,
        max_kv_size: int | None = None,
        context_length: int | None = None,
    ) -> None:
        if getattr(tokenizer, "chat_template", None) is None:
            raise UnsupportedModelError(
                "the model's tokenizer has no chat template; chat needs an instruction-tuned "
                "model whose tokenizer_config.json or chat_template.jinja defines one"
            )
        if max_tokens < 1:
            raise LieqError(f"--max-tokens {max_tokens} is invalid; pass a positive number of tokens")
        if temp < 0:
            raise LieqError(f"--temp {temp} is invalid; pass 0 (most likely token) or more")
        if not 0 < top_p <= 1:
            raise LieqError(f"--top-p {top_p} is invalid; pass a probability in (0, 1]")
        if max_kv_size is not None and max_kv_size < 64:
            raise LieqError(f"--max-kv-size {max_kv_size} is too small; pass at least 64 tokens")
        self.model = model
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.max_kv_size = max_kv_size
        limits = [context_length or model_context_length(model)]
        if max_kv_size is not None:
            limits.append(max_kv_size)
        self.context_length = min(limits)
        self.sampler = make_sampler(temp, top_p)
        if seed is not None:
            mx.random.seed(seed)

        self.system = system or None
        self.stats = SessionStats()
        self.last_stats: ReplyStats | None = None
        self._messages: list[Message] = []
        self._cache = make_prompt_cache(model, max_kv_size)
        self._cache_tokens: list[int] = []
        self._active: Reply | None = None

    @property
    def messages(self) -> list[Message]:
        """Return a copy of the conversation without the system message."""
        return [dict(message) for message in self._messages]

    @property
    def cached_tokens(self) -> list[int]:
        """Return a copy of the token ids whose keys and values the prompt cache holds."""
        return list(self._cache_tokens)

    def reset(self) -> None:
        """Forget the conversation and empty the prompt cache; keep the system prompt and totals."""
        self._messages = []
        self._reset_cache()

    def set_system(self, text: str | None) -> None:
        """Set the system prompt (None or empty restores the template's default); keep the turns.

        The next turn prefills the whole conversation again, because its first tokens change.
        """
        self.system = text or None

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
        """Return the token ids of `messages` after the system prompt, rendered by the chat template."""
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        try:
            ids = self.tokenizer.apply_chat_template(full, add_generation_prompt=add_generation_prompt)
        except Exception as error:  # jinja2 raises TemplateError subclasses for unsupported roles
            if not self.system or "system" not in str(error).lower():
                raise
            # Templates such as Gemma's reject a system role: prepend it to the first user turn.
            merged = [dict(message) for message in messages]
            merged[0]["content"] = f"{self.system}\n\n{merged[0]['content']}"
            ids = self.tokenizer.apply_chat_template(merged, add_generation_prompt=add_generation_prompt)
        return list(ids)

    def ask(self, text: str, should_stop: Callable[[], bool] | None = None) -> Reply:
        """Add a user message and return the assistant's reply, generated as it is iterated.

        Drops the oldest turns while the conversation and room for the reply exceed the
        context window. `should_stop` is polled between prefill steps and after each token.
        Raises `EmptyMessageError` for blank text and `PromptTooLongError` when the new
        message alone does not fit.
        """
        if not text.strip():
            raise EmptyMessageError("the message is empty; type some text")
        if self._active is not None:
            # The caller stopped iterating the previous reply without closing it.
            self._active.close()

        user = {"role": "user", "content": text}
        history = list(self._messages)
        reserve = min(self.max_tokens, self.context_length // 4)
        dropped = 0
        prompt_ids = self.render(history + [user])
        while len(prompt_ids) + reserve > self.context_length and history:
            history = self._drop_oldest_turn(history)
            dropped += 1
            prompt_ids = self.render(history + [user])
        if len(prompt_ids) + reserve > self.context_length:
            raise PromptTooLongError(
                f"the message takes {len(prompt_ids)} tokens with the template, and a reply needs "
                f"{reserve} more, over the context window of {self.context_length} tokens; "
                "send a shorter message or raise --max-kv-size"
            )

        max_tokens = min(self.max_tokens, self.context_length - len(prompt_ids))
        reply = Reply(dropped_turns=dropped, prompt_tokens=len(prompt_ids))
        reply._segments = self._generate(reply, history, user, prompt_ids, max_tokens, should_stop)
        self._active = reply
        return reply

    @staticmethod
    def _drop_oldest_turn(history: list[Message]) -> list[Message]:
        # A turn is one user message and the replies that follow it up to the next user message.
        end = 1
        while end < len(history) and history[end]["role"] != "user":
            end += 1
        return history[end:]

    def _reset_cache(self) -> None:
        self._cache = make_prompt_cache(self.model, self.max_kv_size)
        self._cache_tokens = []

    def _align_cache(self, prompt_ids: list[int]) -> int:
        """Trim the cache to its common prefix with `prompt_ids`; return the prefix length.

        At least the last prompt token is always left to feed, since its logits give the
        first reply token.
        """
        common = min(common_prefix_length(self._cache_tokens, prompt_ids), len(prompt_ids) - 1)
        excess = len(self._cache_tokens) - common
        if excess == 0:
            return common
        if can_trim_prompt_cache(self._cache) and trim_prompt_cache(self._cache, excess) == excess:
            del self._cache_tokens[common:]
            return common
        # A rotating cache that has wrapped around, or a cache kind without trim, starts over.
        self._reset_cache()
        return 0

    def _cache_consistent(self) -> bool:
        offsets = [getattr(layer_cache, "offset", None) for layer_cache in self._cache]
        return all(offset is None or offset == len(self._cache_tokens) for offset in offsets)

    def _generate(
        self,
        reply: Reply,
        history: list[Message],
        user: Message,
        prompt_ids: list[int],
        max_tokens: int,
        should_stop: Callable[[], bool] | None,
    ) -> Iterator[str]:
        self._messages = history
        stop_requested = should_stop or (lambda: False)
        stats = reply.stats
        stats.prompt_tokens = len(prompt_ids)
        common = self._align_cache(prompt_ids)
        feed = prompt_ids[common:]
        stats.prefill_tokens = len(feed)

        def on_prefill(processed: int, total: int) -> None:
            if processed < total and stop_requested():
                raise _PrefillStopped(processed)

        generated: list[int] = []
        segments: list[str] = []
        failed = False
        responses = None
        mx.reset_peak_memory()
        start = time.perf_counter()
        first_token_time = start
        try:
            responses = stream_generate(
                self.model,
                self.tokenizer,
                mx.array(feed),
                max_tokens=max_tokens,
                sampler=self.sampler,
                prompt_cache=self._cache,
                prefill_step_size=PREFILL_STEP_SIZE,
                prompt_progress_callback=on_prefill,
            )
            for response in responses:
                now = time.perf_counter()
                if not generated:
                    first_token_time = now
                    stats.prefill_seconds = now - start
                stats.generation_seconds = now - first_token_time
                # Every token that stream_generate returns has already been fed to the cache:
                # it dispatches the next step, with this token as input, before returning it.
                generated.append(response.token)
                if response.finish_reason is not None:
                    stats.finish_reason = response.finish_reason
                if response.text:
                    segments.append(response.text)
                    yield response.text
                if response.finish_reason is None and stop_requested():
                    break
        except _PrefillStopped as stopped:
            stats.prefill_tokens = stopped.processed
            stats.prefill_seconds = time.perf_counter() - start
            feed = feed[: stopped.processed]
        except GeneratorExit:
            # The caller stopped iterating at a yield, where the cache is consistent.
            raise
        except BaseException:
            failed = True
            raise
        finally:
            if responses is not None:
                responses.close()
            self._finish(reply, user, prompt_ids[:common] + feed, generated, segments, failed)

    def _finish(
        self,
        reply: Reply,
        user: Message,
        fed_ids: list[int],
        generated: list[int],
        segments: list[str],
        failed: bool,
    ) -> None:
        """Record the reply in the history, the cache token ids and the statistics."""
        stats = reply.stats
        stats.generation_tokens = len(generated)
        stats.peak_memory_bytes = mx.get_peak_memory()
        if stats.generation_tokens == 0:
            stats.generation_seconds = 0.0
        reply.text = "".join(segments)

        if reply.text:
            self._messages += [user, {"role": "assistant", "content": reply.text}]
        # An exception inside the model call can leave layers with different offsets, so the
        # cache is only trusted after a clean stop and a matching offset check.
        self._cache_tokens = fed_ids + generated
        if failed or not self._cache_consistent():
            self._reset_cache()

        self.last_stats = stats
        self.stats.add(stats)
        if self._active is reply:
            self._active = None
