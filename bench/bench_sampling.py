"""Greedy token selection (ops.argmax) on a decode step's logits: 1 and 16 rows of an 8k (the demo models) and a
128k (Llama 3) vocabulary. The logits were just written by the output head, so the rows are timed from cache (one
set, reused); baselines are torch.argmax(x, -1), eager and compiled.
"""

from __future__ import annotations

import torch

from bench.harness import Config, Row, compiled, run_case


def run(cfg: Config) -> list[Row]:
    from llmkern.ops.sampling import argmax, argmax_ref

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
    return rows
