"""Greedy token selection: the argmax over the vocabulary of a step's logits.

torch.argmax on the CPU reduces one element at a time (~250 us for 16 rows of an 8k vocabulary in bf16 on Zen 4, a
tenth of a 16-sequence decode step of the demo model); the CPU kernel keeps a running maximum and its index per
vector lane, with torch.argmax's answer on ties (the first maximum) and on NaN (the first NaN).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkern._ext import available, ops


def argmax_ref(x: Tensor) -> Tensor:
    """The index of each row's first maximum over the last dim (its first NaN if it holds one), int64 [...]."""
    return torch.argmax(x, dim=-1)


def argmax(x: Tensor) -> Tensor:
    """argmax_ref(x [..., n]) for float32, bfloat16, float16 or float64 x: on the CPU llmkern's kernel; on other
    devices torch.argmax itself (one fused reduction there already). n must be at least 1."""
    if x.device.type != "cpu":
        return torch.argmax(x, dim=-1)
    return ops().argmax(x)


def _register() -> None:
    @torch.library.register_fake("llmkern::argmax")
    def _(x):
        torch._check(x.dim() >= 1 and x.shape[-1] != 0, lambda: "x: expected a non-empty last dim")
        return x.new_empty(x.shape[:-1], dtype=torch.int64)


if available():
    _register()
