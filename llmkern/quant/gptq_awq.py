"""Import of GPTQ and AWQ (GEMM) 4-bit checkpoint tensors into llmkern's int4 layout (Int4Weight).

Both formats dequantize to W.T [K, N] = (q - z[g]) * s[g] (K = in_features, N = out_features):
- GPTQ (AutoGPTQ / GPTQModel / optimum): qweight int32 [K/8, N], nibble j (bits 4j..4j+3) of row r holds
  k = 8r + j; qzeros int32 [G, N/8], nibble j of column c holds n = 8c + j, storing z - 1 for
  checkpoint_format "gptq" (v1, the default) and z for "gptq_v2"; scales [G, N]; g_idx int32 [K] (group of
  each k, not monotone with act-order / desc_act).
- AWQ GEMM (AutoAWQ WQLinear_GEMM): qweight int32 [K, N/8] packed along N, nibble i of column c holds
  n = 8c + AWQ_ORDER[i]; qzeros int32 [K/G, N/8] the same way with true zeros; scales [K/G, N].
The conversion is lossless: codes, zero points and scales are kept as they are (scales stay fp16), so
dequantizing in fp16 gives exactly the values the reference implementations compute.
"""

from __future__ import annotations

import torch

from llmkern.quant.formats import INT4_GROUP_SIZES, Int4Weight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of an AWQ word holds column offset AWQ_ORDER[i]
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def _check_int32(t: torch.Tensor, name: str, ndim: int = 2) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or t.dim() != ndim:
        got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{name} must be an int32 {ndim}-D tensor, got {got}")


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> int64 [..., W, 8]: nibble j (bits 4j..4j+3) of each word, j = 0..7."""
    return ((words.unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF).long()


def _pick_group(g_sorted: torch.Tensor, k: int) -> int:
    """The largest llmkern group (128, 64, 32) that divides K and never straddles two source groups."""
    for gs in sorted(INT4_GROUP_SIZES, reverse=True):
        if k % gs == 0 and bool((g_sorted.view(-1, gs) == g_sorted.view(-1, gs)[:, :1]).all()):
            return gs
    raise ValueError(
        f"cannot express these groups with llmkern's int4 groups {INT4_GROUP_SIZES}: K = {k} must be "
        "divisible by one of them and every source group must be a whole number of such groups"
    )


def int4_from_kn(q: torch.Tensor, z: torch.Tensor, s: torch.Tensor, g_idx: torch.Tensor) -> Int4Weight:
    """Int4Weight from codes q [K, N] (0..15), zero points z [G, N] (0..16), scales s [G, N] and the
    group of each input feature g_idx [K]. A non-monotone g_idx (act-order) is sorted, and the sort
    permutation is kept as Int4Weight.perm (applied to x in forward)."""
    k, n = q.shape
    g_idx = g_idx.long()
    if g_idx.min() < 0 or g_idx.max() >= s.shape[0]:
        raise ValueError(f"g_idx values must be in [0, {s.shape[0]}), got [{int(g_idx.min())}, {int(g_idx.max())}]")
    perm = None
    if bool((g_idx[1:] < g_idx[:-1]).any()):
        perm = torch.argsort(g_idx, stable=True)
        q, g_idx = q[perm], g_idx[perm]
    if k % 2:
        raise ValueError(f"in_features (K = {k}) must be even for int4")
    gs = _pick_group(g_idx, k)
    g = g_idx[::gs]  # source group of each llmkern group
    qt = q.t().to(torch.uint8)  # [N, K]
    packed = ((qt[:, 0::2] << 4) | qt[:, 1::2]).contiguous()
    zeros = z[g].t().contiguous()
    if zeros.max() > 255:
        raise ValueError("zero points must fit in uint8")
    zeros = zeros.to(torch.uint8)
    if bool((zeros == 8).all()):
        zeros = None  # symmetric: the kernel's implicit zero point
    return Int4Weight(packed, s[g].t().contiguous(), zeros, gs, perm)


def from_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None = None,
    *,
    bits: int = 4,
    group_size: int | None = None,
    checkpoint_format: str = "gptq",
) -> Int4Weight:
    """One GPTQ linear layer's tensors -> Int4Weight. group_size (the checkpoint's; -1 for one group)
    is only needed without g_idx. Both sym=True and sym=False checkpoints read the same way (sym stores
    zero 8). checkpoint_format "gptq" (v1) stores zero - 1; "gptq_v2" stores the zero. A v1 zero of 0
    overflows into the word's higher nibbles (AutoGPTQ does not mask): decoded as AutoGPTQ decodes it."""
    if bits != 4:
        raise ValueError(f"only 4-bit GPTQ is supported, got bits={bits}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    _check_int32(qweight, "qweight")
    _check_int32(qzeros, "qzeros")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    ngroups = qzeros.shape[0]
    if qzeros.shape[1] * 8 != n:
        raise ValueError(f"qzeros must be [G, {n // 8}] for qweight {tuple(qweight.shape)}, got {tuple(qzeros.shape)}")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32) or tuple(scales.shape) != (ngroups, n):
        raise ValueError(f"scales must be float [{ngroups}, {n}], got {scales.dtype} {tuple(scales.shape)}")
    q = _nibbles(qweight).permute(0, 2, 1).reshape(k, n)  # [K/8, N, 8] -> [K/8, 8, N] -> [K, N]
    z = _nibbles(qzeros).reshape(ngroups, n)
    if checkpoint_format == "gptq":
        z = z + 1
    if g_idx is None:
        if group_size is None:
            raise ValueError("give g_idx or group_size")
        gs = k if group_size in (-1, 0) else group_size
        g_idx = torch.arange(k, device=qweight.device) // gs
    else:
        _check_int32(g_idx, "g_idx", 1)
        if g_idx.shape[0] != k:
            raise ValueError(f"g_idx must have K = {k} elements, got {g_idx.shape[0]}")
    return int4_from_kn(q, z, scales, g_idx)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> Int4Weight:
    """One AutoAWQ GEMM linear layer's tensors (version "gemm") -> Int4Weight."""
    _check_int32(qweight, "qweight")
    _check_int32(qzeros, "qzeros")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if group_size in (-1, 0):
        group_size = k
    if k % group_size:
        raise ValueError(f"in_features (K = {k}) must be divisible by group_size {group_size}")
    ngroups = k // group_size
    if tuple(qzeros.shape) != (ngroups, n // 8):
        raise ValueError(f"qzeros must be [{ngroups}, {n // 8}], got {tuple(qzeros.shape)}")
    if scales.dtype not in (torch.float16, torch.bfloat16, torch.float32) or tuple(scales.shape) != (ngroups, n):
        raise ValueError(f"scales must be float [{ngroups}, {n}], got {scales.dtype} {tuple(scales.shape)}")
    order = torch.tensor(AWQ_ORDER, device=qweight.device).argsort()  # column offset j lives in nibble order[j]

    def unpack(words):
        return _nibbles(words)[:, :, order].reshape(words.shape[0], -1)

    g_idx = torch.arange(k, device=qweight.device) // group_size
    return int4_from_kn(unpack(qweight), unpack(qzeros), scales, g_idx)
