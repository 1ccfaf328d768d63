"""llmkern.quant formats: NF4 against bitsandbytes (bytes, absmax, double-quant statistics, dequantize),
INT4 / INT8 wrappers against the layout of csrc/kernels/quant.h, and bad inputs."""

import pytest
import torch

from llmkern.quant import (
    Int4Weight,
    Int8Weight,
    NF4Weight,
    dequantize_int4,
    dequantize_int8,
    dequantize_nf4,
    quantize_int4,
    quantize_int8,
    quantize_nf4,
)

bnbF = pytest.importorskip("bitsandbytes.functional")

# Odd sizes: partial last blocks, odd numel (pad nibble), rows shorter and longer than a block, 1-D.
NF4_SHAPES = [(7, 13), (3, 96), (33, 129), (64, 256), (5, 1000), (4097,)]
NF4_BLOCKS = [32, 64, 256, 4096]


def make_nf4_input(shape, dtype, block):
    w = torch.randn(shape) * 0.05
    flat = w.view(-1)
    if flat.numel() > 2 * block:
        flat[block : 2 * block] = 0  # an all-zero full block stores absmax 0
    if flat.numel() % block:
        flat[-(flat.numel() % block) :] = 0  # an all-zero partial block stores absmax 1e-38
    return w.to(dtype)


def bnb_g1(shape, block):
    """bitsandbytes 0.50.2's CPU dequantize_4bit indexes absmax per row (issue4_formats.md G1): wrong when
    the last dim is not a multiple of the block but is a multiple of 16, for blocks below 2048."""
    return shape[-1] % block != 0 and shape[-1] % 16 == 0 and block < 2048


