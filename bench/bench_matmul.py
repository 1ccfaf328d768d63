"""fp32 GEMMs of training (CPU): the linears of demo-target's training step, 16 x 512 tokens.

Per shape, llmkern against torch, interleaved (harness.measure): a linear's forward (`ops.linear`, whose fp32 path
from 256 rows and at most 1024 columns is `mm` over W^T, against F.linear), its input gradient dx = dy @ W and its
weight gradient dW = dy^T @ x (`ops.mm` against torch's `@`, as linear's backward runs them). Inputs rotate over
sets beyond the LLC, as a training step's activations come from memory.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.harness import Ceilings, Config, measure, rotating_sets

HEADER = ["case", "M x N x K", "llmkern ms", "torch ms", "x torch", "llmkern GFLOP/s", "% of fp32 mm", "% FMA peak"]
LEGEND = ("fp32, 2 * M * N * K FLOPs; forward: x [M, K] @ W[N, K]^T (llmkern.ops.linear vs F.linear); dx: dy [M, N] "
          "@ W [N, K] and dW: dy^T [N, M] @ x [M, K] (llmkern.ops.mm vs torch's @, dy^T a transposed view): "
          "demo-target's layers (hidden 320, intermediate 864, 16 x 512 tokens); medians of interleaved calls over "
          "rotating input sets; % of fp32 mm: llmkern GFLOP/s / the matmul float32 ceiling (torch.mm 2048^3); % FMA peak: "
          "of the float32 FMA peak ceiling (bench_fma_).")


def shapes(cfg: Config) -> tuple[int, list[tuple[int, int]]]:
    """Token rows and the (out, in) features of each linear."""
    if cfg.quick:
        return 256, [(64, 48)]
    return 16 * 512, [(320, 320), (864, 320), (320, 864)]  # q / o, gate / up, down (k / v: 64 x 320)


def run(cfg: Config, ceilings: Ceilings) -> list[list[str]]:
    from llmkern.ops import linear, mm

    tokens, layers = shapes(cfg)
    rows = []
    for n, k in layers:
        sets = rotating_sets(lambda: (torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)),
                             4 * (tokens * k + n * k + tokens * n), cfg)
        cases = {
            "forward": (tokens, n, k, lambda s: linear(s[0], s[1]), lambda s: F.linear(s[0], s[1])),
            "dx": (tokens, k, n, lambda s: mm(s[2], s[1]), lambda s: s[2] @ s[1]),
            "dW": (n, k, tokens, lambda s: mm(s[2].t(), s[0]), lambda s: s[2].t() @ s[0]),
        }
        for case, (m_, n_, k_, ours, theirs) in cases.items():
            t = measure({"llmkern": lambda i, f=ours: f(sets[i % len(sets)]),
                         "torch": lambda i, f=theirs: f(sets[i % len(sets)])},
                        reps=cfg.reps, warmup=max(cfg.warmup, len(sets)), budget_s=cfg.budget_s)
            ms = {name: v.median_s * 1e3 for name, v in t.items()}
            gflops = 2 * m_ * n_ * k_ / ms["llmkern"] / 1e6
            rows.append([f"{case} {n}x{k} linear", f"{m_}x{n_}x{k_}", f"{ms['llmkern']:.2f}", f"{ms['torch']:.2f}",
                         f"{ms['torch'] / ms['llmkern']:.2f}", f"{gflops:.0f}",
                         f"{100 * gflops / ceilings.matmul_gflops['float32']:.0f}",
                         f"{100 * gflops / ceilings.fma_gflops:.0f}" if ceilings.fma_gflops else "-"])
            print(f"  {case} {m_}x{n_}x{k_}: llmkern {ms['llmkern']:.2f} ms, torch {ms['torch']:.2f} ms", flush=True)
    return rows
