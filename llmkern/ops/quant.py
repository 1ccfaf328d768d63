"""Weight-only quantization: NF4 (bitsandbytes-compatible, with double quant), group-wise INT4, per-row INT8.

Weights are W [N, K] in nn.Linear's layout (N = out_features, K = in_features). Formats (csrc/kernels/quant.h):
- nf4: 4-bit codes over the flattened weight, element 2i in the high nibble of byte i; blocks of `block_size`
  elements share an fp32 absmax: w = code[q] * absmax[e // block_size]. With double quant the absmax are
  uint8 codes: absmax = nested_code[q] * nested_absmax[b // 256] + nested_offset (fp32, each op rounded).
- int4: packed uint8 [N, K / 2] (same nibble order), groups of `group_size` columns share a scale and a
  zero point: w = (q - z) * s, z = 8 when symmetric.
- int8: int8 [N, K], one scale per row: w = q * s.
Dequantized values are computed in fp32 and rounded once to the output dtype. The linear ops compute
x @ dequantize(W).T (+ bias) accumulated in fp32 and are differentiable in x and bias (dx = dy @ W).
"""

from __future__ import annotations

import torch
from torch import Tensor

from llmkern._ext import available, ops
from llmkern.ops._common import acc_dtype, check_same_device

# bitsandbytes' NF4 table (functional.get_4bit_type("nf4")): sorted, so the index is the code.
NF4_CODE = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


def _dynamic_map_signed() -> Tensor:
    """bitsandbytes.functional.create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)."""
    data: list[float] = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


# bitsandbytes' dynamic map (256 sorted fp32 values), the code of the nested absmax.
DYNAMIC_CODE = _dynamic_map_signed()

NESTED_BLOCK_SIZE = 256  # bitsandbytes' double-quant block size (absmax values per nested scale)


_DEFAULT_CODES: dict[tuple[int, torch.device], Tensor] = {}


def _code(code: Tensor | None, default: Tensor, device: torch.device) -> Tensor:
    """code, or the default table on `device`, copied there once: a host-to-device copy in every call would
    stall each CUDA call (and break CUDA graph capture)."""
    if code is not None:
        return code
    device = torch.device(device)
    if device == default.device or torch.compiler.is_compiling():  # traced: a copy in the graph, never cached
        return default.to(device)
    key = (id(default), device)
    if key not in _DEFAULT_CODES:
        _DEFAULT_CODES[key] = default.to(device)
    return _DEFAULT_CODES[key]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ---- pure-PyTorch references (the definition; bit-exact with the kernels where they quantize) ----


def _unpack_nibbles(packed: Tensor, n: int) -> Tensor:
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0xF], 1).reshape(-1)[:n].long()


def _pack_nibbles(q: Tensor) -> Tensor:
    """q uint8 [..., 2m] -> [..., m], element 2i in the high nibble."""
    return (q[..., 0::2] << 4) | q[..., 1::2]


def quantize_nf4_ref(w: Tensor, block_size: int = 64, code: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """bitsandbytes.functional.quantize_4bit(w, blocksize, quant_type="nf4") on CPU, bit for bit."""
    code = _code(code, NF4_CODE, w.device).float()
    mid = (code[:-1] + code[1:]) / 2
    a = w.reshape(-1).float()
    n = a.numel()
    rem = n % block_size
    full = n - rem
    blk = a[:full].reshape(-1, block_size)
    absmax = blk.abs().amax(dim=-1) if full else a.new_zeros(0)  # stored unclamped (0 for an all-zero block)
    scaled = torch.clamp(blk * (1.0 / absmax.clamp(min=1e-38)[:, None]), -1, 1).reshape(-1)  # reciprocal, multiply
    if rem:  # the partial last block stores the clamped absmax and divides
        am = a[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.view(1)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / am, -1, 1)])
    q = torch.bucketize(scaled, mid).to(torch.uint8)  # nearest code; an exact midpoint takes the lower one
    if n % 2:
        q = torch.cat([q, q.new_tensor([7])])  # pad with the code of 0.0
    return _pack_nibbles(q).unsqueeze(1), absmax


