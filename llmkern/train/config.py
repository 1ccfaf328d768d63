"""PretrainConfig: everything a pretraining run needs, typed and validated, with named presets."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from llmkern.models.config import ModelConfig


@dataclass(frozen=True)
class PretrainConfig:
    model: ModelConfig  # its vocab_size is the tokenizer's
    max_steps: int
    # data: the corpus, its split, packing
    seq_len: int = 512  # longest packed piece (a longer document is cut into pieces)
    micro_batch_tokens: int = 8192  # tokens per forward/backward
    grad_accum: int = 1  # micro-batches per optimizer step; the loss is normalized by the step's target count
    val_every: int = 50  # every val_every-th corpus file is held out
    max_files: int | None = None  # first files of the sorted corpus only (fast tests)
    # optimizer: AdamW with decoupled weight decay on matrices and embeddings (not on norm gains, as nanoGPT),
    # linear warm-up, then cosine decay to min_lr_ratio * lr
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    bf16: bool = False  # bf16 autocast of the forward (weights and optimizer stay fp32)
    # evaluation, checkpoints, loss-spike guard
    eval_every: int = 50
    eval_tokens: int = 32768  # held-out tokens scored at each evaluation (the first of the validation stream)
    checkpoint_every: int = 50
    spike_factor: float = 2.0  # a step whose loss exceeds spike_factor x the running mean is skipped
    spike_window: int = 20  # accepted steps in the running mean (the guard waits until it is full)
    max_spikes: int = 3  # consecutive skipped steps that trigger a rollback to the last checkpoint
    seed: int = 0

    def __post_init__(self):
        for name in ("max_steps", "seq_len", "micro_batch_tokens", "grad_accum", "val_every", "eval_every",
                     "eval_tokens", "checkpoint_every", "spike_window", "max_spikes"):  # fmt: skip
            v = getattr(self, name)
            if not (_is_int(v) and v > 0):
                raise ValueError(f"PretrainConfig.{name}: expected a positive int, got {v!r}")
        for name in ("warmup_steps", "seed"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"PretrainConfig.{name}: expected an int, got {getattr(self, name)!r}")
        for name in ("lr", "min_lr_ratio", "weight_decay", "grad_clip", "spike_factor"):  # NaN would pass every test
            if not _is_finite(getattr(self, name)):
                raise ValueError(f"PretrainConfig.{name}: expected a finite number, got {getattr(self, name)!r}")
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2
                and all(_is_finite(b) and 0 <= b < 1 for b in self.betas)):
            raise ValueError(f"PretrainConfig.betas: expected two numbers in [0, 1), got {self.betas!r}")
        if not isinstance(self.bf16, bool):
            raise ValueError(f"PretrainConfig.bf16: expected a bool, got {self.bf16!r}")
        if self.val_every < 2:
            raise ValueError(f"PretrainConfig.val_every: expected >= 2 (every val_every-th file is held out, so 1 "
                             f"would leave nothing to train on), got {self.val_every}")
        if self.seq_len > self.model.max_position_embeddings:
            raise ValueError(f"PretrainConfig.seq_len: {self.seq_len} exceeds the model's max_position_embeddings "
                             f"{self.model.max_position_embeddings}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ValueError(f"PretrainConfig.warmup_steps: expected 0 <= warmup_steps <= max_steps "
                             f"({self.max_steps}), got {self.warmup_steps}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0 and self.grad_clip > 0):
            raise ValueError("PretrainConfig: expected lr > 0, 0 <= min_lr_ratio <= 1, weight_decay >= 0, "
                             f"grad_clip > 0; got {self.lr}, {self.min_lr_ratio}, {self.weight_decay}, {self.grad_clip}")
        if self.spike_factor <= 1:
            raise ValueError(f"PretrainConfig.spike_factor: expected > 1, got {self.spike_factor}")
        if self.max_files is not None and self.max_files < self.val_every:
            raise ValueError(f"PretrainConfig.max_files: expected >= val_every ({self.val_every}) so that a "
                             f"validation file exists, got {self.max_files}")

    def with_(self, **changes) -> "PretrainConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        """JSON-ready (the model as its config.json dict)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return {"model": self.model.to_hf_dict(), **{k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    """A finite int or float (not a bool)."""
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)


VOCAB = 8192
# The demo pair shares a tokenizer. An hour of this 2-core machine is a few million tokens, far fewer than these
# models could use: the loss is limited by tokens seen, not by size (a 12.3M-parameter target and the 3.2M draft
# both reached held-out loss ~4.6 after the same 2.9M tokens). So the target is sized for throughput (untied
# embeddings: the input table costs no compute, 4 layers) and reads twice the draft's tokens; both take small
# batches and many steps, since early in training the loss falls per optimizer step more than per token.
_DEMO = dict(model_type="llama", vocab_size=VOCAB, head_dim=64, rms_norm_eps=1e-5, max_position_embeddings=1024,
             tie_word_embeddings=True)
PRESETS: dict[str, PretrainConfig] = {
    "demo-target": PretrainConfig(
        ModelConfig(hidden_size=320, intermediate_size=864, num_layers=4, num_heads=5, num_kv_heads=1,
                    **{**_DEMO, "tie_word_embeddings": False}),
        max_steps=3000, micro_batch_tokens=2048, lr=2.5e-3, warmup_steps=100, eval_every=250, eval_tokens=16384,
        checkpoint_every=250, spike_window=50),
    "demo-draft": PretrainConfig(
        ModelConfig(hidden_size=192, intermediate_size=512, num_layers=4, num_heads=3, num_kv_heads=1, **_DEMO),
        max_steps=1400, micro_batch_tokens=2048, lr=3e-3, warmup_steps=50, eval_every=100, eval_tokens=16384,
        checkpoint_every=100, spike_window=50),
    "tiny-test": PretrainConfig(
        ModelConfig("llama", vocab_size=320, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=2,
                    num_kv_heads=1, head_dim=32, max_position_embeddings=128, tie_word_embeddings=True),
        max_steps=8, seq_len=64, micro_batch_tokens=256, val_every=10, max_files=30, lr=3e-3, warmup_steps=2,
        eval_every=4, eval_tokens=512, checkpoint_every=4, spike_window=2),
}  # fmt: skip


def preset(name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]

