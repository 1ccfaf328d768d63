"""SwiGLU: silu_and_mul forward into a preallocated out ([tokens, 2d] -> [tokens, d], Llama-7B's
d = 11008) and its backward (dx [tokens, 2d]). Baselines: act_and_mul_ref eager and compiled, and
autograd through it for the backward."""

from __future__ import annotations

import torch

from bench.harness import Config, Row, compiled, rotating_sets, run_case

D = 11008


def run(cfg: Config) -> list[Row]:
    from llmkern.ops.activation import act_and_mul_ref, silu_and_mul

    lk = torch.ops.llmkern
    ref = lambda x: act_and_mul_ref(x, "silu")
    shape_in, shape_out = (cfg.tokens, 2 * D), (cfg.tokens, D)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        nb = cfg.tokens * D * dtype.itemsize  # one [tokens, d] tensor
        ref_c = compiled(ref, cfg)

        # forward: read x [2d], write out [d]
        s = rotating_sets(lambda: (torch.randn(shape_in, dtype=dtype), torch.empty(shape_out, dtype=dtype)), 3 * nb, cfg)
        pick = lambda i: s[i % len(s)]
        rows.append(run_case("silu_and_mul", shape_in, dtype, 3 * nb, {
            "llmkern": lambda i: silu_and_mul(pick(i)[0], out=pick(i)[1]),
            "eager": lambda i: ref(pick(i)[0]),
            "compile": ref_c and (lambda i: ref_c(pick(i)[0])),
        }, cfg, len(s)))
        del s

        # backward: read dy [d], x [2d], write dx [2d]; baseline graphs built once per set, untimed.
        def make_bwd():
            x = torch.randn(shape_in, dtype=dtype)
            xg = x.clone().requires_grad_()
            graphs = {"eager": ref(xg)}
            if ref_c:
                graphs["compile"] = ref_c(xg)
            return torch.randn(shape_out, dtype=dtype), x, xg, graphs, torch.zeros(shape_in, dtype=dtype)

        s = rotating_sets(make_bwd, 5 * nb, cfg)
        autograd = lambda kind: lambda i: torch.autograd.grad(pick(i)[3][kind], pick(i)[2], pick(i)[0], retain_graph=True)
        rows.append(run_case("silu_and_mul bwd", shape_in, dtype, 5 * nb, {
            "llmkern": lambda i: lk.act_and_mul_bwd_out(pick(i)[4], pick(i)[0], pick(i)[1], "silu"),
            "eager": autograd("eager"),
            "compile": ref_c and autograd("compile"),
        }, cfg, len(s)))
        # The functional backward (what autograd calls) allocates dx; its first-touch page faults on its own row.
        rows.append(run_case("silu_and_mul bwd +alloc", shape_in, dtype, 5 * nb, {
            "llmkern": lambda i: lk.act_and_mul_bwd(pick(i)[0], pick(i)[1], "silu"),
        }, cfg, len(s)))
        del s
    return rows