def quantize_blockwise8_ref(x: Tensor, code: Tensor | None = None, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """bitsandbytes.functional.quantize_blockwise on CPU (its 65536-entry LUT kernel), bit for bit."""
    code = _code(code, DYNAMIC_CODE, x.device).float()
    a = x.reshape(-1).float()
    n = a.numel()
    nb = _cdiv(n, block_size)
    ap = torch.cat([a, a.new_zeros(nb * block_size - n)]).reshape(nb, block_size)
    absmax = ap.abs().amax(dim=1) if n else a.new_zeros(0)
    zero_blk = absmax == 0
    v = (ap * (1.0 / torch.where(zero_blk, 1.0, absmax))[:, None]).clamp(-1.0, 1.0)
    idx = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    mid = (code[:-1] + code[1:]) * 0.5
    lut = torch.searchsorted(mid, -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32, device=a.device)) / 65535.0)
    q = torch.where(zero_blk[:, None], 0, lut[idx]).to(torch.uint8)
    return q.reshape(-1)[:n], absmax


def _nf4_absmax_ref(absmax, nested_absmax, nested_code, nested_offset) -> Tensor:
    if nested_absmax is None:
        return absmax.float()
    code2 = _code(nested_code, DYNAMIC_CODE, absmax.device).float()
    idx = torch.arange(absmax.numel(), device=absmax.device) // NESTED_BLOCK_SIZE
    return code2[absmax.reshape(-1).long()] * nested_absmax.float()[idx] + float(nested_offset)


def dequantize_nf4_ref(
    packed: Tensor,
    absmax: Tensor,
    shape,
    dtype: torch.dtype,
    block_size: int = 64,
    code: Tensor | None = None,
    nested_absmax: Tensor | None = None,
    nested_code: Tensor | None = None,
    nested_offset: float = 0.0,
) -> Tensor:
    """Flat-block semantics (bitsandbytes' default backend and CUDA): w[e] = code[q[e]] * absmax[e // block_size]."""
    code = _code(code, NF4_CODE, packed.device).float()
    n = 1
    for s in shape:
        n *= int(s)
    q = _unpack_nibbles(packed, n)
    am = _nf4_absmax_ref(absmax.reshape(-1), nested_absmax, nested_code, nested_offset)
    idx = torch.arange(n, device=packed.device) // block_size
    return (code[q] * am[idx]).to(dtype).reshape(tuple(shape))


def quantize_int4_ref(w: Tensor, group_size: int = 128, symmetric: bool = True):
    """GPTQ-style round to nearest per (row, group); scales rounded to w's dtype before use."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    if symmetric:
        xmax = torch.maximum(-lo, hi)
        s = torch.where(xmax == 0, 1.0, 2 * xmax / 15).to(w.dtype)
        z = torch.full_like(s, 8, dtype=torch.float32)
        zeros = None
    else:
        empty = (lo == 0) & (hi == 0)
        lo = torch.where(empty, -1.0, lo)
        hi = torch.where(empty, 1.0, hi)
        s = ((hi - lo) / 15).to(w.dtype)
        z = torch.round(-lo / s.float()).clamp(0, 15)
        zeros = z.to(torch.uint8)
    q = (torch.round(g / s.float()[..., None]) + z[..., None]).clamp(0, 15).to(torch.uint8).reshape(n, k)
    return _pack_nibbles(q), s, zeros


def dequantize_int4_ref(
    packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, dtype: torch.dtype | None = None
) -> Tensor:
    n, k = packed.shape[0], packed.shape[1] * 2
    q = _unpack_nibbles(packed, n * k).reshape(n, k).float()
    z = 8.0 if zeros is None else zeros.float().repeat_interleave(group_size, 1)
    s = scales.float().repeat_interleave(group_size, 1)
    return ((q - z) * s).to(dtype or scales.dtype)


def quantize_int8_ref(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric: s = max|w| / 127 (rounded to w's dtype), q = clamp(round(w / s), -127, 127)."""
    s = (w.float().abs().amax(-1) / 127).to(w.dtype) if w.shape[-1] else w.new_zeros(w.shape[0])
    sf = s.float()[:, None]
    q = torch.where(sf == 0, 0.0, torch.round(w.float() / sf).clamp(-127, 127)).to(torch.int8)
    return q, s


