"""RoPE (NeoX) at Llama-3-8B-like shapes: query [tokens, 32, 128], key [tokens, 8, 128], positions
0..tokens-1. Forward: rotary_embedding_ in place on both; backward: the inverse rotation
(rotary_embedding(..., inverse=True)) of dq and dk. Baselines: rotary_embedding_ref on q and k (out of
place) eager and compiled, and autograd through it for the backward."""

from __future__ import annotations

import torch

from bench.harness import Config, Row, compiled, rotating_sets, run_case

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def run(cfg: Config) -> list[Row]:
    from llmkern.ops.rope import rope_cos_sin_cache, rotary_embedding_, rotary_embedding_ref

    lk = torch.ops.llmkern
    t = cfg.tokens
    pos = torch.arange(t)
    cache = rope_cos_sin_cache(HEAD_DIM, max(t, 8192))

    def ref(q, k):
        return rotary_embedding_ref(q, pos, cache, True), rotary_embedding_ref(k, pos, cache, True)

    shape = f"{t}x({Q_HEADS}+{KV_HEADS})x{HEAD_DIM}"
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        qk_bytes = t * (Q_HEADS + KV_HEADS) * HEAD_DIM * dtype.itemsize
        nbytes = 2 * qk_bytes + t * HEAD_DIM * cache.itemsize  # read + write q, k; the cache rows used
        ref_c = compiled(ref, cfg)
        make_qk = lambda: (torch.randn(t, Q_HEADS, HEAD_DIM, dtype=dtype), torch.randn(t, KV_HEADS, HEAD_DIM, dtype=dtype))

        s = rotating_sets(make_qk, qk_bytes, cfg)
        pick = lambda i: s[i % len(s)]
        rows.append(run_case("rotary_embedding_", shape, dtype, nbytes, {
            "llmkern": lambda i: rotary_embedding_(pos, *pick(i), cache, is_neox=True),
            "eager": lambda i: ref(*pick(i)),
            "compile": ref_c and (lambda i: ref_c(*pick(i))),
        }, cfg, len(s)))
        del s

        # backward: dq, dk rotated back; baseline graphs built once per set, untimed.
        def make_bwd():
            dq, dk = make_qk()
            qg, kg = (v.requires_grad_() for v in make_qk())
            graphs = {"eager": ref(qg, kg)}
            if ref_c:
                graphs["compile"] = ref_c(qg, kg)
            return dq, dk, qg, kg, graphs, *(torch.zeros_like(t) for t in (dq, dk))

        s = rotating_sets(make_bwd, 2 * qk_bytes, cfg)

        def autograd(kind):
            def f(i):
                dq, dk, qg, kg, graphs = pick(i)[:5]
                return torch.autograd.grad(graphs[kind], (qg, kg), (dq, dk), retain_graph=True)
            return f

        def llmkern_bwd(i):
            dq, dk, *_, gq, gk = pick(i)
            lk.rotary_embedding_out(gq, pos, dq, cache, True, True)
            lk.rotary_embedding_out(gk, pos, dk, cache, True, True)

        def llmkern_bwd_alloc(i):
            dq, dk = pick(i)[:2]
            return lk.rotary_embedding(pos, dq, cache, True, True), lk.rotary_embedding(pos, dk, cache, True, True)

        rows.append(run_case("rotary_embedding bwd", shape, dtype, nbytes, {
            "llmkern": llmkern_bwd,
            "eager": autograd("eager"),
            "compile": ref_c and autograd("compile"),
        }, cfg, len(s)))
        # The functional op (what autograd calls) allocates its output; its first-touch page faults on their own row.
        rows.append(run_case("rotary_embedding bwd +alloc", shape, dtype, nbytes, {"llmkern": llmkern_bwd_alloc},
                             cfg, len(s)))
        del s
    return rows
