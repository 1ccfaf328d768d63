"""Attention: prefill forward and backward, paged decode, and forward peak memory (CPU).

Baseline: torch.nn.functional.scaled_dot_product_attention (ATen's CPU flash attention) on the same data
in its [batch, heads, seqlen, head_dim] layout. FLOPs as flash-attn's benchmark counts them: forward
4 * b * h * sq * sk * d (halved when causal), backward 2.5x that. Decode is bandwidth-bound: its figure
is the bytes of the cache it must read (k and v of every used slot) over the time, against the read
bandwidth of bench_read over as many bytes, timed interleaved with it.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.harness import Ceilings, Config, matmul_call, measure, rotating_sets

HEADER = ["case", "dtype", "llmkern ms", "sdpa ms", "x sdpa", "GFLOP/s", "% matmul", "GB/s", "% read BW"]
LEGEND = ("GFLOP/s: flash-attn's FLOP count / llmkern time; % matmul: of the torch.mm rate in that dtype (the "
          "ceilings' n^3 product, timed interleaved with the row's calls: on AMX its rate moves with the host's "
          "phase as the attention's does); decode GB/s: k/v cache bytes read / llmkern time; % read BW: of "
          "bench_read over as many bytes, timed interleaved; huge pages: the caches (paged, and SDPA's contiguous "
          "copy) and the probe on transparent huge pages, as the serving engine allocates its KV cache; x sdpa: SDPA "
          "time / llmkern time (medians of interleaved calls); fwd peak memory: resident memory the forward adds "
          "over its inputs (VmHWM), output included.")


@dataclasses.dataclass
class Prefill:
    batch: int = 1
    heads: int = 32
    head_dim: int = 128
    seqlen: int = 2048

    def flops(self) -> float:  # causal
        return 4 * self.batch * self.heads * self.seqlen**2 * self.head_dim / 2


@dataclasses.dataclass
class Decode:
    batch: int = 8
    heads: int = 32
    heads_k: int = 8
    head_dim: int = 128
    context: int = 4096
    block_size: int = 16


def shapes(cfg: Config) -> tuple[Prefill, Decode, list[int]]:
    if cfg.quick:
        return Prefill(1, 4, 64, 256), Decode(2, 8, 2, 64, 512, 16), [256, 512]
    return Prefill(), Decode(), [2048, 4096, 8192]


def prefill_rows(p: Prefill, dtype: torch.dtype, cfg: Config) -> list[list[str]]:
    from llmkern.ops import flash_attn_func

    lk = torch.ops.llmkern
    scale = p.head_dim**-0.5

    def make():
        q, k, v = (torch.randn(p.batch, p.seqlen, p.heads, p.head_dim, dtype=dtype) for _ in range(3))
        out, lse = lk.flash_attn_fwd(q, k, v, None, None, None, None, None, None, p.seqlen, p.seqlen, scale, -1, 0,
                                     0.0, 0)  # fmt: skip
        qt, kt, vt = (t.transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
        graph = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        return q, k, v, out, lse, torch.randn_like(out), qt, kt, vt, graph

    s = rotating_sets(make, 10 * p.batch * p.seqlen * p.heads * p.head_dim * dtype.itemsize, cfg)
    pick = lambda i: s[i % len(s)]  # noqa: E731
    mm, mm_flops = matmul_call(cfg.mm_n, dtype)
    fwd = measure({
        "llmkern": lambda i: flash_attn_func(*pick(i)[:3], causal=True),
        "sdpa": lambda i: F.scaled_dot_product_attention(*(t.detach() for t in pick(i)[6:9]), is_causal=True),
        "mm": mm,
    }, reps=cfg.reps, warmup=max(cfg.warmup, len(s)), budget_s=cfg.budget_s)  # fmt: skip

    def ours_bwd(i):
        q, k, v, out, lse, dout = pick(i)[:6]
        return lk.flash_attn_bwd(dout, q, k, v, out, lse, None, None, None, p.seqlen, p.seqlen, scale, -1, 0, 0.0)

    def sdpa_bwd(i):
        *_, dout, qt, kt, vt, graph = pick(i)
        return torch.autograd.grad(graph, (qt, kt, vt), dout.transpose(1, 2), retain_graph=True)

    bwd = measure({"llmkern": ours_bwd, "sdpa": sdpa_bwd, "mm": mm}, reps=cfg.reps, warmup=max(cfg.warmup, len(s)),
                  budget_s=cfg.budget_s)  # fmt: skip
    name = f"prefill causal b{p.batch} h{p.heads} d{p.head_dim} s{p.seqlen}"
    return [flop_row(f"{name} fwd", dtype, fwd, p.flops(), mm_flops),
            flop_row(f"{name} bwd", dtype, bwd, 2.5 * p.flops(), mm_flops)]


def flop_row(case, dtype, times, flops, mm_flops) -> list[str]:
    """times: llmkern's, SDPA's and the interleaved torch.mm's (mm_flops each)."""
    ms, base = times["llmkern"].median_s * 1e3, times["sdpa"].median_s * 1e3
    gflops, matmul_gflops = flops / ms / 1e6, mm_flops / times["mm"].median_s / 1e9
    print(f"  {case} {dtype}: llmkern {ms:.1f} ms, sdpa {base:.1f} ms, torch.mm {matmul_gflops:.0f} GFLOP/s",
          flush=True)
    return [case, str(dtype).removeprefix("torch."), f"{ms:.2f}", f"{base:.2f}", f"{base / ms:.2f}", f"{gflops:.1f}",
            f"{100 * gflops / matmul_gflops:.0f}", "-", "-"]  # fmt: skip


