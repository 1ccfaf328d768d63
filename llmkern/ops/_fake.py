"""Checks shared by the register_fake implementations (torch.compile and meta tensors), so that a
traced program rejects the same mixed-device inputs the kernels reject."""

from __future__ import annotations

import torch


def check_same_device(ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is not None:
            torch._check(
                t.device == ref.device,
                lambda: f"{name}: expected the device of {ref_name} ({ref.device}), got {t.device}",
            )
