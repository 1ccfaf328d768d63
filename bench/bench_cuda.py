"""CUDA benchmark of llmkern's kernels vs torch eager of the <op>_ref (python -m bench.bench_cuda).

Times with torch.cuda.Event (back-to-back calls, the median of batches after warm-up; see time_ms) at the
issue's shapes, fp32 and bf16, and reports GB/s of the bytes that must move and their fraction of a device
copy bandwidth measured in the same run (torch copy_ of a 1 GiB tensor); then attention (vs SDPA) and the
weight-only quantized linear (vs a dense bf16 matmul). Self-contained; skips without CUDA."""

from __future__ import annotations

import statistics

import torch

REPS, WARMUP, BATCHES = 20, 5, 5


def time_ms(fn, reps: int = REPS, graph: bool = False) -> float:
    """Milliseconds per call: the median over BATCHES of the mean of `reps` back-to-back calls, so the GPU's
    queue stays full wherever the host launches faster than the kernels run (a timed single call would count
    the host's launch latency too). graph: fn captured once as a CUDA graph and replayed, for calls short
    enough that the host's per-op launch cost (Python, dispatcher) would otherwise be what is timed."""
    if graph:
        fn = graphed(fn)
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(BATCHES):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def graphed(fn):
    """fn as one CUDA graph replay (warmed up on a side stream first, as torch.cuda.graph requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6  # read + write


def cases(dtype):
    import llmkern.ops as lk
    from llmkern.ops import activation as act
    from llmkern.ops import rope

    dev, es = "cuda", torch.tensor([], dtype=dtype).element_size()
    x = torch.randn(4096, 4096, dtype=dtype, device=dev)
    w = torch.randn(4096, dtype=dtype, device=dev)
    res, out = torch.randn_like(x), torch.empty_like(x)
    yield ("rms_norm", 2 * x.numel() * es, lambda: lk.rms_norm(x, w, out=out), lambda: lk.rms_norm_ref(x, w))
    yield ("fused_add_rms_norm_", 4 * x.numel() * es, lambda: lk.fused_add_rms_norm_(x, res, w),
           lambda: lk.fused_add_rms_norm_ref(x, res, w))
    dy = torch.randn_like(x)
    _, rstd = torch.ops.llmkern.rms_norm(x, w, 1e-6, False)
    yield ("rms_norm_bwd", 3 * x.numel() * es, lambda: torch.ops.llmkern.rms_norm_bwd(dy, x, w, rstd, False, None),
           None)
    gu = torch.randn(4096, 2 * 11008, dtype=dtype, device=dev)
    o = torch.empty(4096, 11008, dtype=dtype, device=dev)
    yield ("silu_and_mul", (gu.numel() + o.numel()) * es, lambda: act.silu_and_mul(gu, out=o),
           lambda: act.act_and_mul_ref(gu, "silu"))
    dyo = torch.randn_like(o)
    yield ("silu_and_mul_bwd", (gu.numel() * 2 + o.numel()) * es,
           lambda: torch.ops.llmkern.act_and_mul_bwd(dyo, gu, "silu"), None)
    cache = rope.rope_cos_sin_cache(128, 8192).to(dev)
    pos = torch.randint(0, 8192, (4096,), device=dev)
    q = torch.randn(4096, 32, 128, dtype=dtype, device=dev)
    k = torch.randn(4096, 8, 128, dtype=dtype, device=dev)
    yield ("rotary_embedding_", 2 * (q.numel() + k.numel()) * es,
           lambda: rope.rotary_embedding_(pos, q, k, cache, True),
           lambda: (rope.rotary_embedding_ref(q, pos, cache), rope.rotary_embedding_ref(k, pos, cache)))


def main() -> list[dict]:
    if not torch.cuda.is_available():
        print("bench_cuda: skipped: CUDA not available")
        return []
    ceiling = copy_bandwidth_gbs()
    print(f"device: {torch.cuda.get_device_name()}  copy bandwidth (torch copy_ 1 GiB): {ceiling:.0f} GB/s")
    print(f"{'op':<22}{'dtype':<10}{'llmkern ms':>11}{'GB/s':>8}{'% copy':>8}{'eager ms':>10}{'speedup':>9}")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for name, nbytes, kern, eager in cases(dtype):
            ms = time_ms(kern)
            ems = time_ms(eager) if eager else float("nan")
            gbs = nbytes / ms / 1e6
            row = dict(op=name, dtype=str(dtype).replace("torch.", ""), ms=ms, gbs=gbs, pct=100 * gbs / ceiling,
                       eager_ms=ems, speedup=ems / ms)
            rows.append(row)
            print(f"{name:<22}{row['dtype']:<10}{ms:>11.4f}{gbs:>8.0f}{row['pct']:>7.0f}%{ems:>10.4f}"
                  f"{row['speedup']:>8.1f}x")
    attention()
    quant()
    return rows


def attention() -> None:
    """Prefill (b1 h32 d128 s2048 causal, fwd and bwd) and paged decode (b8 h32/8 d128 ctx4096 block16) in
    bf16 vs SDPA; TFLOP/s by flash-attn's count, decode GB/s over the k/v cache bytes it must read."""
    import torch.nn.functional as F

    from llmkern.ops import flash_attn_func, flash_attn_with_kvcache

    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, 2048, 32, 128, dtype=dt, device=dev, requires_grad=True) for _ in range(3))
    qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
    flops = 4 * 32 * 2048**2 * 128 / 2
    ours, sdpa = flash_attn_func(q, k, v, causal=True), F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    dout = torch.randn_like(ours)
    cases = [
        ("prefill fwd", flops, lambda: flash_attn_func(q, k, v, causal=True),
         lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)),
        ("prefill bwd", 2.5 * flops, lambda: torch.autograd.grad(ours, (q, k, v), dout, retain_graph=True),
         lambda: torch.autograd.grad(sdpa, (qt, kt, vt), dout.transpose(1, 2), retain_graph=True)),
    ]
    print(f"{'attention':<26}{'llmkern ms':>11}{'TFLOP/s':>9}{'sdpa ms':>9}{'x sdpa':>8}")
    for name, fl, kern, base in cases:
        ms, bms = time_ms(kern, reps=5), time_ms(base, reps=5)
        print(f"{name:<26}{ms:>11.3f}{fl / ms / 1e9:>9.1f}{bms:>9.3f}{bms / ms:>8.2f}")
    b, hk, ctx, bs = 8, 8, 4096, 16
    k_cache, v_cache = (torch.randn(b * ctx // bs, bs, hk, 128, dtype=dt, device=dev) for _ in range(2))
    table = torch.randperm(b * ctx // bs, device=dev).to(torch.int32).view(b, -1)
    k_c, v_c = (c[table.long()].reshape(b, ctx, hk, 128).transpose(1, 2).contiguous() for c in (k_cache, v_cache))
    qd = torch.randn(b, 1, 32, 128, dtype=dt, device=dev)
    seqlens = torch.full((b,), ctx, dtype=torch.int32, device=dev)
    ms = time_ms(lambda: flash_attn_with_kvcache(qd, k_cache, v_cache, cache_seqlens=seqlens, block_table=table))
    bms = time_ms(lambda: F.scaled_dot_product_attention(qd.transpose(1, 2), k_c, v_c, enable_gqa=True))
    gbs = 2 * k_c.numel() * 2 / ms / 1e6
    print(f"{'decode paged':<26}{ms:>11.3f}{gbs:>8.0f}G{bms:>9.3f}{bms / ms:>8.2f}   (GB/s of the k/v cache)")


def quant() -> None:
    """Weight-only quantized linear, 4096 x 4096 weight, bf16 x, int4 (group 128) and nf4 (block 64) vs a dense
    bf16 x @ W.T: GB/s over the weight bytes (packed weight plus scales) and TFLOP/s. Each call reads another
    copy of the weight, the copies spanning 4x the L2 (so the weight comes from HBM, as in decoding), and the
    calls are one CUDA graph (M = 1 takes microseconds: the host's launch cost would be timed otherwise)."""
    import llmkern.ops as lk

    dev, dt, n, k = "cuda", torch.bfloat16, 4096, 4096
    span = 4 * getattr(torch.cuda.get_device_properties(dev), "L2_cache_size", 64 << 20)
    w = torch.randn(n, k, dtype=dt) * 0.02  # quantized on the CPU (there is no CUDA quantize), then moved
    packed4, scales = lk.quantize_int4(w, group_size=128)[:2]  # symmetric: no zeros
    packednf, absmax = lk.quantize_nf4(w, 64)
    formats = {  # name: (weight tensors, the product); dense first: the others' "x dense" divides by its time
        "dense bf16": ((w,), lambda x, wd: x @ wd.T),
        "int4 g128": ((packed4, scales), lambda x, p, s: lk.int4_linear(x, p, s, None, 128)),
        "nf4 b64": ((packednf, absmax), lambda x, p, a: lk.nf4_linear(x, p, a, n, 64)),
    }
    print(f"{'quant linear 4096x4096':<26}{'M':>4}{'llmkern ms':>11}{'GB/s':>8}{'TFLOP/s':>9}{'dense ms':>10}{'x dense':>9}")
    dense_ms = {}
    for name, (tensors, product) in formats.items():
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        copies = [[t.to(dev) for t in tensors] for _ in range(-(-span // nbytes))]
        for m in (1, 4, 16, 64, 256):
            x = torch.randn(m, k, dtype=dt, device=dev)
            ms = time_ms(lambda: [product(x, *c) for c in copies], reps=5, graph=True) / len(copies)
            dense_ms.setdefault(m, ms)
            print(f"{name:<26}{m:>4}{ms:>11.4f}{nbytes / ms / 1e6:>8.0f}{2 * m * n * k / ms / 1e9:>9.2f}"
                  f"{dense_ms[m]:>10.4f}{dense_ms[m] / ms:>9.2f}")


if __name__ == "__main__":
    main()