def decode_row(dc: Decode, dtype: torch.dtype, cfg: Config, huge_pages: bool = False) -> list[str]:
    """huge_pages: the caches (paged and contiguous) and the read probe on transparent huge pages, as the serving
    engine allocates its KV cache (llmkern.memory)."""
    from llmkern.memory import empty_on_huge_pages
    from llmkern.ops import flash_attn_with_kvcache

    b, h, hk, d, ctx, bs = dc.batch, dc.heads, dc.heads_k, dc.head_dim, dc.context, dc.block_size
    cache_bytes = 2 * b * ctx * hk * d * dtype.itemsize  # k and v of every used slot
    empty = empty_on_huge_pages if huge_pages else lambda shape, dt: torch.empty(shape, dtype=dt)

    def make(ctx: int = ctx):
        blocks = b * ctx // bs
        k_cache, v_cache = (empty((blocks, bs, hk, d), dtype).normal_() for _ in range(2))
        table = torch.randperm(blocks, dtype=torch.int32).view(b, ctx // bs)  # shuffled: real paging
        # The same keys stored contiguously [b, hk, ctx, d] for SDPA.
        k_c, v_c = (empty((b, hk, ctx, d), dtype).copy_(c[table.long()].reshape(b, ctx, hk, d).transpose(1, 2))
                    for c in (k_cache, v_cache))
        return torch.randn(b, 1, h, d, dtype=dtype), k_cache, v_cache, table, k_c, v_c

    def calls(s: tuple[torch.Tensor, ...], probe: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
        seqlens = torch.full((b,), s[3].shape[1] * bs, dtype=torch.int32)
        return {
            "llmkern": lambda: flash_attn_with_kvcache(s[0], *s[1:3], cache_seqlens=seqlens, block_table=s[3]),
            "sdpa": lambda: F.scaled_dot_product_attention(s[0].transpose(1, 2), *s[4:6], enable_gqa=True),
            "read": lambda: torch.ops.llmkern.bench_read(probe),
        }

    probe = empty((cache_bytes // 4,), torch.float32).normal_()
    sets = [calls(s, probe) for s in rotating_sets(make, 2 * cache_bytes, cfg)]
    fns = {name: (lambda i, name=name: sets[i % len(sets)][name]()) for name in sets[0]}
    # Primed (see harness.measure) by the same calls over a 4-block context.
    prime = calls(make(4 * bs), torch.empty(16 << 10).normal_())
    times = measure(fns, reps=cfg.reps, warmup=max(cfg.warmup, len(sets)), budget_s=cfg.budget_s, prime=prime)
    ms, base = times["llmkern"].median_s * 1e3, times["sdpa"].median_s * 1e3
    gbps, read = cache_bytes / ms / 1e6, cache_bytes / times["read"].median_s / 1e9
    case = f"decode paged b{b} h{h}/{hk} d{d} ctx{ctx} block{bs}" + (" huge pages" if huge_pages else "")
    print(f"  {case} {dtype}: llmkern {ms:.2f} ms, sdpa {base:.2f} ms, read {read:.1f} GB/s", flush=True)
    return [case, str(dtype).removeprefix("torch."), f"{ms:.2f}", f"{base:.2f}", f"{base / ms:.2f}", "-", "-",
            f"{gbps:.1f}", f"{100 * gbps / read:.0f}"]  # fmt: skip


# Run in a fresh interpreter per seqlen, so no allocator cache or earlier peak hides what the forward adds:
# builds the inputs, runs one small forward (thread pool, libraries), then measures the big one.
_PEAK_SCRIPT = """
import re, sys, torch
from llmkern.ops import flash_attn_func
torch.set_num_threads({threads})
def kib(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
q, k, v = (torch.randn(1, {n}, {h}, {d}, dtype=torch.bfloat16) for _ in range(3))
flash_attn_func(q[:, :64], k[:, :64], v[:, :64], causal=True)
open("/proc/self/clear_refs", "w").write("5")
before = kib("VmRSS")
out = flash_attn_func(q, k, v, causal=True)
print((kib("VmHWM") - before) / 1024)
"""


def peak_extra_mib(n: int, heads: int, head_dim: int) -> float | None:
    """Peak resident memory (MiB) a bf16 causal forward adds over its inputs, output included (Linux VmHWM
    after resetting it through /proc/self/clear_refs); None where that is unavailable."""
    code = _PEAK_SCRIPT.format(threads=torch.get_num_threads(), n=n, h=heads, d=head_dim)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    try:
        return float(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def memory_rows(p: Prefill, seqlens: list[int]) -> list[list[str]]:
    """Forward peak memory over the inputs: out + lse are O(seqlen), so it must grow linearly."""
    rows = []
    for n in seqlens:
        extra = peak_extra_mib(n, p.heads, p.head_dim)
        out_mib = n * p.heads * p.head_dim * 2 / 2**20
        rows.append([f"fwd peak memory s{n} h{p.heads} d{p.head_dim}", "bfloat16", "-", "-", "-", "-", "-",
                     "-" if extra is None else f"{extra:.0f} MiB", f"out {out_mib:.0f} MiB"])  # fmt: skip
        print(f"  fwd peak memory s{n}: {extra} MiB (out {out_mib:.0f} MiB)", flush=True)
    return rows


def run(cfg: Config, ceilings: Ceilings) -> list[list[str]]:
    prefill, decode, mem_seqlens = shapes(cfg)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += prefill_rows(prefill, dtype, cfg)
    rows += [decode_row(decode, torch.bfloat16, cfg, huge) for huge in (False, True)]
    rows += memory_rows(prefill, mem_seqlens)
    return rows
