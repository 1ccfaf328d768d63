"""Attention with flash-attn 2's API, on CPU and CUDA.

`flash_attn_func`, `flash_attn_varlen_func` and `flash_attn_with_kvcache` take flash-attn's arguments,
defaults and layouts (q/k/v [batch, seqlen, heads, head_dim]; varlen packs [total, heads, head_dim] with
int32 cu_seqlens [batch + 1]; paged caches are [num_blocks, block_size, heads_k, head_dim] with an int32
block_table [batch, max_blocks], any block size). `write_kv_cache` is the serving engine's write path.

The math is `attention_ref`: s = scale * q.k, softcap * tanh(s / softcap) when softcap > 0, minus
slope * |i + Lk - Lq - j| with ALiBi, keys outside the window masked (causal = window right 0, aligned to
the bottom right when Lq != Lk), softmax over keys, times v. lse is the natural-log logsumexp of the
scores; a query with no visible key gets out 0 and lse +inf. One difference from flash-attn: with causal
ALiBi flash-attn's lse omits the per-row constant slope * (i + Lk - Lq); here the bias is the same
-slope * |i + Lk - Lq - j| with and without causal (the outputs agree).

Kernels are deterministic (no atomics; fixed reduction orders); `deterministic` is accepted for
compatibility. Dropout is not supported: dropout_p must be 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from llmkern._ext import available, ops
from llmkern.ops._common import check_same_device
from llmkern.ops.rope import apply_rotary_emb

# ---- pure-PyTorch reference (the definition; tests run it in float64) ----


def attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """q [batch, seqlen_q, heads, d], k/v [batch, seqlen_k, heads_k, d] -> (out like q, lse [batch, heads,
    seqlen_q]), computed in q's dtype (float64 in tests; in a low-precision dtype it is PyTorch's error)."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    k, v = k.repeat_interleave(h // hk, dim=2), v.repeat_interleave(h // hk, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq, device=q.device)[:, None]
    j = torch.arange(sk, device=q.device)[None, :]
    diag = i + sk - sq  # the key aligned with query i (bottom-right alignment)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(s.dtype).reshape(-1, h, 1, 1)
        s = s - slopes * (diag - j).abs().to(s.dtype)
    left, right = _window(causal, window_size)
    masked = torch.zeros(sq, sk, dtype=torch.bool, device=q.device)
    if left >= 0:
        masked |= j < diag - left
    if right >= 0:
        masked |= j > diag + right
    s = s.masked_fill(masked, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isneginf(lse)[..., None]  # rows with no visible key
    p = torch.exp(s - lse[..., None]).masked_fill(empty, 0)
    out = torch.einsum("bhqk,bkhd->bqhd", p.to(v.dtype), v)
    return out.to(q.dtype), lse.masked_fill(empty[..., 0], math.inf)


# ---- public ops ----


def _window(causal: bool, window_size: tuple[int, int]) -> tuple[int, int]:
    left, right = (int(w) for w in window_size)
    return left, 0 if causal else right


def _scale(q: Tensor, softmax_scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)




def _last_dim_contiguous(t: Tensor | None) -> Tensor | None:
    # The kernels take any strides but a unit one along head_dim (flash-attn's maybe_contiguous).
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs):
    """The body shared by flash_attn_func and flash_attn_varlen_func (their arguments, flash-attn's)."""
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p: attention dropout is not supported, pass 0.0 (got {dropout_p})")
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    left, right = _window(causal, window_size)
    out, lse = ops().flash_attn_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, None, None, block_table, alibi_slopes, max_seqlen_q, max_seqlen_k,
        _scale(q, softmax_scale), left, right, softcap, 0,
    )  # fmt: skip
    # flash-attn returns (out, softmax_lse, S_dmask); S_dmask only exists with dropout, never here.
    return (out, lse, None) if return_attn_probs else out


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q [batch, seqlen_q, heads, d], k/v [batch, seqlen_k, heads_k, d] (heads % heads_k == 0, d <= 256)
    -> out [batch, seqlen_q, heads, d], or (out, lse [batch, heads, seqlen_q] float32, None) with
    return_attn_probs. alibi_slopes: float32 [heads] or [batch, heads]. Differentiable in q, k, v."""
    return _flash_attn(q, k, v, None, None, None, q.shape[1], k.shape[1], dropout_p, softmax_scale, causal,
                       window_size, softcap, alibi_slopes, return_attn_probs)  # fmt: skip


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: Tensor | None = None,
):
    """Packed sequences: q [total_q, heads, d], k/v [total_k, heads_k, d] with int32 cu_seqlens_q/k
    [batch + 1] (offsets; max_seqlen_* bound the lengths), or k/v a paged cache [num_blocks, block_size,
    heads_k, d] with block_table [batch, max_blocks] (cu_seqlens_k then gives each sequence's key count).
    -> out [total_q, heads, d], or (out, lse [heads, total_q] float32, None). Differentiable in q, k, v
    (not through a block_table)."""
    return _flash_attn(q, k, v, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k, dropout_p,
                       softmax_scale, causal, window_size, softcap, alibi_slopes, return_attn_probs)  # fmt: skip


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Writes k/v [tokens, heads_k, d] into the paged caches [num_blocks, block_size, heads_k, d] in place at
    slot_mapping [tokens] (int64, slot = block * block_size + offset; -1 skips the token)."""
    ops().write_kv_cache(_last_dim_contiguous(k), _last_dim_contiguous(v), k_cache, v_cache, slot_mapping)


def _cos_sin_cache(rotary_cos: Tensor, rotary_sin: Tensor) -> Tensor:
    # flash-attn's rotary_cos/sin [seqlen_ro, rotary_dim / 2] as llmkern's [seqlen_ro, rotary_dim] cache.
    return torch.cat((rotary_cos, rotary_sin), dim=-1).float().contiguous()


def _check_append_room(cache_seqlens: Tensor, seqlen_new: int, capacity: int) -> None:
    # Before anything is written: a sequence grown past its cache row would overwrite the next row's keys.
    if cache_seqlens.numel() == 0:
        return
    lo, hi = (int(x) for x in cache_seqlens.aminmax())
    if lo < 0 or hi + seqlen_new > capacity:
        raise ValueError(f"cache_seqlens: appending {seqlen_new} token(s) needs values in [0, {capacity - seqlen_new}] "
                         f"(the cache holds {capacity} per sequence), got values in [{lo}, {hi}]")


def _append_kv(k, v, k_cache, v_cache, positions, cache_batch_idx, block_table):
    """Writes k/v [batch, seqlen_new, heads_k, d] at positions [batch, seqlen_new] of each sequence."""
    b = positions.shape[0]
    if block_table is not None:
        block_size = k_cache.shape[1]
        blocks = block_table.long().gather(1, positions // block_size)
        slots = blocks * block_size + positions % block_size
    else:  # a [batch_cache, seqlen_cache, ...] cache is a paged one with one block of seqlen_cache per row
        rows = torch.arange(b, device=k.device) if cache_batch_idx is None else cache_batch_idx.long()
        slots = rows[:, None] * k_cache.shape[1] + positions
    write_kv_cache(k.flatten(0, 1), v.flatten(0, 1), k_cache, v_cache, slots.flatten())


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Tensor | None = None,
    v: Tensor | None = None,
    rotary_cos: Tensor | None = None,
    rotary_sin: Tensor | None = None,
    cache_seqlens: int | Tensor | None = None,
    cache_batch_idx: Tensor | None = None,
    cache_leftpad: Tensor | None = None,
    block_table: Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Decode / chunked prefill over a KV cache, flash-attn's contract (inference: no autograd).

    q [batch, seqlen_q, heads, d]; k_cache/v_cache [batch_cache, seqlen_cache, heads_k, d] (sequence b in row b,
    batch_cache >= batch, or in row cache_batch_idx[b]), or paged [num_blocks, block_size, heads_k, d] with
    block_table [batch, max_blocks] int32. cache_seqlens (int or int32 [batch]): keys already in each sequence's
    cache (None: the whole cache). k/v [batch, seqlen_new, heads_k, d]: appended in place at cache_seqlens before
    attending (ValueError, before any write, when a sequence has no room; not checked under torch.compile,
    where it would cost a graph break). rotary_cos/sin [seqlen_ro,
    rotary_dim / 2]: rotate k at its new positions and q at cache_seqlens + i (causal or local) or at
    cache_seqlens (otherwise); rotary_interleaved: GPT-J pairs, else NeoX halves. cache_batch_idx [batch]
    int32: the cache row of each sequence (non-paged). num_splits: split-K chunks (0: chosen).
    -> out [batch, seqlen_q, heads, d], or (out, lse [batch, heads, seqlen_q]) with return_softmax_lse."""
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad: not supported (pass None)")
    if (k is None) != (v is None):
        raise ValueError("k, v: pass both new k and v, or neither")
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos, rotary_sin: pass both, or neither")
    q = _last_dim_contiguous(q)
    batch, seqlen_q = q.shape[:2]
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    if cache_seqlens is None and (k is not None or rotary_cos is not None):
        raise ValueError("cache_seqlens: required to append k/v or apply rotary (where does each sequence end?)")
    left, right = _window(causal, window_size)
    cos_sin = None if rotary_cos is None else _cos_sin_cache(rotary_cos, rotary_sin)
    seqlen_k = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    if block_table is None and cache_batch_idx is None and k_cache.shape[0] > batch:
        # flash-attn: sequence b is cache row b, rows past q's batch unused (a cache sized for the largest batch).
        cache_batch_idx = torch.arange(batch, dtype=torch.int32, device=q.device)
    seqused = cache_seqlens
    if k is not None:
        seqlen_new = k.shape[1]
        if not torch.compiler.is_compiling():  # reading the lengths would break a compiled graph
            _check_append_room(cache_seqlens, seqlen_new, seqlen_k)
        positions = cache_seqlens.long()[:, None] + torch.arange(seqlen_new, device=q.device)
        if cos_sin is not None:
            k = apply_rotary_emb(k, positions, cos_sin, is_neox=not rotary_interleaved)
        _append_kv(k, v, k_cache, v_cache, positions, cache_batch_idx, block_table)
        seqused = (cache_seqlens + seqlen_new).to(torch.int32)
    if cos_sin is not None:
        # Query i sits at cache_seqlens + i when the mask depends on it (causal or local), as flash-attn's kernel
        # decides: a window side as wide as the cache is unbounded there.
        local = causal or 0 <= left < seqlen_k or 0 <= right < seqlen_k
        offsets = torch.arange(seqlen_q, device=q.device) if local else 0
        positions = cache_seqlens.long()[:, None] + offsets
        q = apply_rotary_emb(q, positions.expand(batch, seqlen_q).contiguous(), cos_sin, is_neox=not rotary_interleaved)
    out, lse = ops().flash_attn_fwd(
        q, k_cache, v_cache, None, None, seqused, cache_batch_idx, block_table, alibi_slopes, seqlen_q, seqlen_k,
        _scale(q, softmax_scale), left, right, softcap, num_splits,
    )  # fmt: skip
    return (out, lse) if return_softmax_lse else out


# ---- torch.compile and autograd registration ----


def _register() -> None:
    @torch.library.register_fake("llmkern::flash_attn_fwd")
    def _(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, kv_batch_idx, block_table, alibi_slopes, *args):
        check_same_device("q", q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                          seqused_k=seqused_k, kv_batch_idx=kv_batch_idx, block_table=block_table,
                          alibi_slopes=alibi_slopes)  # fmt: skip
        out = q.new_empty(q.shape)
        if cu_seqlens_q is not None:
            return out, q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
        return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)

    @torch.library.register_fake("llmkern::flash_attn_bwd")
    def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, alibi_slopes, *args):
        check_same_device("q", q, dout=dout, k=k, v=v, out=out, lse=lse, cu_seqlens_q=cu_seqlens_q,
                          cu_seqlens_k=cu_seqlens_k, alibi_slopes=alibi_slopes)  # fmt: skip
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("llmkern::write_kv_cache")
    def _(k, v, k_cache, v_cache, slot_mapping):
        check_same_device("k", k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
        return None

    def setup_context(ctx, inputs, output):
        q, k, v, cu_q, cu_k, seqused_k, kv_batch_idx, block_table, alibi, msq, msk, scale, left, right, cap, _ = inputs
        ctx.kv_cache = seqused_k is not None or kv_batch_idx is not None or block_table is not None
        ctx.save_for_backward(q, k, v, *output, cu_q, cu_k, alibi)
        ctx.args = (msq, msk, scale, left, right, cap)

    def backward(ctx, dout, dlse):
        if ctx.kv_cache:
            raise RuntimeError("flash_attn: no backward through a KV cache (block_table, cache_seqlens, cache_batch_idx)")
        q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
        dq, dk, dv = ops().flash_attn_bwd(_last_dim_contiguous(dout), q, k, v, out, lse, cu_q, cu_k, alibi, *ctx.args)
        return (dq, dk, dv) + (None,) * 13

    torch.library.register_autograd("llmkern::flash_attn_fwd", backward, setup_context=setup_context)


if available():
    _register()
