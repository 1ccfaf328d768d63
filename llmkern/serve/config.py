"""The serving engine's configuration (what `llmkern serve`'s flags set)."""

from __future__ import annotations

from dataclasses import dataclass

SPECULATIVE_METHODS = ("draft", "ngram")
# Without --kv-cache-memory the cache takes this fraction of the memory that is available at startup (MemAvailable
# on CPU, free device memory on CUDA), but never more than max_num_seqs sequences of max_model_len tokens need.
DEFAULT_KV_CACHE_FRACTION = 0.1


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")


@dataclass
class EngineConfig:
    """block_size: tokens per KV-cache block. kv_cache_memory: bytes for the KV cache (target and draft
    together); None: DEFAULT_KV_CACHE_FRACTION of the available memory. max_model_len: None is the model's
    max_position_embeddings. max_num_batched_tokens: the per-step token budget (prefill chunks and decodes
    share it). max_waiting: requests beyond this many waiting ones are refused (HTTP 429).
    speculative: None, "draft" (draft_model: its directory, same tokenizer) or "ngram" (prompt lookup over
    the sequence's own tokens, ngram_min..ngram_max tokens long), proposing num_speculative_tokens a step."""

    block_size: int = 16
    kv_cache_memory: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_waiting: int = 256
    enable_prefix_caching: bool = True
    speculative: str | None = None
    draft_model: str | None = None
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4

    def __post_init__(self):
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting",
                     "num_speculative_tokens", "ngram_min", "ngram_max"):
            _positive_int(name, getattr(self, name))
        for name in ("kv_cache_memory", "max_model_len"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.speculative not in (None, *SPECULATIVE_METHODS):
            raise ValueError(f"speculative: expected None or one of {SPECULATIVE_METHODS}, got {self.speculative!r}")
        if (self.speculative == "draft") != (self.draft_model is not None):
            raise ValueError("draft_model: needed with speculative='draft' and only then, got "
                             f"speculative={self.speculative!r}, draft_model={self.draft_model!r}")
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min, ngram_max: expected min <= max, got {self.ngram_min} > {self.ngram_max}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching: expected a bool, got {self.enable_prefix_caching!r}")

    @property
    def lookahead(self) -> int:
        """KV slots a decoding sequence needs beyond its next token: its draft tokens."""
        return self.num_speculative_tokens if self.speculative else 0
