"""RMSNorm: forward into a preallocated out, in-place fused residual add + norm, and backward.

Baselines run rms_norm_ref / fused_add_rms_norm_ref as written (out of place), eager and compiled; the
backward baselines are autograd through those refs (dx and dweight, like llmkern's rms_norm_bwd).
"""

from __future__ import annotations

import torch

from bench.harness import Config, Row, compiled, rotating_sets, run_case

HIDDEN = 4096
EPS = 1e-6


def run(cfg: Config) -> list[Row]:
    from llmkern.ops.norm import fused_add_rms_norm_, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

    lk = torch.ops.llmkern
    shape = (cfg.tokens, HIDDEN)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        nb = cfg.tokens * HIDDEN * dtype.itemsize  # one [tokens, hidden] tensor
        w = torch.randn(HIDDEN, dtype=dtype)
        ref_c = compiled(rms_norm_ref, cfg)
        fused_c = compiled(fused_add_rms_norm_ref, cfg)

        # forward: read x, write out
        s = rotating_sets(lambda: (torch.randn(shape, dtype=dtype), torch.empty(shape, dtype=dtype)), 2 * nb, cfg)
        pick = lambda i: s[i % len(s)]
        rows.append(run_case("rms_norm", shape, dtype, 2 * nb, {
            "llmkern": lambda i: rms_norm(pick(i)[0], w, EPS, out=pick(i)[1]),
            "eager": lambda i: rms_norm_ref(pick(i)[0], w, EPS),
            "compile": ref_c and (lambda i: ref_c(pick(i)[0], w, EPS)),
        }, cfg, len(s)))
        del s

        # fused add + norm in place: read x, residual; write x, residual
        s = rotating_sets(lambda: (torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)), 2 * nb, cfg)
        rows.append(run_case("fused_add_rms_norm_", shape, dtype, 4 * nb, {
            "llmkern": lambda i: fused_add_rms_norm_(*pick(i), w, EPS),
            "eager": lambda i: fused_add_rms_norm_ref(*pick(i), w, EPS),
            "compile": fused_c and (lambda i: fused_c(*pick(i), w, EPS)),
        }, cfg, len(s)))
        del s

        # backward: read dy, x (+ rstd), write dx; the baselines' graphs are built once per set, untimed.
        def make_bwd():
            x = torch.randn(shape, dtype=dtype)
            rstd = lk.rms_norm(x, w, EPS, False)[1]
            xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
            graphs = {"eager": rms_norm_ref(xg, wg, EPS)}
            if ref_c:
                graphs["compile"] = ref_c(xg, wg, EPS)
            dx, dw = torch.zeros(shape, dtype=dtype), torch.zeros(HIDDEN, dtype=dtype)  # preallocated, touched
            return torch.randn(shape, dtype=dtype), x, rstd, xg, wg, graphs, dx, dw

        s = rotating_sets(make_bwd, 3 * nb, cfg)

        def autograd(kind):
            def f(i):
                dy, _, _, xg, wg, graphs = pick(i)[:6]
                return torch.autograd.grad(graphs[kind], (xg, wg), dy, retain_graph=True)
            return f

        def bwd_out(i):
            dy, x, rstd, *_, dx, dw = pick(i)
            lk.rms_norm_bwd_out(dx, dw, dy, x, w, rstd, False, None)

        bwd_bytes = 3 * nb + cfg.tokens * 4
        rows.append(run_case("rms_norm bwd", shape, dtype, bwd_bytes, {
            "llmkern": bwd_out,
            "eager": autograd("eager"),
            "compile": ref_c and autograd("compile"),
        }, cfg, len(s)))
        # The functional backward (what autograd calls) allocates dx: on these VMs first-touch page faults
        # of a fresh 64 MiB tensor cost more than moving the data, so show that cost on its own row.
        rows.append(run_case("rms_norm bwd +alloc", shape, dtype, bwd_bytes, {
            "llmkern": lambda i: lk.rms_norm_bwd(pick(i)[0], pick(i)[1], w, pick(i)[2], False, None),
        }, cfg, len(s)))
        del s
    return rows
