"""Dense linear, y = x @ weight.T (+ bias), with fp32 accumulation (CPU).

Made for decoding, where a bf16 weight is read from memory for a handful of rows of x: torch's CPU bf16
matmul runs that at a fraction of the read bandwidth on CPUs without AVX512_BF16; this kernel reads each
weight element once per call. From 32 rows of x (16 with K <= 512: batched decoding, verification,
prefill) the product runs in outer-product form, compute-bound near the fp32 FMA rate (see
csrc/kernels/linear.cpp); fp32 over 256+ rows and at most 1024 columns (training's linears) through `mm`, whose
products write whole vectors of y rows. The backward (dx = dy @ W, dW = dy^T x, dbias) is `mm` in fp32 over 256+
rows where mm_beats_torch(), else torch's matmul. linear_group runs the linears of one input (a layer's q, k and v
projections) in one call, with the same results.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import Tensor

from llmkern._ext import available, ops
from llmkern.ops._common import acc_dtype, check_same_device
from llmkern.ops.cpu import kernel_threads


def linear_ref(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    acc = acc_dtype(x.dtype)
    y = x.to(acc) @ weight.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N], every tensor of x's dtype (fp32, bf16, fp16;
    fp64 for gradcheck) on the CPU. Differentiable in x, weight and bias."""
    return ops().linear(x, weight, bias)


def linear_group_ref(x: Tensor, weights: list[Tensor], biases: list[Tensor] | None = None) -> list[Tensor]:
    return [linear_ref(x, w, b) for w, b in zip(weights, biases or [None] * len(weights))]


def linear_group(x: Tensor, weights: list[Tensor], biases: list[Tensor] | None = None) -> list[Tensor]:
    """[linear(x, w, b) for w, b in zip(weights, biases)] in one call, with the same results: the linears of one
    input (a layer's q, k and v projections; gate and up) share x's conversion or transpose and one parallel
    region, whose threads split the tiles of all the weights. weights[i] [N_i, K]; biases: None, or one bias
    [N_i] per weight. Differentiable like linear."""
    return ops().linear_group(x, list(weights), [] if biases is None else list(biases))


def mm_ref(a: Tensor, b: Tensor) -> Tensor:
    return a @ b


def mm(a: Tensor, b: Tensor) -> Tensor:
    """a [M, K] @ b [K, N] -> [M, N] in float32 on the CPU: a read in place with either stride 1 (a transposed view
    such as dy.t() included), b when its rows are contiguous. Differentiable."""
    return ops().mm(a, b)


# Rows from which fp32 products take mm where mm_beats_torch() (and linear its mm path, for at most _MM_MAX_COLS
# outputs; the same bounds as kMatmulRows / kMatmulMaxCols in csrc/kernels/linear.cpp, which routing must match).
_MM_ROWS, _MM_MAX_COLS = 256, 1024


@functools.cache
def _torch_bf16_gemm() -> bool:
    """Whether torch's CPU bf16 matmul (oneDNN) has AVX512_BF16 products on this CPU."""
    return "avx512bf16" in ops().supported_cpu_isas()


@functools.cache
def _torch_fp32_gemm_is_mkl_on_amd() -> bool:
    """Whether torch's CPU float32 matmul is MKL's running on an AMD CPU, where MKL takes a slower path: on Zen 4
    75-142 GFLOP/s on small-K shapes against a 224 GFLOP/s FMA peak (bench/RESULTS.md)."""
    if "BLAS_INFO=mkl" not in torch.__config__.show():
        return False
    try:
        return "AuthenticAMD" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def mm_beats_torch() -> bool:
    """Whether training's large fp32 products (linear's forward over 256+ rows, its dx and dW, the output head's chunk
    products) run faster on mm than on torch's CPU matmul: only where torch's is MKL on AMD. On Zen 4 mm ran 1.13-1.50x
    torch's there; on an Intel Xeon (Emerald Rapids, 2 threads, torch on oneDNN / MKL) torch's ran 1.03-1.56x faster
    on demo-target's nine layer products and 1.08-1.48x on the head's (bench/RESULTS.md)."""
    return _torch_fp32_gemm_is_mkl_on_amd()


def _kernels_on_amx() -> bool:
    """Whether the kernels run on the `amx` path now (bf16 linears on the AMX tiles)."""
    return ops().cpu_isa() == "amx"


