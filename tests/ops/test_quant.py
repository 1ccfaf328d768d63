"""Weight-only quantization ops (nf4 / blockwise8 / int4 / int8 quantize, dequantize, fused linear).

Quantize and dequantize are bit-exact: against their `_ref` and, for nf4 and blockwise8, against bitsandbytes
itself (its CPU results; its CPU dequantize_4bit is wrong when a row is not a whole number of blocks, so it is
compared only where it is right, the flat-block reference everywhere). The linear ops are compared with
dequantize-then-matmul in float64: relative error below 1e-3 for fp32 x, the 2x rule of tests/helpers.py for
bf16/fp16. Each test runs on every CPU ISA path (and on CUDA, for the ops CUDA implements, when present).
"""

import functools

import pytest
import torch

import llmkern.ops as lk
from llmkern.ops.quant import DYNAMIC_CODE, NF4_CODE
from tests.helpers import DTYPES, assert_close_derived, grads, strided

BLOCK_SIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# Odd sizes: numel not a multiple of any block size (partial last blocks, odd numel), blocks straddling rows.
NF4_SHAPES = [(1,), (5,), (3, 96), (7, 77), (3, 3001)]
MS = [1, 2, 3, 7, 16, 33, 128]


@pytest.fixture(scope="module")
def bnbf():
    """bitsandbytes.functional (the test extra); the bitsandbytes comparisons skip without it."""
    return pytest.importorskip("bitsandbytes.functional")


