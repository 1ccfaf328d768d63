"""Incremental detokenization for streaming: text out as tokens come in, only ever complete text.

Decoding one token at a time is wrong twice over: a byte-level BPE token may hold only part of a UTF-8 character
(an emoji is often 2-4 tokens), which decodes to U+FFFD until the rest arrives, and SentencePiece-style decoders
drop a leading space at the start of a decode. So, as vLLM does (`detokenize_incrementally`), each step decodes a
small window twice, from the same start token: once up to the last emitted token and once up to the new token,
and emits the difference, unless the new text ends in U+FFFD (an incomplete character: wait for more tokens).
The window starts a few tokens back, in the prompt at first, so the first generated token decodes in context.
"""

from __future__ import annotations

from collections.abc import Iterable

# Prompt tokens decoded with the first generated ones, so a leading space or merge decodes in context (vLLM's 5).
_PROMPT_CONTEXT = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Feed generated token ids one at a time (`add`), get the new text each makes complete; `flush` at the end
    returns whatever was held back. The concatenation of everything returned is the text the generated tokens
    add to the prompt: decode(prompt + generated) minus decode(prompt). For byte-level BPE (Llama 3, Qwen)
    that is decode(generated); SentencePiece-style decoders (Llama 2, Mistral) drop the leading space of a
    decode's first token, which the stream keeps (" world" after "Hello", as vLLM streams it)."""

    def __init__(self, tokenizer, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        prompt_ids = list(prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)
        self._ids = prompt_ids[-_PROMPT_CONTEXT:]
        self._prefix = 0  # the window's first token
        self._read = len(self._ids)  # tokens up to here have been emitted
        self.generated: list[int] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _step(self, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""  # nothing visible yet (a skipped special token) or an unfinished character
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    def add(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character or merge is still incomplete)."""
        self._ids.append(int(token_id))
        self.generated.append(int(token_id))
        return self._step(final=False)

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(t) for t in token_ids)

    def flush(self) -> str:
        """At the end of generation: the held-back text, incomplete characters (as U+FFFD) included."""
        return self._step(final=True) if self._read < len(self._ids) else ""