def linear_beats_torch(dtype: torch.dtype, rows: int, k: int, n: int) -> bool:
    """Whether linear(x [rows, k], W [n, k]) measured faster than torch's CPU matmul (bench/RESULTS.md): always when
    the kernels have more threads than torch (llmkern's pool in `llmkern serve`, torch's own ops on one thread);
    else fp32 up to 16 rows (decode) and, where torch's fp32 matmul is MKL on AMD, from 256 rows with at most 1024
    outputs (training's linears, through mm: 1.13-1.50x torch's on demo-target's shapes, Zen 4; 0.9-1.17x on other
    shapes there) and up to 256 rows of wide outputs (n >= 2048: an output head, 1.13-2.45x on Zen 4); fp16 always;
    bf16 always without AVX512_BF16 (torch's bf16 GEMM is then 2-8x slower), and with it below 128 rows, or below 32
    when k >= 1024 (beyond, oneDNN's bf16 GEMM was 1.04-1.45x faster on Zen 4) unless the kernels run on AMX tiles
    (the `amx` path, for k a multiple of 32: 1.0-1.1x oneDNN's, itself on AMX, at 128 rows, 1.6-1.9x slower from
    512)."""
    if kernel_threads() > torch.get_num_threads():
        return True
    if dtype == torch.float32:
        return rows <= 16 or (mm_beats_torch()
                              and (rows >= _MM_ROWS and n <= _MM_MAX_COLS or rows <= 256 and n >= 2048))
    if dtype == torch.bfloat16 and _torch_bf16_gemm():
        return rows < (32 if k >= 1024 and not (k % 32 == 0 and _kernels_on_amx()) else 128)
    return True


def _grads(x: Tensor, weight: Tensor, dy: Tensor, need_x: bool, need_weight: bool, need_bias: bool):
    """linear's backward: dx = dy @ W, dW = dy^T x, dbias = the sum of dy's rows (None where not needed)."""
    rows, x_rows = dy.reshape(-1, dy.shape[-1]), x.reshape(-1, x.shape[-1])
    if (dy.dtype == torch.float32 and dy.device.type == "cpu" and rows.shape[0] >= _MM_ROWS
            and mm_beats_torch()):
        return (mm(rows, weight).view(*dy.shape[:-1], weight.shape[1]) if need_x else None,
                mm(rows.t(), x_rows) if need_weight else None, rows.sum(0) if need_bias else None)
    return (dy @ weight if need_x else None, rows.t() @ x_rows if need_weight else None,
            rows.sum(0) if need_bias else None)


def _per_item(need, n: int) -> list[bool]:
    """needs_input_grad of a Tensor[] input: one flag per tensor, or one for all of them."""
    return list(need) if isinstance(need, (list, tuple)) else [bool(need)] * n


def _register() -> None:
    @torch.library.register_fake("llmkern::mm")
    def _(a, b):
        check_same_device("a", a, b=b)
        return a.new_empty(a.shape[0], b.shape[1])

    def setup_mm(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def backward_mm(ctx, dc):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        return mm(dc, b.t()) if need_a else None, mm(a.t(), dc) if need_b else None

    torch.library.register_autograd("llmkern::mm", backward_mm, setup_context=setup_mm)

    @torch.library.register_fake("llmkern::linear")
    def _(x, weight, bias=None):
        check_same_device("x", x, weight=weight, bias=bias)
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    def setup(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)

    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        # Called as linear(x, weight), needs_input_grad has no bias entry.
        need_x, need_weight, *need_bias = ctx.needs_input_grad
        return _grads(x, weight, dy, need_x, need_weight, ctx.has_bias and any(need_bias))

    torch.library.register_autograd("llmkern::linear", backward, setup_context=setup)

    @torch.library.register_fake("llmkern::linear_group")
    def _(x, weights, biases):
        check_same_device("x", x, **{f"weights[{i}]": w for i, w in enumerate(weights)},
                          **{f"biases[{i}]": b for i, b in enumerate(biases)})
        return [x.new_empty(*x.shape[:-1], w.shape[0]) for w in weights]

    def setup_group(ctx, inputs, output):
        x, weights, biases = inputs
        ctx.has_bias = bool(biases)
        ctx.save_for_backward(x, *weights)

    def backward_group(ctx, dys):
        x, *weights = ctx.saved_tensors
        n = len(weights)
        need_x = ctx.needs_input_grad[0]
        need_w, need_b = (_per_item(f, n) for f in ctx.needs_input_grad[1:])
        grads = [_grads(x, w, dy, need_x, need_w[i], ctx.has_bias and need_b[i])
                 for i, (w, dy) in enumerate(zip(weights, dys))]
        dx = sum(g[0] for g in grads) if need_x else None
        return dx, [g[1] for g in grads], [g[2] for g in grads] if ctx.has_bias else []

    torch.library.register_autograd("llmkern::linear_group", backward_group, setup_context=setup_group)


if available():
    _register()
