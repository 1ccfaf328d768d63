"""Shared test tools: the derived-tolerance rule, poisoned outputs, strided inputs."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_close_derived(out, ref64, out_torch, factor: float = 2.0, name: str = "out", scale: float | None = None):
    """The kernel's error vs the float64 reference must be at most `factor` times the error of the same
    math done by PyTorch in the input dtype (out_torch), plus one unit of rounding of the largest value,
    or of `scale` when given (so an exact PyTorch result does not demand an exact kernel)."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert out.dtype == out_torch.dtype, f"{name}: dtype {out.dtype} != {out_torch.dtype}"
    ref64 = ref64.double()
    assert not out.isnan().any(), f"{name}: NaN in output (an element was not written?)"
    err = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
    err_torch = (out_torch.double() - ref64).abs().max().item() if out.numel() else 0.0
    if scale is None:
        scale = ref64.abs().max().item() if out.numel() else 0.0
    ulp = torch.finfo(out.dtype).eps * scale
    assert err <= factor * err_torch + ulp, (
        f"{name}: max error {err:.3e} > {factor} x PyTorch's {err_torch:.3e} + {ulp:.3e} ({out.dtype})"
    )


def strided(t: torch.Tensor, pad: int = 3) -> torch.Tensor:
    """The same values as t, as a view whose rows are `pad` elements further apart than contiguous."""
    big = torch.full((*t.shape[:-1], t.shape[-1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    big[..., : t.shape[-1]] = t
    return big[..., : t.shape[-1]]


def poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN: any element the kernel fails to write stays NaN."""
    return torch.full_like(t, float("nan"))


def grads(fn, inputs, douts):
    """Gradients w.r.t. leaf copies of `inputs` of fn's output(s), each weighted by its entry of douts
    (cast to that output's device and dtype)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [d.to(o.device, o.dtype) for o, d in zip(outs, douts)])
    return [t.grad for t in leaves]


def thp_eligible(t: torch.Tensor) -> bool:
    """Whether the kernel may back t's memory with transparent huge pages ("THPeligible: 1" in /proc/self/smaps
    for the mapping that holds t's first byte)."""
    addr, inside = t.data_ptr(), False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "THPeligible:":
                return line.split()[1] == "1"
    return False