def weight(*shape, dtype=torch.float32, block=64):
    """Random values with a different scale per block of `block` flattened elements, one all-zero block
    and an exact zero, so absmax varies and the zero paths run."""
    n = 1
    for s in shape:
        n *= s
    w = torch.randn(n) * torch.exp(torch.randn(-(-n // block))).repeat_interleave(block)[:n]
    if n > 2 * block:
        w[block : 2 * block] = 0
    w[n // 2] = 0
    return w.reshape(shape).to(dtype)


# ---- nf4 quantize: bit-exact with bitsandbytes and the reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_quantize_nf4_equals_bitsandbytes(cpu_isa, bnbf, block_size, dtype):
    for shape in NF4_SHAPES:
        w = weight(*shape, dtype=dtype, block=block_size)
        packed, absmax = lk.quantize_nf4(w, block_size)
        bnb_packed, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type="nf4")
        assert packed.shape == bnb_packed.shape and packed.dtype == torch.uint8, shape
        assert torch.equal(packed, bnb_packed), (shape, (packed != bnb_packed).sum().item())
        assert torch.equal(absmax, state.absmax), shape
        ref_packed, ref_absmax = lk.quantize_nf4_ref(w, block_size)
        assert torch.equal(packed, ref_packed) and torch.equal(absmax, ref_absmax), shape


def test_quantize_nf4_midpoints_take_the_lower_code(cpu_isa, bnbf):
    """Values exactly on a midpoint between two codes (in a block whose absmax is 1) take the lower code."""
    mid = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2
    w = torch.cat([torch.tensor([1.0]), mid, -mid, NF4_CODE, torch.zeros(64 - 1 - 30 - 16)])
    w = torch.cat([w, w[:37]])  # and a partial last block (divides instead of multiplying)
    packed, absmax = lk.quantize_nf4(w, 64)
    assert torch.equal(packed, bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")[0])
    assert torch.equal(packed, lk.quantize_nf4_ref(w, 64)[0])
    q = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).view(-1)
    assert torch.equal(q[1:16].long(), torch.arange(15))  # midpoint i -> code i


@pytest.mark.parametrize("block_size", [64, 256])
def test_quantize_nf4_double_quant_equals_bitsandbytes(cpu_isa, bnbf, block_size):
    """compress_statistics=True: the absmax minus their mean, quantize_blockwise8'd in blocks of 256."""
    for shape in [(3, 96), (300, 77), (257, 256)]:
        w = weight(*shape, dtype=torch.bfloat16, block=block_size)
        packed, absmax = lk.quantize_nf4(w, block_size)
        offset = absmax.mean()
        qabsmax, absmax2 = lk.quantize_blockwise8(absmax - offset)
        bnb_packed, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type="nf4", compress_statistics=True)
        assert torch.equal(packed, bnb_packed)
        assert state.offset.item() == offset.item()
        assert torch.equal(qabsmax, state.absmax), (qabsmax != state.absmax).sum().item()
        assert torch.equal(absmax2, state.state2.absmax)
        assert torch.equal(DYNAMIC_CODE, state.state2.code)
        assert state.state2.blocksize == 256


def test_codes_equal_bitsandbytes(bnbf):
    assert torch.equal(NF4_CODE, bnbf.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(DYNAMIC_CODE, bnbf.create_dynamic_map(signed=True))


@pytest.mark.parametrize("block_size", [64, 256, 4096])
def test_quantize_blockwise8_equals_bitsandbytes(cpu_isa, bnbf, block_size):
    for n in [1, 255, 1000, 12345]:
        x = weight(n, block=block_size) * 3
        q, absmax = lk.quantize_blockwise8(x, block_size=block_size)
        bnb_q, state = bnbf.quantize_blockwise(x, blocksize=block_size)
        assert q.shape == (n,) and q.dtype == torch.uint8
        assert torch.equal(q, bnb_q), (n, (q != bnb_q).sum().item())
        assert torch.equal(absmax, state.absmax)
        ref_q, ref_absmax = lk.quantize_blockwise8_ref(x, block_size=block_size)
        assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)


# ---- nf4 dequantize


def nested(absmax):
    offset = absmax.mean()
    qabsmax, absmax2 = lk.quantize_blockwise8(absmax - offset)
    return dict(absmax=qabsmax, nested_absmax=absmax2, nested_offset=offset.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_nf4_equals_ref(device, dtype, double_quant):
    for block_size in [32, 64, 4096]:
        for shape in [(5,), (7, 77), (2, 3, 97), (3, 3001)]:
            w = weight(*shape, block=block_size)
            packed, absmax = lk.quantize_nf4(w, block_size)
            kw = nested(absmax) if double_quant else dict(absmax=absmax)
            kw = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in kw.items()}
            out = lk.dequantize_nf4(packed.to(device), shape=shape, dtype=dtype, block_size=block_size, **kw)
            ref = lk.dequantize_nf4_ref(packed.to(device), shape=shape, dtype=dtype, block_size=block_size, **kw)
            assert out.shape == shape and out.dtype == dtype
            assert torch.equal(out, ref), (block_size, shape, (out != ref).sum().item())


@pytest.mark.parametrize("double_quant", [False, True])
def test_dequantize_nf4_equals_bitsandbytes(cpu_isa, bnbf, double_quant):
    """Where bitsandbytes' CPU dequantize_4bit is right: rows that are whole numbers of blocks (G1)."""
    # (bitsandbytes runs block sizes >= 2048 through torch.compile on CPU: seconds per call, so not here)
    for block_size, shape in [(64, (64, 256)), (128, (33, 384)), (1024, (2, 2048)), (64, (5, 64))]:
        for dtype in DTYPES:
            w = weight(*shape, dtype=dtype, block=block_size)
            packed, state = bnbf.quantize_4bit(w, blocksize=block_size, quant_type="nf4",
                                               compress_statistics=double_quant)
            if double_quant:
                kw = dict(absmax=state.absmax, nested_absmax=state.state2.absmax,
                          nested_code=state.state2.code, nested_offset=state.offset.item())
            else:
                kw = dict(absmax=state.absmax)
            out = lk.dequantize_nf4(packed, shape=shape, dtype=dtype, block_size=block_size, code=state.code, **kw)
            assert torch.equal(out, bnbf.dequantize_4bit(packed, state)), (block_size, shape, dtype)


def test_nf4_round_trip_error_on_normal_weights(bnbf):
    """Mean absolute error on N(0, 1) at block 64: about 0.073, as bitsandbytes'."""
    w = torch.randn(1024, 1024)
    packed, absmax = lk.quantize_nf4(w, 64)
    mae = (lk.dequantize_nf4(packed, absmax, w.shape, torch.float32, 64) - w).abs().mean().item()
    bnb_packed, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4")
    bnb_mae = (bnbf.dequantize_4bit(bnb_packed, state) - w).abs().mean().item()
    assert 0.070 < mae < 0.076 and abs(mae - bnb_mae) < 1e-4, (mae, bnb_mae)


# ---- int4 and int8


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_int4_equals_ref(cpu_isa, group_size, symmetric, dtype):
    for n, k in [(1, 128), (7, 384), (37, 640)]:
        w = weight(n, k, dtype=dtype, block=group_size)
        w[0, :group_size] = 0  # an all-zero group
        w[-1, -group_size:] = w[-1, -group_size:].abs()  # a group without negatives (asymmetric: zero point 0)
        packed, scales, zeros = lk.quantize_int4(w, group_size, symmetric)
        ref_packed, ref_scales, ref_zeros = lk.quantize_int4_ref(w, group_size, symmetric)
        assert packed.shape == (n, k // 2) and packed.dtype == torch.uint8
        assert scales.shape == (n, k // group_size) and scales.dtype == dtype
        assert torch.equal(scales, ref_scales)
        assert torch.equal(packed, ref_packed), (n, k, (packed != ref_packed).sum().item())
        if symmetric:
            assert zeros is None and ref_zeros is None
        else:
            assert zeros.shape == scales.shape and zeros.dtype == torch.uint8 and torch.equal(zeros, ref_zeros)
        deq = lk.dequantize_int4(packed, scales, zeros, group_size, torch.float32)
        step = scales.float().repeat_interleave(group_size, 1)
        assert ((deq - w.float()).abs() <= 0.6 * step).all()  # round to nearest (scales rounded to dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_int8_equals_ref(cpu_isa, dtype):
    for n, k in [(1, 1), (7, 77), (37, 1000)]:
        w = weight(n, k, dtype=dtype)
        w[0] = 0  # an all-zero row: scale 0, codes 0
        q, scales = lk.quantize_int8(w)
        ref_q, ref_scales = lk.quantize_int8_ref(w)
        assert q.dtype == torch.int8 and q.shape == (n, k) and scales.dtype == dtype and scales.shape == (n,)
        assert torch.equal(scales, ref_scales) and torch.equal(q, ref_q)
        deq = lk.dequantize_int8(q, scales, torch.float32)
        assert ((deq - w.float()).abs() <= 0.51 * scales.float()[:, None] + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_int4_int8_equal_ref(device, dtype):
    for scales_dtype in DTYPES:
        for group_size, (n, k) in [(32, (3, 96)), (128, (37, 640)), (64, (1, 64))]:
            w = weight(n, k, dtype=scales_dtype, block=group_size)
            for symmetric in [True, False]:
                qw = [t.to(device) if t is not None else None for t in lk.quantize_int4(w, group_size, symmetric)]
                out = lk.dequantize_int4(*qw, group_size, dtype)
                assert out.dtype == dtype and torch.equal(out, lk.dequantize_int4_ref(*qw, group_size, dtype))
            default = lk.dequantize_int4(*qw, group_size)
            assert default.dtype == scales_dtype
            q, s = (t.to(device) for t in lk.quantize_int8(w))
            out = lk.dequantize_int8(q, s, dtype)
            assert out.dtype == dtype and torch.equal(out, lk.dequantize_int8_ref(q, s, dtype))
            assert lk.dequantize_int8(q, s).dtype == scales_dtype


def test_dequantize_int4_full_zero_point_range():
    """Zero points are bytes 0..255 (imported checkpoints), not just the 0..15 quantize writes."""
    packed = torch.randint(0, 256, (5, 32), dtype=torch.uint8)
    scales = torch.rand(5, 2)
    zeros = torch.randint(0, 256, (5, 2), dtype=torch.uint8)
    assert torch.equal(lk.dequantize_int4(packed, scales, zeros, 32), lk.dequantize_int4_ref(packed, scales, zeros, 32))


# ---- fused linear


def int4_weight(n, k, group_size=64, symmetric=False):
    return lk.quantize_int4(weight(n, k, block=group_size), group_size, symmetric)


@functools.cache
def formats(n, k, device):
    """(name, linear(x, bias), dequantized W in fp32) for each format on [n, k] (made once per shape)."""
    out = []
    w = weight(n, k)
    for name, bs, dq in [("nf4", 64, False), ("nf4-b32-nested", 32, True)]:
        packed, absmax = lk.quantize_nf4(w, bs)
        kw = nested(absmax) if dq else dict(absmax=absmax)
        kw = {key: (v.to(device) if torch.is_tensor(v) else v) for key, v in kw.items()}
        p = packed.to(device)
        w32 = lk.dequantize_nf4_ref(p, shape=(n, k), dtype=torch.float32, block_size=bs, **kw)
        out.append((name, lambda x, b, p=p, kw=kw, bs=bs: lk.nf4_linear(x, p, out_features=n, block_size=bs,
                                                                         bias=b, **kw), w32))
    for g in [32, 64, 128]:
        if k % g:
            continue
        for sym in [True, False]:
            qw = [t.to(device) if t is not None else None for t in lk.quantize_int4(w, g, sym)]
            out.append((f"int4-g{g}-{'sym' if sym else 'asym'}", lambda x, b, qw=qw, g=g: lk.int4_linear(x, *qw, g, b),
                        lk.dequantize_int4_ref(*qw, g, torch.float32)))
    q, s = (t.to(device) for t in lk.quantize_int8(w))
    out.append(("int8", lambda x, b: lk.int8_linear(x, q, s, b), lk.dequantize_int8_ref(q, s, torch.float32)))
    return out


def check_linear(name, y, x, w32, bias):
    """y vs x @ w32.T (+ bias) in float64: rel err < 1e-3 (fp32), else 2x PyTorch's error in x's dtype."""
    ref64 = x.double() @ w32.double().t()
    if bias is not None:
        ref64 = ref64 + bias.double()
    assert y.shape == ref64.shape and y.dtype == x.dtype, name
    assert not y.isnan().any(), f"{name}: NaN in output"
    if x.dtype == torch.float32:
        rel = ((y.double() - ref64).abs().max() / ref64.abs().max()).item()
        assert rel < 1e-3, f"{name}: rel err {rel:.2e}"
    else:
        # PyTorch's baseline from a contiguous x: torch 2.13's bf16 matmul on AMX CPUs reads a strided x's row
        # padding (NaN in tests.helpers.strided) from 65 rows on, and returns NaN rows.
        y_torch = torch.nn.functional.linear(x.contiguous(), w32.to(x.dtype), bias)
        assert_close_derived(y, ref64, y_torch, name=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", MS)
def test_linear_vs_dequantize_matmul(device, m, dtype):
    n, k = 96, 320  # k a multiple of 32 and 64, not of 128; n not a power of two
    for name, linear, w32 in formats(n, k, device):
        x = torch.randn(m, k, dtype=dtype, device=device)
        bias = torch.randn(n, dtype=dtype, device=device) if m % 2 else None
        check_linear(name, linear(x, bias), x, w32, bias)


@pytest.mark.parametrize("m, dtype", [(8, torch.bfloat16), (10, torch.bfloat16), (13, torch.bfloat16),
                                      (16, torch.bfloat16), (24, torch.bfloat16), (33, torch.float32),
                                      (65, torch.bfloat16), (128, torch.float16), (512, torch.bfloat16),
                                      (513, torch.bfloat16)])
def test_linear_many_rows(device, m, dtype):
    """The many-row (GEMM) path over several row tiles, k chunks and x panels: n and k not multiples of the tile
    (24 rows; 32 on the AMX tiles) or the chunk (1024 columns; 2048 on the tiles), M not a multiple of the vector
    width (a partial last panel at 65; 13 rows, from which bf16 takes the GEMM on full-width AVX-512, 10 for 4-bit
    weights whose k is a multiple of 128: code_tiles, up to 32 rows); the tiles' row range (8-512 on amx) and past
    it; a last tile of at most 16 rows (n = 40) with a strided x; int8 with a k that is not a multiple of 32."""
    n, k = 155, 2560
    for name, linear, w32 in formats(n, k, device):
        x = torch.randn(m, k, dtype=dtype, device=device)
        bias = torch.randn(n, dtype=dtype, device=device)
        check_linear(name, linear(x, bias), x, w32, bias)
    for name, linear, w32 in formats(40, 1024, device):
        xs = strided(torch.randn(m, 1024, dtype=dtype, device=device))
        check_linear(name, linear(xs, None), xs, w32, None)
    q, s = (t.to(device) for t in lk.quantize_int8(weight(67, 1531)))
    x = strided(torch.randn(m, 1531, dtype=dtype, device=device))
    check_linear("int8-k531", lk.int8_linear(x, q, s), x, lk.dequantize_int8_ref(q, s, torch.float32), None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m, k", [(64, 4096), (2048, 512)])
def test_linear_cuda_k_splits(m, k):
    """The CUDA tensor-core path at real sizes: with 4096 rows of W, m = 64 leaves the grid small, so k is split
    over blocks (on an H200, 8 splits of four 128-column chunks); m = 2048 fills it, so each block runs all four
    chunks itself. Every format."""
    n = 4096
    for name, linear, w32 in formats(n, k, "cuda"):
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        bias = torch.randn(n, dtype=torch.bfloat16, device="cuda")
        check_linear(name, linear(x, bias), x, w32, bias)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("m", [8, 48])
def test_linear_tile_tasks(device, threads, m):
    """The AMX tiles' task pipeline (each chunk decoded while the one before it is on the tiles): one or two
    threads, so tasks of several weight tiles, three chunks of which the last is short (64 columns), a last tile of
    8 rows after full ones; every format, groups of 32 included. Other paths take the same shapes."""
    n, k = 5 * 32 + 8, 2 * 2048 + 64
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, linear, w32 in formats(n, k, device):
            x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
            bias = torch.randn(n, dtype=torch.bfloat16, device=device)
            check_linear(name, linear(x, bias), x, w32, bias)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 6, 16])
def test_linear_activation_outliers(device, m, dtype):
    """LLM activations have a few channels ~100x the rest: paths that rescale x per block (the int4 GEMV
    holds x as int16) must keep the small channels' precision."""
    n, k = 64, 1024
    for name, linear, w32 in formats(n, k, device):
        x = torch.randn(m, k, dtype=torch.float32, device=device)
        x[:, ::97] *= 300.0
        x = x.to(dtype)
        check_linear(name, linear(x, None), x, w32, None)


@pytest.mark.parametrize("n, k", [(1, 128), (33, 384), (100, 768), (5, 2176)])
def test_linear_shapes(device, n, k):
    """Odd N, K from one group to many, leading dims, and strided rows of x."""
    for name, linear, w32 in formats(n, k, device):
        x = torch.randn(2, 3, k, dtype=torch.bfloat16, device=device)
        bias = torch.randn(n, dtype=torch.bfloat16, device=device)
        check_linear(name, linear(x, bias), x, w32, bias)
        xs = strided(torch.randn(7, k, device=device))
        check_linear(name, linear(xs, None), xs, w32, None)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [5, 6, 7])
def test_linear_gemv_row_tails(device, m, n):
    """The M <= 4 GEMV works on blocks of 2 or 4 rows of W: n past the last full block (1, 2 or 3 rows)."""
    k = 320
    for name, linear, w32 in formats(n, k, device):
        x = torch.randn(m, k, device=device)
        check_linear(name, linear(x, None), x, w32, None)


@pytest.mark.parametrize("dtype", DTYPES)
def test_int4_gemv_rows_independent_of_m(cpu_isa, dtype):
    """On AVX512_VNNI the int4 GEMV of one or two rows of x splits x's int16 copy into high and low bytes
    (vpdpbusd), from three rows it keeps the int16 words (vpdpwssd); both sums are exact, so a row's output must not
    depend on the rows beside it: y[:m] for m = 1, 2 equals the first rows of the m = 3 call bit for bit. x spans
    the int16 range of each block (outliers, both signs); k = 4128 ends in a partial chunk (groups of 32 only), k = 384
    takes groups of 32, 64 and 128; n = 37 leaves a 5-row tail after the 8-row blocks."""
    for n, k in [(37, 4128), (8, 384)]:
        x = torch.randn(3, k) * torch.exp(torch.randn(3, k))
        x[:, ::61] *= -50.0  # outputs stay finite in fp16
        x = x.to(dtype)
        for name, linear, _ in formats(n, k, "cpu"):
            if name.startswith("int4"):
                y3 = linear(x, None)
                for m in (1, 2):
                    assert torch.equal(linear(x[:m], None), y3[:m]), f"{name} m={m}"


@pytest.mark.parametrize("k", [77, 1531])
@pytest.mark.parametrize("m, dtype", [(1, torch.float32), (4, torch.float32), (3, torch.bfloat16),
                                      (15, torch.bfloat16), (6, torch.float16)])
def test_linear_int8_gemv_ragged_k(device, m, dtype, k):
    """int8 at few rows reads W in chunks of 128 columns (the int16 GEMV on AVX-512): k below one chunk or not a
    multiple of 32 leaves a partial last chunk, whose missing columns must read as zero; strided rows of x."""
    q, s = (t.to(device) for t in lk.quantize_int8(weight(37, k)))
    x = strided(torch.randn(m, k, dtype=dtype, device=device))
    bias = torch.randn(37, dtype=dtype, device=device)
    check_linear("int8", lk.int8_linear(x, q, s, bias), x, lk.dequantize_int8_ref(q, s, torch.float32), bias)


@pytest.mark.parametrize("scale", [0.25, 3.0])
@pytest.mark.parametrize("m", [1, 4])
def test_linear_nf4_other_codes(device, m, scale):
    """A code table whose largest |code| is not 1: the GEMV scales its int16 codes by it."""
    n, k = 24, 384
    code = (NF4_CODE * scale).to(device)
    packed, absmax = lk.quantize_nf4(weight(n, k), 64, code=code.cpu())
    packed, absmax = packed.to(device), absmax.to(device)
    w32 = lk.dequantize_nf4_ref(packed, absmax, shape=(n, k), dtype=torch.float32, block_size=64, code=code)
    x = torch.randn(m, k, device=device)
    y = lk.nf4_linear(x, packed, absmax, n, 64, code=code)
    check_linear("nf4-code", y, x, w32, None)


@pytest.mark.parametrize("m, dtype", [(1, torch.float32), (4, torch.float32), (16, torch.float32),
                                      (16, torch.bfloat16), (48, torch.bfloat16)])  # bf16: the AMX tiles
def test_linear_nan_poisons(device, m, dtype):
    """A NaN in x makes its row of the output NaN (the int16 GEMV falls back to fp32 for it); a NaN scale
    or absmax makes its output column NaN; the rest stays finite."""
    n, k = 8, 256
    w = weight(n, k)
    x = torch.randn(m, k, device=device, dtype=dtype)
    x[0, 5] = float("nan")
    packed, absmax = (t.to(device) for t in lk.quantize_nf4(w, 64))
    absmax[3 * (k // 64) + 1] = float("nan")  # a block of row 3
    q4, s4, z4 = (t.to(device) if t is not None else None for t in lk.quantize_int4(w, 64, False))
    s4[3, 2] = float("nan")
    q8, s8 = (t.to(device) for t in lk.quantize_int8(w))
    s8[3] = float("nan")
    for name, y in [("nf4", lk.nf4_linear(x, packed, absmax, n, 64)), ("int4", lk.int4_linear(x, q4, s4, z4, 64)),
                    ("int8", lk.int8_linear(x, q8, s8))]:
        bad = torch.zeros(m, n, dtype=torch.bool, device=device)
        bad[0, :] = True
        bad[:, 3] = True
        assert y[bad].isnan().all(), name
        assert y[~bad].isfinite().all(), name


def test_linear_zero_rows(device):
    for name, linear, _ in formats(16, 128, device):
        assert linear(torch.randn(0, 128, device=device), None).shape == (0, 16), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_gradients(device, dtype):
    """dx = dy @ W, dbias = sum(dy) against the reference's autograd, in float64 and by the 2x rule."""
    n, k, m = 48, 256, 5
    for name, linear, w32 in formats(n, k, device):
        x = torch.randn(2, m, k, dtype=dtype, device=device)
        bias = torch.randn(n, dtype=dtype, device=device)
        dy = torch.randn(2, m, n, dtype=dtype, device=device)
        dx, dbias = grads(linear, [x, bias], [dy])
        dx64, dbias64 = grads(lambda x, b: torch.nn.functional.linear(x, w32.double(), b), [x.double(), bias.double()],
                              [dy.double()])
        dx_t, dbias_t = grads(lambda x, b: torch.nn.functional.linear(x, w32.to(dtype), b), [x, bias], [dy])
        assert dx.dtype == dtype and dbias.dtype == dtype
        if dtype == torch.float32:
            assert ((dx.double() - dx64).abs().max() / dx64.abs().max()).item() < 1e-5, name
            assert ((dbias.double() - dbias64).abs().max() / dbias64.abs().max()).item() < 1e-5, name
        else:
            assert_close_derived(dx, dx64, dx_t, name=f"{name} dx")
            assert_close_derived(dbias, dbias64, dbias_t, name=f"{name} dbias")
        dx_only = grads(lambda x: linear(x, None), [x], [dy])[0]
        assert torch.equal(dx_only, dx), name


# ---- opcheck and bad input


def test_opcheck():
    ops, check = torch.ops.llmkern, torch.library.opcheck
    w = weight(7, 128)
    packed, absmax = lk.quantize_nf4(w, 64)
    n = nested(absmax)
    check(ops.quantize_nf4, (w[:, :77].to(torch.bfloat16), 32, NF4_CODE))
    check(ops.quantize_blockwise8, (absmax, DYNAMIC_CODE, 256))
    check(ops.dequantize_nf4, (packed, n["absmax"], [7, 128], torch.float32, 64, NF4_CODE, n["nested_absmax"],
                               DYNAMIC_CODE, n["nested_offset"]))
    for sym in [True, False]:
        check(ops.quantize_int4, (w, 32, sym))
    q4, s4, z4 = lk.quantize_int4(w, 32, False)
    check(ops.dequantize_int4, (q4, s4, z4, 32, None))
    check(ops.quantize_int8, (w,))
    q8, s8 = lk.quantize_int8(w)
    check(ops.dequantize_int8, (q8, s8, torch.bfloat16))
    x = torch.randn(3, 128, requires_grad=True)
    bias = torch.randn(7, requires_grad=True)
    check(ops.nf4_linear, (x, packed, n["absmax"], 7, 64, NF4_CODE, bias, n["nested_absmax"], DYNAMIC_CODE,
                           n["nested_offset"]))
    check(ops.int4_linear, (x, q4, s4, z4, 32, bias))
    check(ops.int8_linear, (x, q8, s8, bias))


def _nf4():
    packed, absmax = lk.quantize_nf4(torch.randn(8, 128), 64)
    return packed, absmax


def _int4(sym=False):
    return lk.quantize_int4(torch.randn(8, 128), 32, sym)


X = torch.randn(2, 128)
BAD = [
    # quantize
    ("w", lambda: lk.quantize_nf4(torch.randint(0, 5, (8, 8))), "w: expected dtype"),
    ("block_size", lambda: lk.quantize_nf4(torch.randn(8, 8), 48), "block_size: expected one of"),
    ("code", lambda: lk.quantize_nf4(torch.randn(8, 8), 64, torch.randn(8)), r"code: expected a \[16\]"),
    ("code", lambda: lk.quantize_nf4(torch.randn(8, 8), 64, NF4_CODE.double()), "code: expected dtype"),
    ("x", lambda: lk.quantize_blockwise8(torch.randn(8, dtype=torch.bfloat16)), "x: expected dtype"),
    ("code", lambda: lk.quantize_blockwise8(torch.randn(8), NF4_CODE), r"code: expected a \[256\]"),
    ("w", lambda: lk.quantize_int4(torch.randn(8, 4, 32)), "w: expected a 2-d"),
    ("group_size", lambda: lk.quantize_int4(torch.randn(8, 100), 32), "group_size: K = w.size.1. = 100 is not a mult"),
    ("group_size", lambda: lk.quantize_int4(torch.randn(8, 96), 48), "group_size: expected 32, 64 or 128"),
    ("w", lambda: lk.quantize_int8(torch.randn(8)), "w: expected a 2-d"),
    ("w", lambda: lk.quantize_int8(torch.randn(8, 8, dtype=torch.float64)), "w: expected dtype"),
    # nf4 dequantize / linear
    ("packed", lambda: lk.dequantize_nf4(_nf4()[0].view(torch.int8), _nf4()[1], (8, 128), torch.float32),
     "packed: expected dtype"),
    ("packed", lambda: lk.dequantize_nf4(_nf4()[0], _nf4()[1], (8, 130), torch.float32), "packed: expected .* bytes"),
    ("absmax", lambda: lk.dequantize_nf4(_nf4()[0], _nf4()[1][:-1], (8, 128), torch.float32), "absmax: expected"),
    ("absmax", lambda: lk.dequantize_nf4(_nf4()[0], _nf4()[1], (8, 128), torch.float32, block_size=32),
     "absmax: expected ceil"),
    ("absmax", lambda: lk.dequantize_nf4(_nf4()[0], _nf4()[1].half(), (8, 128), torch.float32),
     "absmax: expected dtype"),
    ("dtype", lambda: lk.dequantize_nf4(*_nf4(), (8, 128), torch.int32), "dtype: expected float32"),
    ("nested_absmax", lambda: lk.dequantize_nf4(_nf4()[0], _nf4()[1].to(torch.uint8), (8, 128), torch.float32,
                                                nested_absmax=torch.randn(2)), "nested_absmax: expected ceil"),
    ("absmax", lambda: lk.dequantize_nf4(*_nf4(), (8, 128), torch.float32, nested_absmax=torch.randn(1)),
     "absmax: expected dtype torch.uint8|absmax: expected dtype Byte"),
    ("nested_code", lambda: lk.dequantize_nf4(_nf4()[0], _nf4()[1].to(torch.uint8), (8, 128), torch.float32,
                                              nested_absmax=torch.randn(1), nested_code=NF4_CODE),
     r"nested_code: expected a \[256\]"),
    ("nested_code", lambda: torch.ops.llmkern.dequantize_nf4(*_nf4(), [8, 128], torch.float32, 64, NF4_CODE, None,
                                                             DYNAMIC_CODE, 0.0), "nested_code: given without"),
    ("x", lambda: lk.nf4_linear(torch.randn(2, 120), *_nf4(), 8), "packed: expected|x: expected"),
    ("absmax", lambda: lk.nf4_linear(torch.randn(2, 128), _nf4()[0], _nf4()[1][:3], 8), "absmax: expected ceil"),
    ("x", lambda: lk.nf4_linear(torch.randint(0, 3, (2, 128)), *_nf4(), 8), "x: expected dtype"),
    ("bias", lambda: lk.nf4_linear(X, *_nf4(), 8, bias=torch.randn(7)), r"bias: expected shape \[8\]"),
    ("bias", lambda: lk.nf4_linear(X, *_nf4(), 8, bias=torch.randn(8).half()), "bias: expected the dtype of x"),
    ("out_features", lambda: lk.nf4_linear(X, *_nf4(), 0), "out_features: expected >= 1"),
    ("code", lambda: lk.nf4_linear(X, *_nf4(), 8, code=torch.randn(15)), r"code: expected a \[16\]"),
    # int4
    ("packed", lambda: lk.int4_linear(X, _int4()[0].view(torch.int8), *_int4()[1:], 32), "packed: expected dtype"),
    ("packed", lambda: lk.dequantize_int4(_int4()[0].view(-1), *_int4()[1:], 32), "packed: expected a 2-d"),
    ("x", lambda: lk.int4_linear(torch.randn(2, 64), *_int4(), 32), "x: expected last dim K = 128"),
    ("scales", lambda: lk.int4_linear(X, _int4()[0], _int4()[1][:, :2], _int4()[2], 32),
     r"scales: expected shape \[8, 4\]"),
    ("scales", lambda: lk.dequantize_int4(*_int4(), 64), r"scales: expected shape \[8, 2\]"),
    ("scales", lambda: lk.dequantize_int4(_int4()[0], _int4()[1].double(), None, 32), "scales: expected dtype"),
    ("group_size", lambda: lk.dequantize_int4(*_int4(), 16), "group_size: expected 32, 64 or 128"),
    ("group_size", lambda: lk.dequantize_int4(torch.zeros(8, 48, dtype=torch.uint8), torch.rand(8, 1), None, 64),
     "group_size: K = 2 . packed.size.1. = 96 is not a multiple"),
    ("zeros", lambda: lk.int4_linear(X, *_int4()[:2], _int4()[2].int(), 32), "zeros: expected dtype"),
    ("zeros", lambda: lk.int4_linear(X, *_int4()[:2], _int4()[2][:4], 32), r"zeros: expected shape \[8, 4\]"),
    ("bias", lambda: lk.int4_linear(X, *_int4(), 32, bias=torch.randn(9)), r"bias: expected shape \[8\]"),
    # int8
    ("q", lambda: lk.int8_linear(X, lk.quantize_int8(torch.randn(8, 128))[0].to(torch.uint8), torch.rand(8)),
     "q: expected dtype"),
    ("scales", lambda: lk.int8_linear(X, lk.quantize_int8(torch.randn(8, 128))[0], torch.rand(7)),
     r"scales: expected shape \[8\]"),
    ("x", lambda: lk.int8_linear(torch.randn(2, 100), *lk.quantize_int8(torch.randn(8, 128))), "x: expected last dim"),
    ("x", lambda: lk.int8_linear(torch.randn(()), *lk.quantize_int8(torch.randn(8, 128))), "x: expected at least 1"),
    # devices (meta tensors reach the fake kernels, which check devices like the real ones)
    ("scales", lambda: lk.int8_linear(X.to("meta"), lk.quantize_int8(torch.randn(8, 128))[0].to("meta"), torch.rand(8)),
     "scales: expected the device of x"),
    ("packed", lambda: lk.nf4_linear(X.to("meta"), _nf4()[0], _nf4()[1].to("meta"), 8), "packed: expected the device"),
]


@pytest.mark.parametrize("arg, fn, match", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input(arg, fn, match):
    with pytest.raises((RuntimeError, ValueError, TypeError), match=match):
        fn()
