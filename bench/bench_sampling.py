"""Token selection on a decode step's logits: 1 and 16 rows of an 8k (the demo models) and a 128k (Llama 3)
vocabulary. The logits were just written by the output head, so the rows are timed from cache (one set, reused).
Greedy (ops.argmax): baselines torch.argmax(x, -1), eager and compiled. Sampling's top-k / top-p filter
(ops.top_k_top_p_, float32 logits randn * 3, top_p 0.95 alone and top_k 50 with top_p 0.9; its time includes copying
the logits into the buffer it filters): baselines transformers' warpers by a full sort (top_k_top_p_ref), eager and
compiled. The whole draw (ops.sample_: temperature 0.8, top_p 0.95 and the inverse CDF, float32 logits randn * 3;
its time includes the copy into its scratch buffer): baseline the same draw in PyTorch (the temperature, the full-sort
filter top_k_top_p_ref, softmax, then sample_from_probabilities' cumsum and searchsorted), eager.
"""

from __future__ import annotations

import torch

from bench.harness import Config, Row, compiled, run_case


def run(cfg: Config) -> list[Row]:
    from llmkern.generation import sample_from_probabilities
    from llmkern.ops.sampling import argmax, argmax_ref, sample_, top_k_top_p_, top_k_top_p_ref

    rows = []
    ref_c = compiled(argmax_ref, cfg)
    for dtype in (torch.float32, torch.bfloat16):
        for shape in ((1, 8192), (16, 8192), (1, 128256), (16, 128256)):
            x = torch.randn(shape).to(dtype)
            rows.append(run_case("argmax", shape, dtype, x.numel() * dtype.itemsize, {
                "llmkern": lambda i: argmax(x),
                "eager": lambda i: argmax_ref(x),
                "compile": ref_c and (lambda i: ref_c(x)),
            }, cfg, 1))
    filter_c = compiled(top_k_top_p_ref, cfg)
    for top_k, top_p in ((0, 0.95), (50, 0.9)):
        for shape in ((16, 8192), (1, 128256), (16, 128256)):
            x, buf = torch.randn(shape) * 3, torch.empty(shape)
            k, p = torch.full(shape[:1], top_k), torch.full(shape[:1], top_p)
            rows.append(run_case(f"top_k_top_p k={top_k} p={top_p}", shape, torch.float32, 2 * x.numel() * 4, {
                "llmkern": lambda i: top_k_top_p_(buf.copy_(x), k, p),
                "eager": lambda i: top_k_top_p_ref(x, k, p),
                "compile": filter_c and (lambda i: filter_c(x, k, p)),
            }, cfg, 1))
    temperature, top_p = 0.8, 0.95
    for shape in ((16, 8192), (16, 128256)):
        x, buf = torch.randn(shape) * 3, torch.empty(shape)
        col = lambda v, dtype=torch.float32: torch.full(shape[:1], v, dtype=dtype)  # noqa: E731
        t, k, p, min_p, u = col(temperature), col(0, torch.int64), col(top_p), col(0.0), torch.rand(shape[0])
        rows.append(run_case(f"sample_ t={temperature} p={top_p}", shape, torch.float32, 2 * x.numel() * 4, {
            "llmkern": lambda i: sample_(buf.copy_(x), t, k, p, min_p, u),
            "eager": lambda i: sample_from_probabilities(torch.softmax(top_k_top_p_ref(x / temperature, k, p), -1)),
            "compile": None,
        }, cfg, 1))
    return rows
