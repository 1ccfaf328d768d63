"""Helpers shared by the op families' Python faces."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels (and references) for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    """For register_fake (torch.compile, meta tensors): reject the mixed-device inputs the kernels reject."""
    for name, t in others.items():
        if t is not None:
            torch._check(
                t.device == ref.device,
                lambda: f"{name}: expected the device of {ref_name} ({ref.device}), got {t.device}",
            )
