"""Benchmark harness: interleaved timing with medians, rotating input sets, machine ceilings, one table.

Every figure is a ratio taken in the same run: these shared VMs drift by tens of percent between runs,
so the memory ceilings are measured here (before and after the op benchmarks) and each op's bandwidth
is quoted as a fraction of the copy ceiling measured alongside it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

MiB = 1 << 20
IMPLS = ("llmkern", "eager", "compile")


@dataclasses.dataclass
class Config:
    quick: bool = False
    reps: int = 15  # timed calls per implementation (medians over these)
    warmup: int = 3  # untimed calls first (at least one per rotating set; compile happens here)
    tokens: int = 4096  # rows of the op benchmarks
    ceiling_bytes: int = 512 * MiB  # buffer size of the bandwidth probes, far beyond the LLC
    mm_n: int = 2048  # square matmul size for the FLOP ceiling
    rotate_bytes: int | None = None  # total bytes the rotating sets must reach (default 4x LLC)
    compile: bool = True  # time torch.compile baselines
    budget_s: float = 2.0  # timed seconds per implementation and case; slow ones get fewer reps (>= 5)
    max_sets: int = 64

    @classmethod
    def quick_config(cls) -> Config:
        return cls(quick=True, reps=5, warmup=2, tokens=512, ceiling_bytes=64 * MiB, mm_n=512, budget_s=0.5)

    def min_rotate_bytes(self) -> int:
        return self.rotate_bytes if self.rotate_bytes is not None else 4 * llc_bytes()


def llc_bytes() -> int:
    """Size of the last-level cache (the highest cache index in sysfs), 32 MiB if unknown."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for d in os.listdir(base):
            if not d.startswith("index"):
                continue
            with open(os.path.join(base, d, "size")) as f:
                s = f.read().strip()
            mult = {"K": 1 << 10, "M": MiB, "G": 1 << 30}.get(s[-1], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or 32 * MiB


# ---- timing ----


@dataclasses.dataclass
class Timing:
    median_s: float
    q1_s: float
    q3_s: float

    @property
    def iqr_rel(self) -> float:
        return (self.q3_s - self.q1_s) / self.median_s if self.median_s else 0.0


def _timing(samples: list[float]) -> Timing:
    q = statistics.quantiles(samples, n=4) if len(samples) > 1 else samples * 3
    return Timing(statistics.median(samples), q[0], q[2])


def measure(fns: dict[str, Callable[[int], Any]], *, reps: int, warmup: int, budget_s: float | None = None,
            min_reps: int = 5, prime: dict[str, Callable[[], Any]] | None = None) -> dict[str, Timing]:
    """Times each fn(i) (i = call counter, for rotating sets): warm-up calls first, then up to `reps`
    timed calls per fn, interleaved round-robin so drift on a shared machine hits every fn alike. Each round
    takes the fns in a new (seeded) random order, so what a call inherits from the call before it falls on
    every fn alike too.
    With budget_s, a slow fn gets only as many calls (at least min_reps) as fit in budget_s, judged by
    its last warm-up call, so second-long eager baselines do not dominate the run.
    prime[name](), where given, runs untimed right before each timed call of fn `name`: the same call on tiny
    data, so its code path (Python, the dispatcher, the kernel's instructions) and small inputs are in cache while
    its big operands (rotating sets) are not, as for a layer's op in a model. Without it a call after one that
    streamed far more than the LLC runs its whole software stack from memory: on Zen 4 0.13-0.19 ms more for an int4
    GEMV of any size after a 128 MB read (4096 x 4096: 0.29 -> 0.45 ms), 0.29 ms again when primed."""
    n_reps = {}
    for name, fn in fns.items():
        for i in range(warmup):
            t0 = time.perf_counter()
            fn(i)
            last = time.perf_counter() - t0
        fit = reps if budget_s is None or warmup == 0 else int(budget_s / max(last, 1e-9))
        n_reps[name] = max(min(reps, min_reps), min(reps, fit))
    samples: dict[str, list[float]] = {k: [] for k in fns}
    order = random.Random(0)
    for i in range(max(n_reps.values())):
        for name in order.sample(list(fns), len(fns)):
            fn = fns[name]
            if i < n_reps[name]:
                if prime and name in prime:
                    prime[name]()
                t0 = time.perf_counter()
                fn(warmup + i)
                samples[name].append(time.perf_counter() - t0)
    return {k: _timing(v) for k, v in samples.items()}


def rotating_sets(make: Callable[[], Any], bytes_per_set: int, cfg: Config) -> list[Any]:
    """Enough input/output sets (from make()) that cycling through them touches more than
    cfg.min_rotate_bytes(): each call then finds its data in memory, not in cache, as a model's
    layers do. One set when it alone is that large (a call then evicts its predecessor's data before
    reusing it), else at least 2, at most cfg.max_sets."""
    need = math.ceil(cfg.min_rotate_bytes() / max(1, bytes_per_set))
    n = 1 if need <= 1 else min(cfg.max_sets, need)
    return [make() for _ in range(n)]


def compiled(fn: Callable, cfg: Config) -> Callable | None:
    """torch.compile(fn) for the compile baseline (static shapes), or None when disabled."""
    return torch.compile(fn, dynamic=False) if cfg.compile else None


# ---- results ----


@dataclasses.dataclass
class Row:
    op: str
    shape: str
    dtype: str
    nbytes: int  # bytes the op must move at minimum
    times: dict[str, Timing]  # by implementation name (IMPLS)
    copy_gbps: float  # bench_copy_ of the same bytes, timed interleaved with the implementations


def run_case(
    op: str,
    shape: Sequence[int] | str,
    dtype: torch.dtype,
    nbytes: int,
    impls: dict[str, Callable[[int], Any] | None],
    cfg: Config,
    n_sets: int,
) -> Row:
    """Times the given implementations (None ones are skipped) and returns one table row. A copy of
    nbytes (read + write) with the bench_copy_ probe is timed interleaved with them, so the row's
    fraction of copy bandwidth compares calls made under the same load on a shared machine."""
    n = max(1, nbytes // 8)
    src, dst = torch.randn(n), torch.zeros(n)
    fns = {k: v for k, v in impls.items() if v is not None}
    fns["copy"] = lambda i: torch.ops.llmkern.bench_copy_(dst, src)
    times = measure(fns, reps=cfg.reps, warmup=max(cfg.warmup, n_sets), budget_s=cfg.budget_s)
    copy_gbps = 2 * n * 4 / times.pop("copy").median_s / 1e9
    shape_s = shape if isinstance(shape, str) else "x".join(map(str, shape))
    row = Row(op, shape_s, str(dtype).removeprefix("torch."), nbytes, times, copy_gbps)
    print(f"  {op} {shape_s} {row.dtype}: " + ", ".join(f"{k} {t.median_s * 1e3:.2f} ms" for k, t in times.items())
          + f", copy {copy_gbps:.1f} GB/s",
          flush=True)
    return row


# ---- ceilings ----


@dataclasses.dataclass
class Ceilings:
    copy_gbps: list[float]  # one entry per measurement (start and end of the run)
    read_gbps: list[float]
    matmul_gflops: dict[str, float]
    threads: int
    fma_gflops: float = 0.0  # float32 FMA peak over all threads (0: not measured)

    @property
    def copy(self) -> float:
        return statistics.fmean(self.copy_gbps)


def bandwidth(nbytes: int, cfg: Config) -> tuple[float, float]:
    """(copy GB/s counting bytes read + written, read GB/s) with the bench_copy_/bench_read probes
    over float32 buffers of nbytes each (medians of interleaved calls)."""
    ops = torch.ops.llmkern
    n = nbytes // 4
    src = torch.randn(n)
    dst = torch.empty(n).fill_(0)  # touch the pages before timing
    t = measure(
        {"copy": lambda i: ops.bench_copy_(dst, src), "read": lambda i: ops.bench_read(src)},
        reps=max(3, cfg.reps // 2),
        warmup=1,
    )
    return 2 * n * 4 / t["copy"].median_s / 1e9, n * 4 / t["read"].median_s / 1e9


def matmul_call(n: int, dtype: torch.dtype) -> tuple[Callable[[int], Any], int]:
    """A torch.mm of two n x n matrices (into a preallocated output) as a measure() fn, and its FLOPs."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    c = torch.empty(n, n, dtype=dtype)
    return (lambda i: torch.mm(a, b, out=c)), 2 * n**3


def matmul_gflops(n: int, dtype: torch.dtype, cfg: Config) -> float:
    mm, flops = matmul_call(n, dtype)
    t = measure({"mm": mm}, reps=max(3, cfg.reps // 3), warmup=1)
    return flops / t["mm"].median_s / 1e9


def fma_gflops(cfg: Config, iters: int) -> float:
    """The float32 FMA peak: bench_fma_'s register-only FMA chains, one task per thread."""
    out = torch.empty(torch.get_num_threads())
    flops = []
    t = measure({"fma": lambda i: flops.append(torch.ops.llmkern.bench_fma_(out, iters))}, reps=max(3, cfg.reps // 3),
                warmup=1)  # fmt: skip
    return flops[-1] / t["fma"].median_s / 1e9


def measure_ceilings(cfg: Config) -> Ceilings:
    copy, read = bandwidth(cfg.ceiling_bytes, cfg)
    mm = {str(d).removeprefix("torch."): matmul_gflops(cfg.mm_n, d, cfg) for d in (torch.float32, torch.bfloat16)}
    fma = fma_gflops(cfg, 100_000 if cfg.quick else 5_000_000)  # 5M rounds: ~20 ms a call on AVX-512 at ~100 GFLOP/s
    return Ceilings([copy], [read], mm, torch.get_num_threads(), fma)


def remeasure_bandwidth(c: Ceilings, cfg: Config) -> None:
    copy, read = bandwidth(cfg.ceiling_bytes, cfg)
    c.copy_gbps.append(copy)
    c.read_gbps.append(read)


# ---- tables ----

HEADER = ["op", "shape", "dtype", "llmkern ms", "eager ms", "compile ms", "GB/s", "copy GB/s", "% copy BW",
          "x eager", "x compile"]


def table_rows(rows: list[Row]) -> list[list[str]]:
    out = []
    for r in rows:
        ms = {k: t.median_s * 1e3 for k, t in r.times.items()}
        lk = ms.get("llmkern")
        gbps = r.nbytes / (lk / 1e3) / 1e9 if lk else None

        def fmt(v, f):
            return "-" if v is None else format(v, f)

        out.append([
            r.op, r.shape, r.dtype,
            *(fmt(ms.get(k), ".2f") for k in IMPLS),
            fmt(gbps, ".1f"),
            fmt(r.copy_gbps, ".1f"),
            fmt(gbps and 100 * gbps / r.copy_gbps, ".0f"),
            *(fmt(lk and ms.get(k) and ms[k] / lk, ".2f") for k in ("eager", "compile")),
        ])
    return out


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_ceilings(c: Ceilings, cfg: Config, markdown: bool = False) -> str:
    fmt = lambda xs: " / ".join(f"{x:.1f}" for x in xs)
    buf = f"{cfg.ceiling_bytes // MiB} MiB"
    rows = [
        ["copy bandwidth (read + write)", f"{fmt(c.copy_gbps)} GB/s", f"bench_copy_, {buf}, start / end of run"],
        ["read bandwidth", f"{fmt(c.read_gbps)} GB/s", f"bench_read, {buf}, start / end of run"],
        *([f"matmul {d}", f"{g:.1f} GFLOP/s", f"torch.mm {cfg.mm_n}^3"] for d, g in c.matmul_gflops.items()),
        ["float32 FMA peak", f"{c.fma_gflops:.1f} GFLOP/s", "bench_fma_: FMA chains in registers, every thread"],
        ["threads", str(c.threads), f"LLC {llc_bytes() // MiB} MiB"],
    ]
    return format_table(["ceiling", "value", "how"], rows, markdown)
