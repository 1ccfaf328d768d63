"""Rotary position embedding (RoPE, Su et al. 2021, arXiv:2104.09864) and its cos/sin cache.

For each pair (a, b) of rotated features and theta_i = position * inv_freq[i]:
    a' = a cos(theta_i) - b sin(theta_i),   b' = b cos(theta_i) + a sin(theta_i)
NeoX style (is_neox=True; Llama, Qwen, Mistral, what transformers' `rotate_half` does) pairs feature i with
i + rotary_dim/2; GPT-J style pairs 2i with 2i+1. Only the first rotary_dim = cos_sin_cache.size(1)
features of each head rotate (partial rotary); the rest pass through.

cos_sin_cache is float32 [max_position, rotary_dim]: cos(theta_0 .. theta_{r/2-1}) then sin(...) (vLLM's
layout), built by `rope_cos_sin_cache` or `rope_cos_sin_cache_from_config`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from llmkern._ext import available, ops
from llmkern.ops._common import acc_dtype, check_same_device

# ---- cos/sin cache (inverse frequencies exactly as transformers' modeling_rope_utils computes them) ----


def _rope_type(rope_scaling: str | dict | None) -> str:
    if rope_scaling is None:
        return "default"
    if isinstance(rope_scaling, str):
        return rope_scaling
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def _param(rope_scaling: dict, key: str, rope_type: str) -> Any:
    if key not in rope_scaling:
        raise ValueError(f"rope_scaling: rope_type {rope_type!r} needs {key!r}, got keys {sorted(rope_scaling)}")
    return rope_scaling[key]


def rope_inv_freq(rotary_dim: int, base: float = 10000.0, rope_scaling: str | dict | None = None) -> Tensor:
    """inv_freq [rotary_dim/2] float32, computed in float32 with the same operations as transformers
    (`compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
    `_compute_llama3_parameters`), so both start from bit-identical frequencies."""
    if not (isinstance(rotary_dim, int) and rotary_dim > 0 and rotary_dim % 2 == 0):
        raise ValueError(f"rotary_dim: expected a positive even int, got {rotary_dim!r}")
    rope_type = _rope_type(rope_scaling)
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(f"rope_scaling: unsupported rope_type {rope_type!r}; supported: 'default', 'linear', 'llama3'")
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    if rope_type == "linear":
        inv_freq /= _param(rope_scaling, "factor", rope_type)
    elif rope_type == "llama3":  # Llama 3.1: keep high frequencies, divide low ones by factor, blend between
        factor = _param(rope_scaling, "factor", rope_type)
        low_freq_factor = _param(rope_scaling, "low_freq_factor", rope_type)
        high_freq_factor = _param(rope_scaling, "high_freq_factor", rope_type)
        old_context_len = _param(rope_scaling, "original_max_position_embeddings", rope_type)
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    return inv_freq


def rope_cos_sin_cache(
    rotary_dim: int,
    max_position: int,
    base: float = 10000.0,
    rope_scaling: str | dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """cos|sin cache [max_position, rotary_dim] for the kernels (which take float32).

    rope_scaling: None or "default", or a dict like transformers' config.rope_scaling / rope_parameters:
    {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} (the older key "type" is accepted too).
    The angles position * inv_freq are taken in float64 (transformers uses float32, whose angle error
    grows as position * 2^-24 rad), then cos and sin are rounded once to `dtype`."""
    if not (isinstance(max_position, int) and max_position >= 0):
        raise ValueError(f"max_position: expected an int >= 0, got {max_position!r}")
    inv_freq = rope_inv_freq(rotary_dim, base, rope_scaling).double()
    angles = torch.arange(max_position, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)


def rope_parameters(hf_config: Any) -> tuple[float, dict | None, float]:
    """(rope_theta, scaling dict for rope_cos_sin_cache or None for plain rope, partial_rotary_factor) of a
    transformers config object or a parsed config.json dict: `rope_parameters` (transformers 5.x: rope_theta,
    rope_type, partial_rotary_factor and the scaling keys in one dict) or, for older configs, `rope_theta` /
    `rope_scaling` ({"type" | "rope_type", ...}) / `partial_rotary_factor`."""
    if isinstance(hf_config, Mapping):
        get = hf_config.get
    else:
        def get(key, default=None):
            return getattr(hf_config, key, default)
    params = dict(get("rope_parameters") or get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("rope_parameters: per-layer-type rope parameters are not supported; pass one layer "
                         "type's dict to rope_cos_sin_cache")
    theta = float(params.pop("rope_theta", None) or get("rope_theta") or get("default_theta") or 10000.0)
    partial = params.pop("partial_rotary_factor", None) or get("partial_rotary_factor") or 1.0
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type == "default":
        return theta, None, partial
    if rope_type == "llama3":  # transformers' standardize_rope_params default
        params.setdefault("original_max_position_embeddings", get("max_position_embeddings"))
    return theta, {"rope_type": rope_type, **params}, partial


def rope_cos_sin_cache_from_config(hf_config: Any, max_position: int | None = None) -> Tensor:
    """The cache for a transformers config (rope settings read by rope_parameters), of width `head_dim`
    (else hidden_size // num_attention_heads) times partial_rotary_factor. max_position defaults to
    config.max_position_embeddings."""
    base, scaling, partial = rope_parameters(hf_config)
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    if max_position is None:
        max_position = hf_config.max_position_embeddings
    return rope_cos_sin_cache(int(head_dim * partial), max_position, base, scaling)


# ---- pure-PyTorch reference (the definition; tests run it in float64) ----


def rotary_embedding_ref(
    x: Tensor, positions: Tensor, cos_sin_cache: Tensor, is_neox: bool = True, inverse: bool = False
) -> Tensor:
    """x [..., heads, head_dim], positions x.shape[:-2]; computed in float32 (float64 for float64 x)."""
    acc = acc_dtype(x.dtype)
    rotary_dim = cos_sin_cache.shape[-1]
    half = rotary_dim // 2
    cs = cos_sin_cache[positions].to(acc).unsqueeze(-2)  # [..., 1, rotary_dim], broadcast over heads
    cos, sin = cs[..., :half], cs[..., half:]
    if inverse:
        sin = -sin
    xf = x.to(acc)
    rot, rest = xf[..., :rotary_dim], xf[..., rotary_dim:]
    x1, x2 = (rot[..., :half], rot[..., half:]) if is_neox else (rot[..., 0::2], rot[..., 1::2])
    y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    y = torch.cat((y1, y2), -1) if is_neox else torch.stack((y1, y2), -1).flatten(-2)
    return torch.cat((y, rest), -1).to(x.dtype)


# ---- public ops ----


def rotary_embedding_(
    positions: Tensor, query: Tensor, key: Tensor | None, cos_sin_cache: Tensor, is_neox: bool = True
) -> None:
    """In place, for inference (vLLM's contract): rotates query [..., heads, head_dim] and key
    [..., kv_heads, head_dim] (or None) at positions [...] (int64). q/k may be views into a fused qkv
    buffer (any token and head strides, unit stride along head_dim). Positions are checked against
    cos_sin_cache.size(0) before anything is written."""
    ops().rotary_embedding_(positions, query, key, cos_sin_cache, is_neox)


def apply_rotary_emb(
    x: Tensor, positions: Tensor, cos_sin_cache: Tensor, is_neox: bool = True, *, out: Tensor | None = None
) -> Tensor:
    """Out of place on x [..., heads, head_dim] at positions x.shape[:-2] (int64); differentiable in x
    (the backward is the inverse rotation). The cache is treated as a constant.
    With `out` (shaped like x; may be a strided view, e.g. into a fused buffer, or x itself), writes into
    it (inference; no autograd)."""
    if out is not None:
        ops().rotary_embedding_out(out, positions, x, cos_sin_cache, is_neox, False)
        return out
    return ops().rotary_embedding(positions, x, cos_sin_cache, is_neox, False)


# ---- torch.compile and autograd registration ----


def _register() -> None:
    @torch.library.register_fake("llmkern::rotary_embedding_")
    def _(positions, query, key, cos_sin_cache, is_neox):
        check_same_device("query", query, positions=positions, key=key, cos_sin_cache=cos_sin_cache)
        return None

    @torch.library.register_fake("llmkern::rotary_embedding")
    def _(positions, x, cos_sin_cache, is_neox, inverse):
        check_same_device("x", x, positions=positions, cos_sin_cache=cos_sin_cache)
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    @torch.library.register_fake("llmkern::rotary_embedding_out")
    def _(out, positions, x, cos_sin_cache, is_neox, inverse):
        check_same_device("x", x, out=out, positions=positions, cos_sin_cache=cos_sin_cache)
        return None

    def setup_context(ctx, inputs, output):
        positions, _, cos_sin_cache, is_neox, inverse = inputs
        ctx.save_for_backward(positions, cos_sin_cache)
        ctx.is_neox, ctx.inverse = is_neox, inverse

    def backward(ctx, dy):
        # A rotation's transpose is its inverse: dx = R(-theta) dy.
        positions, cos_sin_cache = ctx.saved_tensors
        dx = ops().rotary_embedding(positions, dy, cos_sin_cache, ctx.is_neox, not ctx.inverse)
        return None, dx, None, None, None

    torch.library.register_autograd("llmkern::rotary_embedding", backward, setup_context=setup_context)


if available():
    _register()
