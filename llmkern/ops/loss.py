"""Fused output head + cross entropy: the loss of `hidden @ weight.T` against targets without the logits.

A language model's logits are the largest activation of training ([tokens, vocab] in float32: 268 MB for 8192
tokens of an 8k vocabulary, 4 GB at 128k), stored for the backward along with log_softmax's output. This op
(Liger-Kernel's FusedLinearCrossEntropy, arXiv:2410.10989) walks the tokens in chunks whose logits stay in cache:
each chunk's logits give its loss and, at once, its gradient softmax - onehot, which is multiplied into d(hidden)
and accumulated into d(weight); only those two gradients are kept for the backward. The matmuls are torch's (the
same ones the unfused head runs), except on the CPU a chunk's logits where ops.linear measured faster
(linear_beats_torch) and, with a float32 weight where torch's is MKL on AMD, the chunk's two gradient products
(ops.mm: 1.25x / 1.32x torch's at 256 x 8192 x 320 on Zen 4; demo-target's training step 1.04x faster, 9 of 10
alternating steps; on an Intel Xeon torch's ran 1.48x / 1.08x faster). On the CPU a chunk's loss and gradient come
from one compiled op, cross_entropy_grad_ (three passes over the cached chunk, one exp per logit); elsewhere from
PyTorch ops. Under autocast the products run in its dtype, as the unfused head's F.linear would (demo-target's bf16
training step: 1568 -> 1101 ms alternating in one process, its head 917 -> 201 ms); 16-bit products return 16-bit
chunks of dweight, summed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from llmkern._ext import available, ops
from llmkern.ops.linear import linear_beats_torch, mm, mm_beats_torch

CHUNK_BYTES = 8 << 20  # a chunk's float32 logits: well inside the L2 + L3 of one socket


def cross_entropy_grad_ref(logits: Tensor, targets: Tensor, scale: float = 1.0,
                           ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """(loss [...], grad [..., vocab]) of logits [..., vocab] against targets [...]: loss = logsumexp - the target's
    logit, grad = scale * (softmax - onehot), the gradient of scale * loss; 0 for both where the target is
    ignore_index. In logits' dtype (the op returns the loss of 16-bit logits in float32)."""
    valid = targets != ignore_index
    t = targets.masked_fill(~valid, 0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = (lse - logits.gather(-1, t[..., None])[..., 0]) * valid
    grad = torch.softmax(logits, dim=-1) - F.one_hot(t, logits.shape[-1]).to(logits.dtype)
    return loss, grad * (scale * valid)[..., None].to(logits.dtype)


def cross_entropy_grad_(logits: Tensor, targets: Tensor, scale: float = 1.0, ignore_index: int = -100) -> Tensor:
    """cross_entropy_grad_ref in one call on the CPU: returns the loss (targets' shape [...], float32; float64 for
    float64 logits) and overwrites logits [..., vocab] (unit stride along vocab) with its gradient. Targets outside
    [0, vocab) other than ignore_index raise an IndexError."""
    return ops().cross_entropy_grad_(logits, targets, scale, ignore_index)


def linear_cross_entropy_ref(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                             ignore_index: int = -100, num_items: float | Tensor | None = None) -> Tensor:
    """Sum over targets != ignore_index of -log_softmax(hidden @ weight.T + bias)[target], divided by num_items
    (default: the number of counted targets, i.e. the mean)."""
    logits = F.linear(hidden, weight, bias).float()
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss / ((targets != ignore_index).sum() if num_items is None else num_items)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, num_items: float | Tensor | None = None,
                         chunk_rows: int | None = None) -> Tensor:
    """linear_cross_entropy_ref(hidden [N, H], weight [V, H], targets [N] int64, bias [V]) without storing the
    [N, V] logits; differentiable in hidden, weight and bias (float32 scalar loss)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden, weight: expected [N, H] and [V, H], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"targets: expected int64 [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias: expected [{weight.shape[0]}], got {tuple(bias.shape)}")
    if chunk_rows is None:
        chunk_rows = max(16, CHUNK_BYTES // (4 * weight.shape[0]))
    elif isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows: expected a positive int (rows per chunk of logits), got {chunk_rows!r}")
    divisor = (targets != ignore_index).sum() if num_items is None else num_items
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, divisor, chunk_rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, divisor, chunk_rows):
        # Under autocast the products run in its dtype, as F.linear's would; logits, loss and dweight stay float32.
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        with torch.autocast(device, enabled=False):
            return _LinearCrossEntropy._forward(ctx, hidden, weight, bias, targets, ignore_index, divisor, chunk_rows,
                                                dtype)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, targets, ignore_index, divisor, chunk_rows, dtype):
        need_grad, hidden_dtype, weight_dtype = ctx.needs_input_grad, hidden.dtype, weight.dtype
        dweight = torch.zeros_like(weight, dtype=torch.float32) if need_grad[1] else None
        dbias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and need_grad[2] else None
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        dhidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_grad[0] else None
        divisor = torch.as_tensor(divisor, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        cpu_ops = hidden.device.type == "cpu" and available()  # llmkern's compiled CPU ops
        # the chunks' gradient products through ops.mm, where it beats torch's
        fp32_mm = cpu_ops and weight.dtype == torch.float32 and mm_beats_torch()
        scale = divisor.reciprocal().item() if cpu_ops else None  # 1 / 0 = inf, as the unfused path divides
        for start in range(0, hidden.shape[0], chunk_rows):
            h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
            ours = cpu_ops and linear_beats_torch(weight.dtype, *h.shape, weight.shape[0])
            logits = (ops().linear if ours else F.linear)(h, weight, bias).float()  # [chunk, V]
            if cpu_ops:  # the loss and, in place of the logits, its gradient
                loss += ops().cross_entropy_grad_(logits, t, scale, ignore_index).sum()
                grad = logits
            else:
                valid = t != ignore_index
                t = t.masked_fill(~valid, 0)
                lse = torch.logsumexp(logits, dim=-1)
                loss += ((lse - logits.gather(1, t[:, None])[:, 0]) * valid).sum()
                if dhidden is None and dweight is None and dbias is None:
                    continue
                grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                grad[torch.arange(len(t), device=t.device), t] -= 1.0
                grad *= (valid / divisor)[:, None]
            if dbias is not None:
                dbias += grad.sum(0)
            if dweight is not None:
                if fp32_mm:
                    dweight += mm(grad.t(), h)
                elif dtype.itemsize == 2:  # as torch's backward of a 16-bit linear: the product in its dtype
                    dweight += torch.mm(grad.t().to(dtype), h)
                else:
                    dweight.addmm_(grad.t(), h.float())
            if dhidden is not None:
                if fp32_mm:
                    dhidden[start:start + chunk_rows] = mm(grad, weight)
                else:
                    torch.mm(grad.to(weight.dtype), weight, out=dhidden[start:start + chunk_rows])
        ctx.save_for_backward(dhidden, dweight, dbias)
        ctx.dtypes = (hidden_dtype, weight_dtype)
        return loss / divisor

    @staticmethod
    def backward(ctx, dloss):
        dhidden, dweight, dbias = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        grads = [None if g is None else (g * dloss).to(dtype)
                 for g, dtype in ((dhidden, hidden_dtype), (dweight, weight_dtype), (dbias, weight_dtype))]
        return *grads, None, None, None, None


def _register() -> None:
    @torch.library.register_fake("llmkern::cross_entropy_grad_")
    def _(logits, targets, scale, ignore_index):
        wide = logits.dtype == torch.float64
        return logits.new_empty(logits.shape[:-1], dtype=torch.float64 if wide else torch.float32)


if available():
    _register()
