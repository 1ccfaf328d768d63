"""CUDA benchmark of llmkern's kernels vs torch eager of the <op>_ref (python -m bench.bench_cuda).

Times with torch.cuda.Event (median of reps after warm-up) at the issue's shapes, fp32 and bf16, and
reports GB/s of the bytes that must move and their fraction of a device copy bandwidth measured in the
same run (torch copy_ of a 1 GiB tensor). Self-contained; skips without CUDA."""

from __future__ import annotations

import statistics

import torch

REPS, WARMUP = 50, 10


def time_ms(fn, reps: int = REPS) -> float:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=20)
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
    return rows


if __name__ == "__main__":
    main()
