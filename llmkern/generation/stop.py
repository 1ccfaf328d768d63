"""When a request's output ends, and what text of it may be streamed.

StopStringMatcher works on streamed text: a stop string may span several tokens, so text that could still be the
start of a stop string is held back until the next text decides it; on a match the output is cut before the stop
string (OpenAI / vLLM semantics). OutputStream puts one request's pieces together: token ids in, text deltas and a
finish reason out (EOS, stop_token_ids, stop strings, max_tokens).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from llmkern.generation.detokenizer import IncrementalDetokenizer
from llmkern.generation.sampling import SamplingParams


class StopStringMatcher:
    """Feed streamed text pieces; get back the text that is safe to emit. After a match, `stopped` is True,
    `matched` is the stop string and nothing more is accepted."""

    def __init__(self, stop: Sequence[str], include_stop_str_in_output: bool = False):
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
        self.stop = tuple(stop)
        self.include_stop = include_stop_str_in_output
        self._held = ""
        self.stopped = False
        self.matched: str | None = None

    def _held_back(self, text: str) -> int:
        """Length of the longest end of `text` that is a proper start of some stop string."""
        longest = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def feed(self, text: str) -> str:
        if self.stopped:
            raise RuntimeError("StopStringMatcher.feed after a stop string matched")
        if not self.stop:
            return text
        buffer = self._held + text
        # The earliest stop string wins (the longest one on a tie): the output is cut there.
        best = None
        for s in self.stop:
            at = buffer.find(s)
            if at >= 0 and (best is None or at < best[0] or (at == best[0] and len(s) > len(best[1]))):
                best = (at, s)
        if best is not None:
            at, s = best
            self.stopped, self.matched, self._held = True, s, ""
            return buffer[: at + len(s)] if self.include_stop else buffer[:at]
        keep = self._held_back(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """At the end of the output (no stop string followed): the held-back text."""
        held, self._held = self._held, ""
        return held


class OutputStream:
    """One request's output. `append(token_id)` returns (text_delta, finish_reason), finish_reason None while
    the request goes on, else "stop" (EOS, a stop token id or a stop string; `stop_reason` says which) or
    "length" (max_tokens). Call `finish()` if generation ends for another reason (the model's length) to get the
    text still held back. `text` is everything emitted, `token_ids` every generated token (the stopping one too).

    EOS and stop token ids end the output without adding their text (unless include_stop_str_in_output)."""

    def __init__(
        self, tokenizer, params: SamplingParams, prompt_ids: Iterable[int] = (), eos_token_ids: Iterable[int] = ()
    ):
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
        self.matcher = StopStringMatcher(params.stop_strings, params.include_stop_str_in_output)
        self.eos_token_ids = frozenset(() if params.ignore_eos else (int(t) for t in eos_token_ids))
        self.stop_token_ids = frozenset(params.stop_token_ids)
        self.token_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _end(self, reason: str, stop_reason=None) -> str:
        """Finish: the detokenizer's held text goes through the matcher (it may still hold a stop string)."""
        text = self.matcher.feed(self.detokenizer.flush())
        if self.matcher.stopped:
            reason, stop_reason = "stop", self.matcher.matched
        else:
            text += self.matcher.flush()
        self.finish_reason, self.stop_reason = reason, stop_reason
        return text

    def append(self, token_id: int) -> tuple[str, str | None]:
        if self.finished:
            raise RuntimeError(f"OutputStream.append after the output finished ({self.finish_reason})")
        token_id = int(token_id)
        self.token_ids.append(token_id)
        if token_id in self.eos_token_ids or token_id in self.stop_token_ids:
            delta = self._end("stop", token_id)
            if self.params.include_stop_str_in_output and self.finish_reason == "stop" and self.stop_reason == token_id:
                tokenizer = self.detokenizer.tokenizer
                delta += tokenizer.decode([token_id], skip_special_tokens=self.params.skip_special_tokens)
        else:
            delta = self.matcher.feed(self.detokenizer.add(token_id))
            if self.matcher.stopped:
                self.finish_reason, self.stop_reason = "stop", self.matcher.matched
            elif self.params.max_tokens is not None and len(self.token_ids) >= self.params.max_tokens:
                delta += self._end("length")
        self.text += delta
        return delta, self.finish_reason

    def finish(self, reason: str = "length") -> str:
        """End the output from outside (e.g. the model's context is full); returns the held-back text."""
        if self.finished:
            return ""
        delta = self._end(reason)
        self.text += delta
        return delta
