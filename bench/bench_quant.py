"""Weight-only quantized linear (CPU): nf4 (block 64), int4 (group 128, symmetric), int8 per row, bf16 x; and
the dense bf16 linear (llmkern.ops.linear) the unquantized layers of a model use.

Per shape (N x K) and M, one interleaved measurement times every implementation on the same rotating
weight sets (so each call reads its weight from memory, as a model's layers do): llmkern's nf4_linear,
int4_linear, int8_linear and linear, torch.ops.aten._weight_int4pack_mm_for_cpu at the same group size (the
int4 baseline), a dense bf16 x @ W.T (F.linear), and bench_read over a buffer beyond the LLC (the read
bandwidth of the moment). The floor is the packed weight bytes + scales (+ absmax) over that bandwidth.
Then the resident memory of a quantized 4096 x 4096 layer, measured in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from bench.harness import Ceilings, Config, llc_bytes, measure, rotating_sets

HEADER = ["case", "M", "llmkern ms", "floor ms", "% read BW", "int4pack ms", "x int4pack", "dense bf16 ms", "x dense"]
LEGEND = ("floor: bytes the kernel must read (packed weight + scales / absmax) / read GB/s of bench_read over "
          f"{'>'} 4x LLC, timed interleaved; % read BW: floor / llmkern; x int4pack, x dense: that baseline's time / "
          "llmkern time (int4pack: torch.ops.aten._weight_int4pack_mm_for_cpu, same group size; dense: F.linear "
          "with a bf16 weight; the dense bf16 rows time llmkern.ops.linear on that weight, floor = its bytes); "
          "medians of interleaved calls over rotating weight sets. Memory rows: resident "
          "memory (VmRSS) an nn.Linear(4096, 4096) quantized by llmkern.quant.quantize_ adds in a fresh "
          "interpreter, vs bits/8 x params + scales.")

NF4_BLOCK, INT4_GROUP = 64, 128


def shapes(cfg: Config) -> tuple[list[tuple[int, int]], list[int]]:
    if cfg.quick:
        return [(256, 512)], [1, 16]
    return [(4096, 4096), (11008, 4096), (4096, 11008)], [1, 4, 8, 16, 64]  # the M, and 8 (batched decoding)


def make_set(n: int, k: int) -> dict[str, torch.Tensor]:
    """Random packed weights (codes and scales drawn directly: the kernels' speed does not depend on them)."""
    packed = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    s = {
        "nf4": packed.reshape(-1, 1).clone(),
        "absmax": torch.rand(n * k // NF4_BLOCK) + 0.5,
        "int4": packed,
        "scales": (torch.rand(n, k // INT4_GROUP) * 0.02).bfloat16(),
        "int8": torch.randint(-127, 128, (n, k), dtype=torch.int8),
        "int8_scales": (torch.rand(n) * 0.02).bfloat16(),
        "dense": torch.randn(n, k, dtype=torch.bfloat16),
    }
    q = torch.randint(0, 16, (n, k), dtype=torch.int32)
    s["int4pack"] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    zeros = torch.zeros_like(s["scales"])
    s["int4pack_sz"] = torch.stack([s["scales"], zeros], -1).transpose(0, 1).contiguous()  # [K/G, N, 2]
    return s


def set_bytes(n: int, k: int) -> int:
    return n * k * (0.5 + 0.5 + 0.5 + 1 + 2) + n * k // NF4_BLOCK * 4


def case_rows(n: int, k: int, ms: list[int], cfg: Config) -> list[list[str]]:
    from llmkern.ops import int4_linear, int8_linear, linear, nf4_linear

    sets = rotating_sets(lambda: make_set(n, k), int(set_bytes(n, k)), cfg)
    tiny = make_set(64, k)  # the primer's weights (see measure's prime)
    probe = torch.randn(max(4 * llc_bytes(), 64 << 20) // 4)
    tiny_probe = torch.randn(16 << 10)
    read_bytes = {
        "nf4": n * k // 2 + n * k // NF4_BLOCK * 4,
        "int4": n * k // 2 + n * (k // INT4_GROUP) * 2,
        "int8": n * k + n * 2,
        "linear": n * k * 2,
    }
    rows = []
    for m in ms:
        x = torch.randn(m, k, dtype=torch.bfloat16)

        def calls(s: dict[str, torch.Tensor], nn: int, probe: torch.Tensor) -> dict[str, Callable[[], torch.Tensor]]:
            return {
                "nf4": lambda: nf4_linear(x, s["nf4"], s["absmax"], nn, NF4_BLOCK),
                "int4": lambda: int4_linear(x, s["int4"], s["scales"], None, INT4_GROUP),
                "int8": lambda: int8_linear(x, s["int8"], s["int8_scales"]),
                "int4pack": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, s["int4pack"], INT4_GROUP,
                                                                               s["int4pack_sz"]),
                "linear": lambda: linear(x, s["dense"]),
                "dense": lambda: F.linear(x, s["dense"]),
                "read": lambda: torch.ops.llmkern.bench_read(probe),
            }  # fmt: skip

        per_set = [calls(s, n, probe) for s in sets]
        fns = {name: (lambda i, name=name: per_set[i % len(sets)][name]()) for name in per_set[0]}
        prime = calls(tiny, 64, tiny_probe)
        t = measure(fns, reps=cfg.reps, warmup=max(cfg.warmup, len(sets)), budget_s=cfg.budget_s, prime=prime)
        ms_ = {name: v.median_s * 1e3 for name, v in t.items()}
        read_gbps = probe.numel() * 4 / (ms_["read"] / 1e3) / 1e9
        for fmt, label in (("nf4", f"nf4 b{NF4_BLOCK}"), ("int4", f"int4 g{INT4_GROUP}"), ("int8", "int8"),
                           ("linear", "dense bf16")):  # fmt: skip
            lk = ms_[fmt]
            floor = read_bytes[fmt] / read_gbps / 1e6
            base = ms_["int4pack"] if fmt == "int4" else None
            rows.append([f"{label} {n}x{k}", str(m), f"{lk:.3f}", f"{floor:.3f}", f"{100 * floor / lk:.0f}",
                         "-" if base is None else f"{base:.3f}", "-" if base is None else f"{base / lk:.2f}",
                         f"{ms_['dense']:.3f}", f"{ms_['dense'] / lk:.2f}"])  # fmt: skip
        print(f"  {n}x{k} M={m}: " + ", ".join(f"{k_} {v:.3f} ms" for k_, v in ms_.items())
              + f", read {read_gbps:.1f} GB/s", flush=True)  # fmt: skip
    return rows


# A fresh interpreter per format: RSS before, then an nn.Linear(4096, 4096) in bf16 quantized in place by
# llmkern.quant.quantize_ (the float weight is freed; MALLOC_MMAP_THRESHOLD_ makes big frees go back to the
# OS), RSS after. Prints the delta (bytes) and the byte count of the quantized layer's buffers.
_MEM_SCRIPT = """
import gc, re, warnings, torch
from torch import nn
import llmkern.quant as Q
def rss():
    return int(re.search(r"VmRSS:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
config = {{"nf4": Q.NF4Config({block}), "int4": Q.Int4Config({group}), "int8": Q.Int8Config()}}["{fmt}"]
def model(n):  # the second Linear stands for the output head quantize_ leaves alone
    return nn.Sequential(nn.Linear(n, n, bias=False, dtype=torch.bfloat16), nn.Linear(8, 8))
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    Q.quantize_(model(256), config)  # load kernels, thread pool, cached tables
    gc.collect()
    before = rss()
    m = model({n})
    Q.quantize_(m, config)
gc.collect()
print(rss() - before, sum(b.untyped_storage().nbytes() for b in m[0].buffers()))
"""


def memory_rows(n: int = 4096) -> list[list[str]]:
    rows = []
    params = n * n
    expected = {
        "nf4": params // 2 + params // NF4_BLOCK + 4 * (params // NF4_BLOCK // 256),  # codes + u8 absmax + nested
        "int4": params // 2 + params // INT4_GROUP * 2,  # codes + bf16 scales
        "int8": params + n * 2,
    }
    import os

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for fmt in ("nf4", "int4", "int8"):
        code = _MEM_SCRIPT.format(n=n, fmt=fmt, block=NF4_BLOCK, group=INT4_GROUP)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        try:
            rss, tensors = (int(v) for v in r.stdout.split())
        except ValueError:
            rss = tensors = None
        exp = expected[fmt]
        mib = lambda b: f"{b / 2**20:.2f} MiB"  # noqa: E731
        cells = "-" if rss is None else f"{mib(rss)} ({100 * rss / exp:.0f}% of expected)"
        rows.append([f"{fmt} {n}x{n} resident memory", "-", cells, f"expected {mib(exp)}", "-",
                     "-", "-", "-" if tensors is None else f"tensors {mib(tensors)}", "-"])  # fmt: skip
        print(f"  {fmt} {n}x{n} resident: {rss} B, tensors {tensors} B, expected {exp} B", flush=True)
    return rows


def run(cfg: Config, ceilings: Ceilings) -> list[list[str]]:
    shape_list, ms = shapes(cfg)
    rows = []
    for n, k in shape_list:
        rows += case_rows(n, k, ms, cfg)
    rows += memory_rows(512 if cfg.quick else 4096)
    return rows
