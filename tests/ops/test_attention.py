"""Attention (flash_attn_func / varlen / with_kvcache, write_kv_cache) against attention_ref in float64.

The rule (flash-attn's tests): forward error at most 2x, gradients at most 3x, the error of the same math
done by PyTorch in the input dtype. Each test runs on every CPU ISA path or on CUDA (`backend`), where the
grid allows; the big shapes run on the default CPU path only and the largest are marked slow.
"""

import math

import pytest
import torch

import llmkern.ops as lk
from llmkern.ops.attention import attention_ref
from llmkern.ops.rope import rope_cos_sin_cache, rotary_embedding_ref
from tests.helpers import DTYPES, assert_close_derived, grads

SEQLENS = [(1, 1), (1, 239), (113, 203), (128, 217), (239, 113)]
HEAD_DIMS = [32, 59, 64, 111, 128, 256]
HEADS = [(4, 4), (8, 2), (8, 1)]  # (heads, heads_k): MHA, GQA 4, MQA


def rand(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def qkv(b, sq, sk, h, hk, d, dtype, device="cpu"):
    return rand(b, sq, h, d, dtype=dtype, device=device), *(rand(b, sk, hk, d, dtype=dtype, device=device) for _ in "kv")


def on_cpu(kw):
    return {n: t.cpu() if torch.is_tensor(t) else t for n, t in kw.items()}


def check_fwd(out, lse, q, k, v, **kw):
    """out (2x rule) and lse (float32 accuracy) of one fixed-length call against attention_ref."""
    kw = on_cpu(kw)
    want, want_lse = attention_ref(q.cpu().double(), k.cpu().double(), v.cpu().double(), **kw)
    same, _ = attention_ref(q.cpu(), k.cpu(), v.cpu(), **kw)
    assert_close_derived(out.cpu(), want, same)
    torch.testing.assert_close(lse.cpu(), want_lse.float(), rtol=2e-5, atol=2e-5)


def run_fwd(q, k, v, **kw):
    return lk.flash_attn_func(q, k, v, return_attn_probs=True, **kw)[:2]


def check_grads(q, k, v, **kw):
    dout = torch.randn(q.shape, dtype=torch.float64)
    kern = grads(lambda q, k, v: lk.flash_attn_func(q, k, v, **kw), [q, k, v], [dout])
    cpu, kw = [t.cpu() for t in (q, k, v)], on_cpu(kw)
    want = grads(lambda q, k, v: attention_ref(q, k, v, **kw)[0], [t.double() for t in cpu], [dout])
    same = grads(lambda q, k, v: attention_ref(q, k, v, **kw)[0], cpu, [dout])
    # Where PyTorch is exact (one key: p = 1, dq = 0), a flash backward still rounds: p = exp(s - lse) with
    # a float32 lse has relative error ~ eps * |lse|, and dq = scale * (dp - delta) k cancels. Allow a few
    # such roundings of the largest gradient.
    lse = attention_ref(*(t.double() for t in cpu), **kw)[1]
    scale = 4 * max(w.abs().max().item() for w in want) * max(1.0, lse.nan_to_num(posinf=0).abs().max().item())
    for name, g, w, s in zip(["dq", "dk", "dv"], kern, want, same):
        assert_close_derived(g.cpu(), w, s, factor=3.0, name=name, scale=scale)


# ---- forward ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("sq,sk", SEQLENS)
def test_forward_grid(sq, sk, d, causal, dtype):
    h, hk = HEADS[(sq + d) % len(HEADS)]
    q, k, v = qkv(2, sq, sk, h, hk, d, dtype)
    check_fwd(*run_fwd(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,sk,d,h,hk,causal", [(113, 203, 59, 4, 4, True), (1, 239, 128, 8, 2, False),
                                                 (128, 217, 111, 8, 1, True), (239, 113, 64, 4, 2, True)])
def test_forward_backends(device, sq, sk, d, h, hk, causal, dtype):
    q, k, v = qkv(2, sq, sk, h, hk, d, dtype, device)
    check_fwd(*run_fwd(q, k, v, causal=causal), q, k, v, causal=causal)


FEATURES = {
    "window": dict(window_size=(17, 5)),
    "window_left_causal": dict(window_size=(40, -1), causal=True),
    "window_right": dict(window_size=(-1, 3)),
    "softcap": dict(softcap=0.5),  # small on purpose: most scores are capped
    "alibi": dict(alibi=(8,)),
    "alibi_batch_causal": dict(alibi=(2, 8), causal=True),
    "scale": dict(softmax_scale=0.3),
    "all": dict(window_size=(60, 0), softcap=2.0, alibi=(8,), softmax_scale=0.2),
}


def feature_kwargs(name, device):
    kw = dict(FEATURES[name])
    if "alibi" in kw:
        kw["alibi_slopes"] = torch.rand(*kw.pop("alibi"), device=device) * 0.3
    return kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", FEATURES)
def test_forward_features(device, feature, dtype):
    kw = feature_kwargs(feature, device)
    q, k, v = qkv(2, 113, 203, 8, 2, 64, dtype, device)
    check_fwd(*run_fwd(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_window_tiles_over_packed_keys(device, dtype):
    # 8 (batch, kv head) tasks fill the threads, so each packs its keys once for all 4 query tiles; the
    # window starts tile i0 at key i0 + 11 - 36: odd offsets from the pack's first key.
    kw = dict(causal=True, window_size=(36, 5))
    q, k, v = qkv(2, 200, 211, 8, 4, 64, dtype, device)
    check_fwd(*run_fwd(q, k, v, **kw), q, k, v, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_keys_beyond_the_pack(device, dtype):
    # More keys than a task packs (16 MiB of fp32 k and v rows: 8192 at head dim 256): tiles load their own. In
    # float32 this also holds the output to the 2x rule over 8K keys, where the output (~|v| / sqrt(keys)) is
    # small against the accumulation's rounding unless every tile's sum is added to O as a block.
    q, k, v = qkv(1, 17, 8301, 1, 1, 256, dtype, device)
    check_fwd(*run_fwd(q, k, v), q, k, v)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
@pytest.mark.parametrize("sq,sk,d,causal", [(1023, 1024, 128, True), (1023, 1024, 64, False)])
def test_forward_long(sq, sk, d, causal, dtype):
    q, k, v = qkv(1, sq, sk, 4, 2, d, dtype)
    check_fwd(*run_fwd(q, k, v, causal=causal), q, k, v, causal=causal)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_forward_2048(d, dtype):
    q, k, v = qkv(1, 2048, 2048, 4, 1, d, dtype)
    check_fwd(*run_fwd(q, k, v, causal=True), q, k, v, causal=True)


def test_forward_float64_head_dim_128(cpu_isa):
    # The float64 path (gradcheck's) at head dim 128 on two threads: GCC 12 vectorized its k loop, which then read
    # past the end of a thread's key pack (a segfault where the pack ended a heap). Its scale is float32: 1e-6.
    q, k, v = qkv(2, 113, 203, 8, 2, 128, torch.float64)
    want = attention_ref(q, k, v, causal=True)[0]
    torch.testing.assert_close(lk.flash_attn_func(q, k, v, causal=True), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_nan_key_propagates(device, dtype):
    # A NaN in a key reaches every query that sees it, as in PyTorch (a key that silently dropped out would hide
    # corrupted inputs, and the paged tests' NaN-filled slots rely on NaN showing); the other queries stay finite.
    q, k, v = qkv(1, 100, 100, 4, 4, 64, dtype, device)
    k[0, 70, 1, 5] = math.nan
    out = lk.flash_attn_func(q, k, v, causal=True)
    assert out[0, 70:, 1].isnan().all() and not out[0, :70].isnan().any() and not out[:, :, [0, 2, 3]].isnan().any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_probabilities_below_the_float_range(device, dtype):
    # Scores spread over +-60: most probabilities underflow to 0 or to denormals. The AVX-512 exps mask the lanes
    # whose result is 0 off instead of computing them (each underflow is a microcode assist on Intel cores).
    q, k, v = qkv(1, 130, 130, 2, 2, 64, dtype, device)
    q = q * 16
    check_fwd(*run_fwd(q, k, v, causal=True), q, k, v, causal=True)


def test_forward_strided(device):
    """q, k, v as views into one fused [b, s, 3, h, d] qkv buffer, and a q with a non-unit head_dim stride."""
    qkv_buf = rand(2, 77, 3, 4, 59, device=device)
    q, k, v = qkv_buf.unbind(2)
    check_fwd(*run_fwd(q, k, v, causal=True), q, k, v, causal=True)
    q_t = rand(2, 4, 59, 77, device=device).permute(0, 3, 1, 2)  # head_dim not contiguous: copied
    check_fwd(*run_fwd(q_t, k, v), q_t, k, v)


def test_forward_lse_of_empty_rows(device):
    """Causal with seqlen_q > seqlen_k: the first rows see no key: out 0, lse +inf."""
    q, k, v = qkv(1, 9, 4, 2, 2, 32, torch.float32, device)
    out, lse = run_fwd(q, k, v, causal=True)
    assert torch.equal(out[0, :5].cpu(), torch.zeros(5, 2, 32))
    assert torch.isposinf(lse[0, :, :5]).all()
    check_fwd(out, lse, q, k, v, causal=True)


# ---- backward ----


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [32, 59, 111, 128])
@pytest.mark.parametrize("sq,sk", SEQLENS[:4] + [(239, 113)])
def test_backward_grid(sq, sk, d, causal, dtype):
    h, hk = HEADS[(sq + d) % len(HEADS)]
    check_grads(*qkv(2, sq, sk, h, hk, d, dtype), causal=causal)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", FEATURES)
def test_backward_features(device, feature, dtype):
    kw = feature_kwargs(feature, device)
    q, k, v = qkv(2, 71, 130, 8, 2, 64, dtype, device)
    check_grads(q, k, v, **kw)


@pytest.mark.parametrize("d", [64, 256])
def test_backward_long(d):
    check_grads(*qkv(1, 1023, 1024, 4, 1, d, torch.bfloat16), causal=True)


@pytest.mark.parametrize("causal", [False, True])
def test_backward_gradcheck_float64(device, causal):
    q, k, v = (t.requires_grad_() for t in qkv(1, 5, 7, 2, 1, 9, torch.float64, device))
    slopes = torch.rand(2, device=device, dtype=torch.float32)
    fn = lambda q, k, v: lk.flash_attn_func(q, k, v, causal=causal, softcap=1.5, alibi_slopes=slopes)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_backward_deterministic(device):
    q, k, v = qkv(1, 300, 300, 8, 2, 64, torch.bfloat16, device)
    dout = torch.randn(q.shape)
    first = grads(lambda q, k, v: lk.flash_attn_func(q, k, v, causal=True, deterministic=True), [q, k, v], [dout])
    again = grads(lambda q, k, v: lk.flash_attn_func(q, k, v, causal=True, deterministic=True), [q, k, v], [dout])
    for a, b in zip(first, again):
        assert torch.equal(a, b)


# ---- varlen ----


def packed(lengths, h, d, dtype, device):
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    return rand(sum(lengths), h, d, dtype=dtype, device=device), cu


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_each_sequence_alone(device, causal, dtype):
    lens_q, lens_k = [5, 0, 130, 1, 64], [9, 3, 200, 1, 64]
    q, cu_q = packed(lens_q, 8, 59, dtype, device)
    k, cu_k = packed(lens_k, 2, 59, dtype, device)
    v = torch.randn_like(k)
    dout = torch.randn(q.shape)
    fn = lambda q, k, v: lk.flash_attn_varlen_func(  # noqa: E731
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, window_size=(50, -1)
    )
    out = fn(q, k, v)
    dq, dk, dv = grads(fn, [q, k, v], [dout])
    for b in range(len(lens_q)):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        args = [t[None] for t in (q[qs], k[ks], v[ks])]
        kw = dict(causal=causal, window_size=(50, -1))
        alone = grads(lambda q, k, v: lk.flash_attn_func(q, k, v, **kw), args, [dout[qs][None]])
        # Equal up to summation order (a kernel may split keys differently for one sequence than for five).
        tol = dict(rtol=4 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
        torch.testing.assert_close(out[qs], lk.flash_attn_func(*args, **kw)[0], **tol)
        for g, a in zip((dq[qs], dk[ks], dv[ks]), alone):
            torch.testing.assert_close(g, a[0], rtol=1e-5, atol=1e-5 if dtype == torch.float32 else tol["atol"])
        if lens_q[b]:
            check_fwd(*run_fwd(*args, **kw), *args, **kw)


def test_varlen_lse_layout(device):
    q, cu = packed([3, 4], 2, 32, torch.float32, device)
    out, lse, _ = lk.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, return_attn_probs=True)
    assert lse.shape == (2, 7) and lse.dtype == torch.float32
    _, lse0 = attention_ref(q[None, :3].cpu().double(), q[None, :3].cpu().double(), q[None, :3].cpu().double())
    torch.testing.assert_close(lse[:, :3].cpu(), lse0[0].float(), rtol=1e-5, atol=1e-5)


def test_varlen_rows_outside_sequences(device):
    # Packed rows before the first offset and after the last are not attention rows: out 0, lse +inf (the op
    # clears only those rows on the CPU). Blocks of the same size freed full of NaN first, so that rows the op left
    # unwritten would show.
    q = rand(12, 2, 32, dtype=torch.float32, device=device)
    cu = torch.tensor([2, 5, 9], dtype=torch.int32, device=device)
    for _ in range(3):
        torch.full_like(q, float("nan")), torch.full((2, 12), float("nan"), device=device)
        out, lse, _ = lk.flash_attn_varlen_func(q, q, q, cu, cu, 4, 4, return_attn_probs=True)
        outside = [0, 1, 9, 10, 11]
        assert (out[outside] == 0).all() and torch.isposinf(lse[:, outside]).all()
        for a, b in ((2, 5), (5, 9)):
            torch.testing.assert_close(out[a:b], lk.flash_attn_func(q[None, a:b], q[None, a:b], q[None, a:b])[0])


# ---- paged KV cache ----


def paged_cache(k, v, lens, block_size, shuffle=True):
    """k/v [b, s, hk, d] -> (NaN-filled k_cache, v_cache [blocks, block_size, hk, d], block_table [b,
    max_blocks]): each sequence's first lens[b] keys in (shuffled) blocks; unused slots and blocks stay NaN and
    unused table entries point at block 0, which is never written. Reading anything but a key shows as NaN."""
    b, s, hk, d = k.shape
    per_seq = -(-s // block_size)
    num_blocks = b * per_seq + 3
    order = torch.randperm(num_blocks - 1)[: b * per_seq] + 1 if shuffle else torch.arange(1, b * per_seq + 1)
    table = order.view(b, per_seq).to(torch.int32)
    caches = [torch.full((num_blocks, block_size, hk, d), math.nan, dtype=k.dtype, device=k.device) for _ in "kv"]
    for i in range(b):
        table[i, -(-lens[i] // block_size) :] = 0
        for j in range(lens[i]):
            for cache, src in zip(caches, (k, v)):
                cache[table[i, j // block_size], j % block_size] = src[i, j]
    return *caches, table.to(k.device)


def ref_per_sequence(q, k, v, lens, **kw):
    outs = [attention_ref(q[i : i + 1].double(), k[i : i + 1, :n].double(), v[i : i + 1, :n].double(), **kw)[0]
            for i, n in enumerate(lens)]  # fmt: skip
    same = [attention_ref(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], **kw)[0] for i, n in enumerate(lens)]
    return torch.cat(outs), torch.cat(same)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 16, 256])
@pytest.mark.parametrize("sq", [1, 5])
def test_paged_equals_contiguous(device, sq, block_size, dtype):
    b, s, h, hk, d = 3, 300, 8, 2, 128
    lens = [300, 17, 140]
    q, k, v = qkv(b, sq, s, h, hk, d, dtype, device)
    k_cache, v_cache, table = paged_cache(k, v, lens, block_size)
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    causal = sq > 1
    out = lk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table, causal=causal)
    k_nan, v_nan = k.clone(), v.clone()
    for i, n in enumerate(lens):
        k_nan[i, n:], v_nan[i, n:] = math.nan, math.nan
    contiguous = lk.flash_attn_with_kvcache(q, k_nan, v_nan, cache_seqlens=seqlens, causal=causal)
    want, same = ref_per_sequence(q.cpu(), k.cpu(), v.cpu(), lens, causal=causal)
    assert_close_derived(out.cpu(), want, same)
    torch.testing.assert_close(out, contiguous, rtol=1e-5, atol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_paged_split_k(device, num_splits):
    """Flash-decoding: any number of key splits gives the unsplit answer (batch 1, 2 kv heads, long cache)."""
    q, k, v = qkv(1, 1, 2000, 8, 2, 64, torch.bfloat16, device)
    k_cache, v_cache, table = paged_cache(k, v, [1999], 16, shuffle=False)
    seqlens = torch.tensor([1999], dtype=torch.int32, device=device)
    out, lse = lk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                         num_splits=num_splits, return_softmax_lse=True)  # fmt: skip
    want, same = ref_per_sequence(q.cpu(), k.cpu(), v.cpu(), [1999])
    assert_close_derived(out.cpu(), want, same)
    _, want_lse = attention_ref(q.cpu().double(), k[:, :1999].cpu().double(), v[:, :1999].cpu().double())
    torch.testing.assert_close(lse.cpu(), want_lse.float(), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("feature", FEATURES)
@pytest.mark.parametrize("sq,hk", [(1, 8), (1, 2), (2, 4)])
def test_paged_decode_features(device, sq, hk, feature, dtype):
    """Decode and two-token steps over a paged cache, 1, 4 and 4 query rows per kv head over 8, 2 and 4 kv heads (the
    grouped path; bf16 on avx512bf16 reads the keys in memory order there): head dim 59, 203 keys (a partial last
    chunk), each feature."""
    kw = feature_kwargs(feature, device)
    q, k, v = qkv(2, sq, 203, 8, hk, 59, dtype, device)
    k_cache, v_cache, table = paged_cache(k, v, [203, 203], 16)
    seqlens = torch.tensor([203, 203], dtype=torch.int32, device=device)
    out, lse = lk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table,
                                         return_softmax_lse=True, **kw)  # fmt: skip
    check_fwd(out, lse, q, k, v, **kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sq,g", [(1, 3), (1, 5), (1, 6), (1, 7), (2, 5), (3, 3)])
def test_paged_decode_group_rows(device, sq, g, dtype):
    """GQA groups whose query rows (sq * g) are not whole blocks of 4: 3, 5, 6, 7, 9 and 10 rows per kv head take the
    grouped path's smaller row blocks (causal, one kv head, 203 keys)."""
    q, k, v = qkv(2, sq, 203, g, 1, 64, dtype, device)
    k_cache, v_cache, table = paged_cache(k, v, [203, 203], 16)
    seqlens = torch.tensor([203, 203], dtype=torch.int32, device=device)
    out, lse = lk.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, block_table=table, causal=True,
                                         return_softmax_lse=True)  # fmt: skip
    check_fwd(out, lse, q, k, v, causal=True)


@pytest.mark.parametrize("paged", [False, True])
def test_kvcache_append_then_attend(device, paged):
    """Appending new k/v at cache_seqlens then attending equals attending over the concatenated cache."""
    b, h, hk, d, cap, new = 2, 4, 2, 64, 64, 3
    lens = [10, 33]
    q = rand(b, new, h, d, device=device)
    k_old, v_old, k_new, v_new = (rand(b, n, hk, d, device=device) for n in (cap, cap, new, new))
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    if paged:
        k_cache, v_cache, table = paged_cache(k_old, v_old, lens, 16)  # the appended keys fit the used blocks
    else:
        k_cache, v_cache, table = k_old.clone(), v_old.clone(), None
    out = lk.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=seqlens, block_table=table,
                                     causal=True)  # fmt: skip
    for i, n in enumerate(lens):
        k_all = torch.cat([k_old[i, :n], k_new[i]])[None]
        v_all = torch.cat([v_old[i, :n], v_new[i]])[None]
        want = lk.flash_attn_func(q[i : i + 1], k_all, v_all, causal=True)
        torch.testing.assert_close(out[i : i + 1], want, rtol=1e-5, atol=1e-5)
        if not paged:
            torch.testing.assert_close(k_cache[i, n : n + new], k_new[i], rtol=0, atol=0)


@pytest.mark.parametrize("interleaved", [True, False])
def test_kvcache_rotary(device, interleaved):
    """rotary_cos/sin rotate the new k at its positions and q at cache_seqlens + i (causal)."""
    b, h, hk, d, cap, new = 2, 4, 2, 64, 40, 2
    lens = [7, 20]
    q, k_new, v_new = rand(b, new, h, d, device=device), rand(b, new, hk, d, device=device), rand(b, new, hk, d, device=device)
    k_cache, v_cache = rand(b, cap, hk, d, device=device), rand(b, cap, hk, d, device=device)
    k_before = k_cache.clone()
    cache = rope_cos_sin_cache(32, 64).to(device)  # rotary_dim 32 < d: partial rotary
    cos, sin = cache[:, :16], cache[:, 16:]
    seqlens = torch.tensor(lens, dtype=torch.int32, device=device)
    out = lk.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos, rotary_sin=sin,
                                     cache_seqlens=seqlens, causal=True, rotary_interleaved=interleaved)  # fmt: skip
    pos = seqlens.long()[:, None] + torch.arange(new, device=device)
    k_rot = rotary_embedding_ref(k_new, pos, cache, is_neox=not interleaved)
    q_rot = rotary_embedding_ref(q, pos, cache, is_neox=not interleaved)
    for i, n in enumerate(lens):
        torch.testing.assert_close(k_cache[i, n : n + new], k_rot[i], rtol=1e-6, atol=1e-6)
        k_all = torch.cat([k_before[i, :n], k_rot[i]])[None]
        v_all = torch.cat([v_cache[i, :n], v_new[i]])[None]
        torch.testing.assert_close(out[i : i + 1], lk.flash_attn_func(q_rot[i : i + 1], k_all, v_all, causal=True),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("window, local", [((-1, -1), False), ((-1, 5), True), ((-1, 40), False), ((100, 100), False)])
def test_kvcache_rotary_query_positions(window, local):
    """Queries rotate at cache_seqlens + i only when the mask is local; flash-attn's kernel takes a window side as
    wide as the cache (40 here) for unbounded, so such a window rotates every query at cache_seqlens."""
    q, k, v = qkv(2, 3, 40, 4, 2, 32, torch.float32)
    cache = rope_cos_sin_cache(32, 64)
    seqlens = torch.tensor([7, 20], dtype=torch.int32)
    out = lk.flash_attn_with_kvcache(q, k, v, rotary_cos=cache[:, :16], rotary_sin=cache[:, 16:],
                                     cache_seqlens=seqlens, window_size=window)  # fmt: skip
    pos = seqlens.long()[:, None] + (torch.arange(3) if local else torch.zeros(3, dtype=torch.long))
    q_rot = rotary_embedding_ref(q, pos, cache, is_neox=False)
    want = lk.flash_attn_with_kvcache(q_rot, k, v, cache_seqlens=seqlens, window_size=window)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)


def test_kvcache_batch_idx(device):
    q, k, v = qkv(2, 1, 50, 4, 4, 32, torch.float32, device)
    big_k, big_v = rand(5, 50, 4, 32, device=device), rand(5, 50, 4, 32, device=device)
    big_k[[3, 1]], big_v[[3, 1]] = k, v
    idx = torch.tensor([3, 1], dtype=torch.int32, device=device)
    seqlens = torch.tensor([50, 21], dtype=torch.int32, device=device)
    out = lk.flash_attn_with_kvcache(q, big_k, big_v, cache_seqlens=seqlens, cache_batch_idx=idx)
    want = lk.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
    torch.testing.assert_close(out, want, rtol=0, atol=0)


@pytest.mark.parametrize("append", [False, True])
def test_kvcache_larger_than_the_batch(device, append):
    """A cache of more rows than q's batch (one sized for the largest batch): sequence b is row b, as in flash-attn;
    the rows past the batch are neither read nor written."""
    q, k, v = qkv(2, 2, 40, 4, 2, 32, torch.float32, device)
    k_new, v_new = (rand(2, 2, 2, 32, device=device) if append else None for _ in range(2))
    big_k, big_v = rand(5, 40, 2, 32, device=device), rand(5, 40, 2, 32, device=device)
    big_k[:2], big_v[:2] = k, v
    spare = big_k[2:].clone(), big_v[2:].clone()
    seqlens = torch.tensor([30, 17], dtype=torch.int32, device=device)
    out = lk.flash_attn_with_kvcache(q, big_k, big_v, k_new, v_new, cache_seqlens=seqlens, causal=True)
    want = lk.flash_attn_with_kvcache(q, k, v, k_new, v_new, cache_seqlens=seqlens, causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert torch.equal(big_k[:2], k) and torch.equal(big_v[:2], v)  # the same appends as the exact-size cache's
    assert torch.equal(big_k[2:], spare[0]) and torch.equal(big_v[2:], spare[1])


def test_kvcache_append_compiles_fullgraph():
    q, k, v = qkv(2, 1, 40, 4, 2, 32, torch.float32)
    k_new, v_new = rand(2, 1, 2, 32), rand(2, 1, 2, 32)
    seqlens = torch.tensor([30, 17], dtype=torch.int32)
    caches = [(k.clone(), v.clone()) for _ in range(2)]
    step = lambda kc, vc: lk.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=seqlens)  # noqa: E731
    out = torch.compile(step, fullgraph=True, backend="aot_eager")(*caches[0])
    torch.testing.assert_close(out, step(*caches[1]), rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(*caches))  # the same in-place appends


def test_write_kv_cache(device):
    k, v = rand(6, 2, 59, device=device), rand(6, 2, 59, device=device)
    k_cache, v_cache = rand(4, 3, 2, 59, device=device), rand(4, 3, 2, 59, device=device)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([11, -1, 0, 5, -1, 7], device=device)
    lk.write_kv_cache(k, v, k_cache, v_cache, slots)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            want_k.view(12, 2, 59)[s], want_v.view(12, 2, 59)[s] = k[t], v[t]
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


# ---- torch.library contract ----


def test_opcheck():
    ops = torch.ops.llmkern
    q, k, v = qkv(2, 9, 13, 4, 2, 32, torch.float32)
    fixed = (q, k, v, None, None, None, None, None, None, 9, 13, 0.2, -1, 0, 0.0, 0)
    torch.library.opcheck(ops.flash_attn_fwd, fixed)
    out, lse = ops.flash_attn_fwd(*fixed)
    torch.library.opcheck(ops.flash_attn_bwd, (torch.randn_like(out), q, k, v, out, lse, None, None, None, 9, 13, 0.2, -1, 0, 0.0))
    qp, cu = packed([3, 6], 4, 32, torch.float32, "cpu")
    kp, cuk = packed([5, 8], 2, 32, torch.float32, "cpu")
    torch.library.opcheck(ops.flash_attn_fwd, (qp, kp, kp, cu, cuk, None, None, None, None, 6, 8, 0.2, 10, -1, 1.0, 0))
    cache, _, table = paged_cache(k, v, [13, 4], 4)
    seqlens = torch.tensor([13, 4], dtype=torch.int32)
    torch.library.opcheck(ops.flash_attn_fwd, (q, cache, cache, None, None, seqlens, None, table, None, 9, 16, 0.2, -1, 0, 0.0, 2))
    kv, kc = rand(3, 2, 32), torch.zeros(4, 4, 2, 32)
    torch.library.opcheck(ops.write_kv_cache, (kv, kv, kc, kc.clone(), torch.tensor([1, -1, 9])))


def test_compile_attention_block():
    """A causal attention block (projections, GQA flash attention) under torch.compile(fullgraph=True)."""
    torch.manual_seed(0)
    wq, wk, wv = (torch.randn(64, n) * 0.1 for n in (64, 32, 32))

    def block(x):
        b, s, _ = x.shape
        q, k, v = (x @ wq).view(b, s, 4, 16), (x @ wk).view(b, s, 2, 16), (x @ wv).view(b, s, 2, 16)
        return lk.flash_attn_func(q, k, v, causal=True).reshape(b, s, 64)

    x = torch.randn(2, 37, 64)
    eager = grads(block, [x], [torch.ones(2, 37, 64)])
    compiled = grads(torch.compile(block, fullgraph=True), [x], [torch.ones(2, 37, 64)])
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x), block(x), rtol=1e-5, atol=1e-5)


# ---- bad input: a clear error naming the argument ----

BAD = {
    "head_dim > 256": (lambda q, k, v: (rand(1, 4, 2, 264), rand(1, 4, 2, 264), rand(1, 4, 2, 264)), {}, "head_dim"),
    "heads % heads_k": (lambda q, k, v: (rand(1, 4, 5, 32), k, v), {}, "multiple of k.s heads"),
    "dtype mismatch": (lambda q, k, v: (q, k.bfloat16(), v), {}, "k: expected the dtype of q"),
    "head_dim mismatch": (lambda q, k, v: (q, rand(1, 4, 2, 16), rand(1, 4, 2, 16)), {}, "k: expected head_dim"),
    "dropout": (lambda q, k, v: (q, k, v), {"dropout_p": 0.1}, "dropout_p"),
    "alibi shape": (lambda q, k, v: (q, k, v), {"alibi_slopes": torch.ones(3)}, "alibi_slopes"),
    "window": (lambda q, k, v: (q, k, v), {"window_size": (-2, 0)}, "window_size"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case):
    make, kw, match = BAD[case]
    q, k, v = qkv(1, 4, 4, 2, 2, 32, torch.float32)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        lk.flash_attn_func(*make(q, k, v), **kw)


def test_bad_varlen_input():
    q, cu = packed([3, 4], 2, 32, torch.float32, "cpu")
    with pytest.raises(TypeError, match="cu_seqlens_q: expected dtype int32"):
        lk.flash_attn_varlen_func(q, q, q, cu.long(), cu, 4, 4)
    with pytest.raises(RuntimeError, match="cu_seqlens_k: expected non-decreasing"):
        lk.flash_attn_varlen_func(q, q, q, cu, torch.tensor([0, 5, 3], dtype=torch.int32), 5, 5)
    with pytest.raises(RuntimeError, match="cu_seqlens_q: sequence 1 has length 4 > max_seqlen_q=3"):
        lk.flash_attn_varlen_func(q, q, q, cu, cu, 3, 4)
    with pytest.raises(RuntimeError, match="cu_seqlens_q: last offset 9"):
        lk.flash_attn_varlen_func(q, q, q, torch.tensor([0, 3, 9], dtype=torch.int32), cu, 6, 4)


def test_bad_cache_input():
    q, k, v = qkv(2, 1, 32, 2, 2, 32, torch.float32)
    cache, _, table = paged_cache(k, v, [32, 20], 8)
    seqlens = torch.tensor([32, 20], dtype=torch.int32)
    bad = table.clone()
    bad[1, 2] = 1000
    with pytest.raises(IndexError, match=r"block_table: entry 1000 at \[1, 2\]"):
        lk.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=seqlens, block_table=bad)
    with pytest.raises(RuntimeError, match="seqused_k: value 33"):
        lk.flash_attn_with_kvcache(q, cache, cache, cache_seqlens=seqlens + 1, block_table=table)
    # An append past a sequence's room is refused before anything is written (it would run into the next row).
    rows_k, rows_v = k.clone(), v.clone()
    for lens, cache_k, cache_v, kw in [([31, 20], rows_k, rows_v, {}), ([20, -1], rows_k, rows_v, {}),
                                       ([31, 20], cache, cache.clone(), {"block_table": table})]:
        before = cache_k.clone(), cache_v.clone()
        with pytest.raises(ValueError, match=r"cache_seqlens: appending 2 token\(s\) needs values in \[0, 30\]"):
            lk.flash_attn_with_kvcache(q, cache_k, cache_v, k[:, :2], v[:, :2], **kw,
                                       cache_seqlens=torch.tensor(lens, dtype=torch.int32))  # fmt: skip
        for now, then in zip((cache_k, cache_v), before):  # (a paged cache's unused slots are NaN)
            torch.testing.assert_close(now, then, rtol=0, atol=0, equal_nan=True)
    with pytest.raises(IndexError, match="slot_mapping: value 400"):
        lk.write_kv_cache(k[0, :2], v[0, :2], cache, cache.clone(), torch.tensor([3, 400]))
    with pytest.raises(TypeError, match="slot_mapping: expected dtype int64"):
        lk.write_kv_cache(k[0, :2], v[0, :2], cache, cache.clone(), torch.tensor([3, 4], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="no backward through a KV cache"):
        qg = q.clone().requires_grad_()
        lk.flash_attn_with_kvcache(qg, cache, cache, cache_seqlens=seqlens, block_table=table).sum().backward()
