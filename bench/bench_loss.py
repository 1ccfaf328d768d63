"""Cross entropy of one chunk of logits with its gradient in place (cross_entropy_grad_, the loss half of
ops.linear_cross_entropy on the CPU).

The shape is one chunk of linear_cross_entropy at an 8k vocabulary: tokens / 16 rows (256 by default) x 8192 logits
(8 MiB in float32), read and written in place. Baselines run cross_entropy_grad_ref as written (logsumexp, gather,
softmax, one-hot: out of place), eager and compiled. Sets rotate beyond the LLC here, so the row shows the op from
memory; inside linear_cross_entropy the chunk comes straight from its matmul, in cache.
"""

from __future__ import annotations

import torch

from bench.harness import Config, Row, compiled, rotating_sets, run_case

VOCAB = 8192


def run(cfg: Config) -> list[Row]:
    from llmkern.ops.loss import cross_entropy_grad_, cross_entropy_grad_ref

    rows, n = [], max(1, cfg.tokens // 16)
    for dtype in (torch.float32, torch.bfloat16):
        nb = n * VOCAB * dtype.itemsize
        ref_c = compiled(cross_entropy_grad_ref, cfg)

        def make():
            t = torch.randint(0, VOCAB, (n,))
            t[::7] = -100  # some ignored positions, as padding gives
            return (4 * torch.randn(n, VOCAB)).to(dtype), t

        s = rotating_sets(make, 2 * nb, cfg)
        pick = lambda i: s[i % len(s)]
        # The op overwrites its logits with the gradient: timed calls take the previous call's gradient as logits,
        # which is as good an input (finite, of the same size) for timing.
        rows.append(run_case("cross_entropy_grad_", (n, VOCAB), dtype, 2 * nb, {
            "llmkern": lambda i: cross_entropy_grad_(*pick(i), 1 / n),
            "eager": lambda i: cross_entropy_grad_ref(*pick(i), 1 / n),
            "compile": ref_c and (lambda i: ref_c(*pick(i), 1 / n)),
        }, cfg, len(s)))
        del s
    return rows