def flat_dequant(packed, st, shape, dtype):
    """bitsandbytes' flat-block dequantization (its default backend and CUDA), from its own QuantState."""
    absmax = st.absmax
    if st.nested:
        i = torch.arange(absmax.numel())
        absmax = st.state2.code[absmax.long()] * st.state2.absmax[i // st.state2.blocksize] + st.offset
    n = shape.numel()
    p = packed.reshape(-1)
    q = torch.stack([p >> 4, p & 0xF], 1).reshape(-1)[:n].long()
    return (st.code[q] * absmax[torch.arange(n) // st.blocksize]).to(dtype).reshape(shape)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("block", NF4_BLOCKS)
@pytest.mark.parametrize("shape", NF4_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_nf4_equals_bitsandbytes(dtype, shape, block, double_quant):
    w = make_nf4_input(shape, dtype, block)
    qw = quantize_nf4(w, block, double_quant)
    packed, st = bnbF.quantize_4bit(w, blocksize=block, quant_type="nf4", compress_statistics=double_quant)
    assert torch.equal(qw.packed, packed)
    assert torch.equal(qw.absmax, st.absmax)
    assert torch.equal(qw.code, st.code)
    assert qw.shape == st.shape and qw.dtype == st.dtype and qw.block_size == st.blocksize
    if double_quant:
        assert qw.absmax.dtype == torch.uint8
        assert torch.equal(qw.nested_absmax, st.state2.absmax)
        assert torch.equal(qw.nested_code, st.state2.code)
        assert qw.offset == st.offset.item()
    else:
        assert qw.nested_absmax is None and qw.offset is None

    got = dequantize_nf4(qw)
    assert got.dtype == dtype and got.shape == w.shape
    assert torch.equal(got, flat_dequant(packed, st, w.shape, dtype))
    if not bnb_g1(shape, block):
        assert torch.equal(got, bnbF.dequantize_4bit(packed, st))


def test_nf4_round_trip_error_matches_bitsandbytes():
    w = torch.randn(512, 1024)
    mae = (dequantize_nf4(quantize_nf4(w, 64)) - w).abs().mean().item()
    packed, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    mae_bnb = (bnbF.dequantize_4bit(packed, st) - w).abs().mean().item()
    assert abs(mae - 0.073) < 0.002, mae
    assert abs(mae - mae_bnb) < 1e-6, (mae, mae_bnb)
    mae_dq = (dequantize_nf4(quantize_nf4(w, 64, double_quant=True)) - w).abs().mean().item()
    assert abs(mae_dq - mae) < 1e-3, (mae_dq, mae)


def test_nf4_state_dict_matches_bitsandbytes_serialization():
    """NF4Weight.to_state_dict writes what QuantState.as_dict(packed=True) + Linear4bit write, and
    from_state_dict reads bitsandbytes' state (dequantized values equal)."""
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    for dq in (False, True):
        packed, st = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        theirs = {"weight": packed, **{"weight." + k: v for k, v in st.as_dict(packed=True).items()}}
        ours = quantize_nf4(w, 64, dq).to_state_dict()
        assert set(ours) == set(theirs)
        for k in ours:
            assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
        back = NF4Weight.from_state_dict(theirs)
        assert torch.equal(back.dequantize(), bnbF.dequantize_4bit(packed, st))


def unpack_int4(packed):
    """quant.h: element 2i of a row in the high nibble of byte i."""
    return torch.stack([packed >> 4, packed & 0xF], -1).reshape(packed.shape[0], -1).long()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int4_quantize_dequantize(dtype, group, symmetric):
    n, k = 24, 2 * 128 + (group if group < 128 else 0)
    w = (torch.randn(n, k) * 0.02 + (0 if symmetric else 0.01)).to(dtype)
    qw = quantize_int4(w, group, symmetric)
    assert qw.packed.shape == (n, k // 2) and qw.scales.shape == (n, k // group) and qw.scales.dtype == dtype
    assert (qw.zeros is None) == symmetric
    z = 8 if symmetric else qw.zeros.long().repeat_interleave(group, 1)
    s = qw.scales.float().repeat_interleave(group, 1)
    want = ((unpack_int4(qw.packed) - z) * s).to(dtype)
    got = dequantize_int4(qw)
    assert torch.equal(got, want)
    # Round to nearest: each value within about half a step (a full step where the range clamps).
    err = (got.float() - w.float()).abs()
    assert (err <= (0.51 if symmetric else 1.01) * s + torch.finfo(dtype).eps * w.float().abs()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_quantize_dequantize(dtype):
    w = torch.randn(17, 70).to(dtype)
    w[3] = 0  # an all-zero row
    qw = quantize_int8(w)
    assert qw.q.dtype == torch.int8 and qw.scales.shape == (17,) and qw.scales.dtype == dtype
    got = dequantize_int8(qw)
    assert torch.equal(got, (qw.q.float() * qw.scales.float()[:, None]).to(dtype))
    assert (got[3] == 0).all()
    tol = 0.51 * qw.scales.float()[:, None] + torch.finfo(dtype).eps * w.float().abs()
    assert ((got.float() - w.float()).abs() <= tol).all()


def test_bad_inputs():
    w = torch.randn(8, 64)
    with pytest.raises(ValueError, match="block_size"):
        quantize_nf4(w, 48)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        quantize_nf4(w.to(torch.int32))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.empty(0, 4))
    with pytest.raises(ValueError, match=r"K = 64\) must be divisible by group_size 128"):
        quantize_int4(w, 128)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_int4(w, 16)
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8(w.view(2, 4, 64))
    qw = quantize_nf4(w)
    with pytest.raises(ValueError, match="absmax must have 8 elements"):
        NF4Weight(qw.packed, qw.absmax[:-1], qw.shape, qw.dtype)
    with pytest.raises(ValueError, match="packed must be uint8"):
        NF4Weight(qw.packed.view(torch.int8), qw.absmax, qw.shape, qw.dtype)
    with pytest.raises(TypeError, match="NF4Weight"):
        dequantize_nf4(qw.packed)
    q4 = quantize_int4(w, 32)
    with pytest.raises(ValueError, match="scales must be float"):
        Int4Weight(q4.packed, q4.scales[:, :1], None, 32)
    with pytest.raises(TypeError, match="q must be int8"):
        Int8Weight(torch.zeros(4, 4, dtype=torch.uint8), torch.ones(4))