def dequantize_int8_ref(q: Tensor, scales: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    return (q.float() * scales.float()[:, None]).to(dtype or scales.dtype)


def _linear_ref(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    acc = acc_dtype(x.dtype)
    y = x.to(acc) @ w.to(acc).t()
    if bias is not None:
        y = y + bias.to(acc)
    return y.to(x.dtype)


def nf4_linear_ref(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    out_features: int,
    block_size: int = 64,
    code: Tensor | None = None,
    bias: Tensor | None = None,
    nested_absmax: Tensor | None = None,
    nested_code: Tensor | None = None,
    nested_offset: float = 0.0,
) -> Tensor:
    w = dequantize_nf4_ref(
        packed, absmax, (out_features, x.shape[-1]), torch.float32, block_size, code, nested_absmax, nested_code,
        nested_offset,
    )  # fmt: skip
    return _linear_ref(x, w, bias)


def int4_linear_ref(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None = None
) -> Tensor:
    return _linear_ref(x, dequantize_int4_ref(packed, scales, zeros, group_size, torch.float32), bias)


def int8_linear_ref(x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    return _linear_ref(x, dequantize_int8_ref(q, scales, torch.float32), bias)


# ---- public ops ----


def quantize_nf4(w: Tensor, block_size: int = 64, code: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """bitsandbytes' quantize_4bit(w, block_size, quant_type="nf4"), bit for bit, for w of any shape (fp32/bf16/fp16).

    Returns (packed uint8 [(numel + 1) // 2, 1], absmax fp32 [ceil(numel / block_size)])."""
    return tuple(ops().quantize_nf4(w, block_size, _code(code, NF4_CODE, w.device)))


def quantize_blockwise8(x: Tensor, code: Tensor | None = None, block_size: int = 256) -> tuple[Tensor, Tensor]:
    """bitsandbytes' quantize_blockwise on CPU (8-bit, LUT algorithm), bit for bit; x fp32.

    Returns (q uint8 [numel], absmax fp32 [ceil(numel / block_size)]). With the default DYNAMIC_CODE this nests
    NF4 absmax: quantize_blockwise8(absmax - absmax.mean()) is bitsandbytes' compress_statistics."""
    return tuple(ops().quantize_blockwise8(x, _code(code, DYNAMIC_CODE, x.device), block_size))


def dequantize_nf4(
    packed: Tensor,
    absmax: Tensor,
    shape,
    dtype: torch.dtype,
    block_size: int = 64,
    code: Tensor | None = None,
    nested_absmax: Tensor | None = None,
    nested_code: Tensor | None = None,
    nested_offset: float = 0.0,
) -> Tensor:
    """NF4 -> Tensor[shape] of dtype (bitsandbytes' dequantize_4bit with flat blocks).

    absmax is fp32 [blocks], or uint8 codes [blocks] when nested_absmax (fp32 [ceil(blocks / 256)]) is given;
    nested_code defaults to DYNAMIC_CODE then."""
    if nested_absmax is not None:
        nested_code = _code(nested_code, DYNAMIC_CODE, packed.device)
    return ops().dequantize_nf4(
        packed, absmax, [int(s) for s in shape], dtype, block_size, _code(code, NF4_CODE, packed.device),
        nested_absmax, nested_code, float(nested_offset),
    )  # fmt: skip


def quantize_int4(w: Tensor, group_size: int = 128, symmetric: bool = True):
    """Group-wise int4 round to nearest of w [N, K] (K a multiple of group_size in {32, 64, 128}).

    Returns (packed uint8 [N, K // 2], scales [N, K // group_size] in w's dtype, zeros uint8 [N, K // group_size]
    or None when symmetric)."""
    packed, scales, zeros = ops().quantize_int4(w, group_size, symmetric)
    return packed, scales, (None if symmetric else zeros)


def dequantize_int4(
    packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, dtype: torch.dtype | None = None
) -> Tensor:
    """int4 -> [N, K] of dtype (default: scales' dtype)."""
    return ops().dequantize_int4(packed, scales, zeros, group_size, dtype)


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row symmetric int8 of w [N, K]: returns (q int8 [N, K], scales [N] in w's dtype)."""
    return tuple(ops().quantize_int8(w))


def dequantize_int8(q: Tensor, scales: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """int8 -> [N, K] of dtype (default: scales' dtype)."""
    return ops().dequantize_int8(q, scales, dtype)


def nf4_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    out_features: int,
    block_size: int = 64,
    code: Tensor | None = None,
    bias: Tensor | None = None,
    nested_absmax: Tensor | None = None,
    nested_code: Tensor | None = None,
    nested_offset: float = 0.0,
) -> Tensor:
    """x [..., K] @ W.T (+ bias) for an NF4 weight W [out_features, K]; output in x's dtype. Differentiable in x
    and bias."""
    if nested_absmax is not None:
        nested_code = _code(nested_code, DYNAMIC_CODE, x.device)
    return ops().nf4_linear(
        x, packed, absmax, out_features, block_size, _code(code, NF4_CODE, x.device), bias, nested_absmax,
        nested_code, float(nested_offset),
    )  # fmt: skip


def int4_linear(
    x: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor | None, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """x [..., K] @ W.T (+ bias) for an int4 weight W [N, K]; output in x's dtype. Differentiable in x and bias."""
    return ops().int4_linear(x, packed, scales, zeros, group_size, bias)


def int8_linear(x: Tensor, q: Tensor, scales: Tensor, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ W.T (+ bias) for an int8 weight W [N, K]; output in x's dtype. Differentiable in x and bias."""
    return ops().int8_linear(x, q, scales, bias)


# ---- torch.compile and autograd registration ----


def _register() -> None:
    @torch.library.register_fake("llmkern::quantize_nf4")
    def _(w, block_size, code):
        check_same_device("w", w, code=code)
        n = w.numel()
        return w.new_empty(((n + 1) // 2, 1), dtype=torch.uint8), w.new_empty(_cdiv(n, block_size), dtype=torch.float32)

    @torch.library.register_fake("llmkern::quantize_blockwise8")
    def _(x, code, block_size):
        check_same_device("x", x, code=code)
        n = x.numel()
        return x.new_empty(n, dtype=torch.uint8), x.new_empty(_cdiv(n, block_size), dtype=torch.float32)

    @torch.library.register_fake("llmkern::dequantize_nf4")
    def _(packed, absmax, shape, dtype, block_size, code, nested_absmax, nested_code, nested_offset):
        check_same_device("packed", packed, absmax=absmax, code=code, nested_absmax=nested_absmax)
        return packed.new_empty(shape, dtype=dtype)

    @torch.library.register_fake("llmkern::quantize_int4")
    def _(w, group_size, symmetric):
        n, k = w.shape
        zeros = w.new_empty(0, dtype=torch.uint8) if symmetric else w.new_empty(n, k // group_size, dtype=torch.uint8)
        return w.new_empty(n, k // 2, dtype=torch.uint8), w.new_empty(n, k // group_size), zeros

    @torch.library.register_fake("llmkern::dequantize_int4")
    def _(packed, scales, zeros, group_size, dtype):
        check_same_device("packed", packed, scales=scales, zeros=zeros)
        return packed.new_empty(packed.shape[0], packed.shape[1] * 2, dtype=dtype or scales.dtype)

    @torch.library.register_fake("llmkern::quantize_int8")
    def _(w):
        return w.new_empty(w.shape, dtype=torch.int8), w.new_empty(w.shape[0])

    @torch.library.register_fake("llmkern::dequantize_int8")
    def _(q, scales, dtype):
        check_same_device("q", q, scales=scales)
        return q.new_empty(q.shape, dtype=dtype or scales.dtype)

    def linear_out(x: Tensor, n: int) -> Tensor:
        return x.new_empty(*x.shape[:-1], n)

    @torch.library.register_fake("llmkern::nf4_linear")
    def _(x, packed, absmax, out_features, block_size, code, bias, nested_absmax, nested_code, nested_offset):
        check_same_device("x", x, packed=packed, absmax=absmax, code=code, bias=bias, nested_absmax=nested_absmax)
        return linear_out(x, out_features)

    @torch.library.register_fake("llmkern::int4_linear")
    def _(x, packed, scales, zeros, group_size, bias):
        check_same_device("x", x, packed=packed, scales=scales, zeros=zeros, bias=bias)
        return linear_out(x, packed.shape[0])

    @torch.library.register_fake("llmkern::int8_linear")
    def _(x, q, scales, bias):
        check_same_device("x", x, q=q, scales=scales, bias=bias)
        return linear_out(x, q.shape[0])

    # dx = dy @ W (W dequantized in x's dtype through the dequantize op, as bitsandbytes does);
    # dbias = dy summed over the rows. No gradient for the quantized weight or its statistics.
    def grads(ctx, dy: Tensor, w: Tensor):
        dx = (dy @ w) if ctx.needs_input_grad[0] else None
        dbias = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[ctx.bias_index] else None
        return dx, dbias

    def setup(ctx, inputs, bias_index: int):
        ctx.has_bias = inputs[bias_index] is not None
        ctx.bias_index = bias_index
        ctx.x_dtype = inputs[0].dtype

    def nf4_setup(ctx, inputs, output):
        x, packed, absmax, out_features, block_size, code, bias, nested_absmax, nested_code, nested_offset = inputs
        setup(ctx, inputs, 6)
        ctx.save_for_backward(packed, absmax, code, nested_absmax, nested_code)
        ctx.meta = (out_features, x.shape[-1], block_size, nested_offset)

    def nf4_backward(ctx, dy):
        packed, absmax, code, nested_absmax, nested_code = ctx.saved_tensors
        out_features, k, block_size, nested_offset = ctx.meta
        w = ops().dequantize_nf4(
            packed, absmax, [out_features, k], ctx.x_dtype, block_size, code, nested_absmax, nested_code, nested_offset
        )
        dx, dbias = grads(ctx, dy, w)
        return dx, None, None, None, None, None, dbias, None, None, None

    torch.library.register_autograd("llmkern::nf4_linear", nf4_backward, setup_context=nf4_setup)

    def int4_setup(ctx, inputs, output):
        x, packed, scales, zeros, group_size, bias = inputs
        setup(ctx, inputs, 5)
        ctx.save_for_backward(packed, scales, zeros)
        ctx.group_size = group_size

    def int4_backward(ctx, dy):
        packed, scales, zeros = ctx.saved_tensors
        w = ops().dequantize_int4(packed, scales, zeros, ctx.group_size, ctx.x_dtype)
        dx, dbias = grads(ctx, dy, w)
        return dx, None, None, None, None, dbias

    torch.library.register_autograd("llmkern::int4_linear", int4_backward, setup_context=int4_setup)

    def int8_setup(ctx, inputs, output):
        x, q, scales, bias = inputs
        setup(ctx, inputs, 3)
        ctx.save_for_backward(q, scales)

    def int8_backward(ctx, dy):
        q, scales = ctx.saved_tensors
        w = ops().dequantize_int8(q, scales, ctx.x_dtype)
        dx, dbias = grads(ctx, dy, w)
        return dx, None, None, dbias

    torch.library.register_autograd("llmkern::int8_linear", int8_backward, setup_context=int8_setup)


if available():
    _register()
