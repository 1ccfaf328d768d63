"""GPTQ / AWQ import: tensors packed here the way those formats pack (written from their definitions)
dequantize to the original values, and Int4Linear on them computes x @ W (act-order included)."""

import pytest
import torch

from llmkern.quant import Int4Linear, from_awq, from_gptq


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words (0..2^32-1) -> int32 with the same bits."""
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def gptq_pack(q, zeros_stored):
    """GPTQ: qweight [K/8, N], nibble j of row r = q[8r + j]; qzeros [G, N/8], nibble j of column c =
    stored zero of n = 8c + j. Low nibble first."""
    k, n = q.shape
    sh = torch.arange(8) * 4
    qweight = (q.reshape(k // 8, 8, n) << sh[None, :, None]).sum(1)
    qzeros = (zeros_stored.reshape(zeros_stored.shape[0], n // 8, 8) << sh).sum(-1)
    return to_int32(qweight), to_int32(qzeros)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(t):
    """AWQ GEMM: packed along N, nibble i of word c holds column 8c + AWQ_ORDER[i]."""
    t = t.reshape(t.shape[0], -1, 8)[:, :, AWQ_ORDER]
    return to_int32((t << (torch.arange(8) * 4)).sum(-1))


def reference(q, z, s, g_idx):
    """W.T [K, N] = (q - z[g]) * s[g] in fp16, as AutoGPTQ / AutoAWQ compute it."""
    g = g_idx.long()
    return (q - z[g]).to(s.dtype) * s[g]


def check_linear(qw, wt):
    """Int4Linear(qw)(x) = x @ wt, wt [K, N] fp32 in the original input-feature order."""
    lin = Int4Linear(qw)
    x = torch.randn(3, wt.shape[0])
    torch.testing.assert_close(lin(x), x @ wt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "k,n,group,act_order,sym,fmt",
    [
        (256, 64, 128, False, True, "gptq"),
        (256, 96, 32, True, False, "gptq"),
        (512, 32, -1, False, False, "gptq"),
        (384, 32, 64, True, True, "gptq_v2"),
        (256, 40, 256, False, False, "gptq_v2"),
    ],
)
def test_gptq_import(k, n, group, act_order, sym, fmt):
    gs = k if group == -1 else group
    ngroups = k // gs
    q = torch.randint(0, 16, (k, n))
    z = torch.full((ngroups, n), 8) if sym else torch.randint(1, 16, (ngroups, n))  # v1 needs z >= 1
    s = (torch.rand(ngroups, n) * 0.02 + 0.001).half()
    if act_order:  # AutoGPTQ desc_act: g_idx[k] = (position of k in the permutation) // group_size
        perm = torch.randperm(k)
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // gs).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // gs).to(torch.int32)
    qweight, qzeros = gptq_pack(q, z - 1 if fmt == "gptq" else z)
    qw = from_gptq(qweight, qzeros, s, g_idx, checkpoint_format=fmt)
    wt = reference(q, z, s, g_idx)
    assert torch.equal(qw.dequantize(torch.float16), wt.t())
    assert (qw.zeros is None) == sym
    assert (qw.perm is not None) == act_order
    assert qw.group_size == min(gs, 128)
    # Without g_idx the checkpoint's group_size decides (only for the monotone case).
    if not act_order:
        qw2 = from_gptq(qweight, qzeros, s, group_size=group, checkpoint_format=fmt)
        assert torch.equal(qw2.dequantize(torch.float16), wt.t())
    check_linear(qw, reference(q, z, s.float(), g_idx))


def test_gptq_v1_zero_overflow_decodes_as_autogptq():
    """A v1 true zero of 0 is packed as (0 - 1) unmasked: the word's higher nibbles become 0xF, which
    AutoGPTQ decodes as zero 16 (issue4_formats.md G5)."""
    k, n = 64, 8
    q = torch.randint(0, 16, (k, n))
    true_z = torch.tensor([[5, 5, 5, 0, 9, 9, 9, 9]])
    word = 0
    for j, zz in enumerate(true_z[0].tolist()):
        word |= ((zz - 1) % 2**32) << (4 * j) & 0xFFFFFFFF  # uint32(z - 1) << 4j, no mask
    assert word == 0xFFFFF444
    qzeros = to_int32(torch.tensor([[word]]))
    qweight, _ = gptq_pack(q, torch.zeros(1, n, dtype=torch.long))
    s = torch.full((1, n), 0.01).half()
    qw = from_gptq(qweight, qzeros, s, group_size=-1)
    decoded = torch.tensor([[5, 5, 5, 16, 16, 16, 16, 16]])
    assert torch.equal(qw.dequantize(torch.float16), reference(q, decoded, s, torch.zeros(k, dtype=torch.int32)).t())


@pytest.mark.parametrize("k,n,group", [(256, 64, 128), (128, 96, 64), (96, 16, 32)])
def test_awq_import(k, n, group):
    q = torch.randint(0, 16, (k, n))
    z = torch.randint(0, 16, (k // group, n))
    s = (torch.rand(k // group, n) * 0.02 + 0.001).half()
    qw = from_awq(awq_pack(q), awq_pack(z), s, group)
    g_idx = torch.arange(k) // group
    wt = reference(q, z, s, g_idx)
    assert torch.equal(qw.dequantize(torch.float16), wt.t())
    assert qw.perm is None and qw.group_size == group
    check_linear(qw, reference(q, z, s.float(), g_idx))


def test_import_bad_inputs():
    q = torch.randint(0, 16, (64, 16))
    qweight, qzeros = gptq_pack(q, torch.full((1, 16), 7))
    s = torch.ones(1, 16).half()
    with pytest.raises(TypeError, match="qweight must be an int32"):
        from_gptq(qweight.float(), qzeros, s, group_size=-1)
    with pytest.raises(ValueError, match="only 4-bit"):
        from_gptq(qweight, qzeros, s, group_size=-1, bits=8)
    with pytest.raises(ValueError, match="checkpoint_format"):
        from_gptq(qweight, qzeros, s, group_size=-1, checkpoint_format="marlin")
    with pytest.raises(ValueError, match="scales must be float"):
        from_gptq(qweight, qzeros, s[:, :8], group_size=-1)
    with pytest.raises(ValueError, match="give g_idx or group_size"):
        from_gptq(qweight, qzeros, s)
    with pytest.raises(ValueError, match="g_idx values"):
        from_gptq(qweight, qzeros, s, torch.full((64,), 3, dtype=torch.int32))
    # K = 96 in source groups of 48: no llmkern group (32, 64, 128) tiles them.
    q = torch.randint(0, 16, (96, 16))
    qweight, qzeros = gptq_pack(q, torch.full((2, 16), 7))
    with pytest.raises(ValueError, match="cannot express these groups"):
        from_gptq(qweight, qzeros, torch.ones(2, 16).half(), group_size=48)
    with pytest.raises(ValueError, match="qzeros must be"):
        from_awq(awq_pack(q), awq_pack(torch.zeros(2, 16, dtype=torch.long)), torch.ones(3, 16).half(), 32)
