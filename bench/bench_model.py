"""End-to-end generation on a Llama-3.2-1B-shaped model with random weights (issue 5's benchmark).

llmkern.LLM (the serving step over a paged KV cache) against transformers' generate on the same weights
(transformers' LlamaForCausalLM built on the meta device and handed llmkern's tensors: nothing is copied or
written to disk), same threads. Rows: decode tokens/s at batch 1 and 8 (prompt 128, 128 new tokens; bf16,
then INT4 after quantizing llmkern's linears in place), prefill tokens/s at prompt 1024 (bf16). The
bandwidth bound of a decode step is the bytes it must read (every weight once: quantized linears, the
bf16 output head, plus every sequence's KV cache at the mean context length) over the read bandwidth
bench_read measures right after that row.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from bench.harness import Ceilings, Config, bandwidth

HEADER = ["case", "batch", "llmkern tok/s", "transformers tok/s", "x transformers", "llmkern ms/step",
          "bound ms/step", "% BW bound"]
LEGEND = ("Llama-3.2-1B shape (hidden 2048, 16 layers, 32 heads, 8 kv heads, intermediate 8192, vocab 128256, "
          "tied embeddings), random weights, greedy, one sequence per row of the batch. decode tok/s: batch / "
          "median time of a decode step (llmkern: between model.step calls; transformers' generate: between "
          "its streamer's token timestamps; sampling included), fewer new tokens for transformers; prefill: "
          "prompt tokens / time to the first token (one run each). bound ms/step: bytes one decode step "
          "must read (all weights once, INT4 packed + scales, the bf16 output head, KV cache of every sequence at the mean "
          "context length) / read GB/s of bench_read measured right after the row; % BW bound: bound / "
          "llmkern ms/step. INT4: llmkern.quant Int4Config (group 128) on every linear but the output head.")


def shapes(cfg: Config) -> dict:
    """Decode rows (batch, prompt, llmkern new tokens, transformers new tokens) and the prefill prompt: issue
    5's prompt 128 + 128 new tokens for llmkern; transformers' slower generate decodes 32 (its rate is the
    median step over those; the KV cache is ~1% of a step's bytes at these lengths)."""
    if cfg.quick:
        return dict(decode=[(1, 16, 8, 4), (4, 8, 6, 4)], prefill=64)
    return dict(decode=[(1, 128, 128, 32), (8, 128, 128, 32)], prefill=1024)


def model_config(cfg: Config):
    from llmkern.models import preset

    config = preset("llama-3.2-1b")
    if cfg.quick:
        config = config.with_(vocab_size=1024, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=4,
                              num_kv_heads=2, max_position_embeddings=16384)
    return config


def random_model(config, dtype=torch.bfloat16):
    """llmkern's model on random weights (linears N(0, 1/fan_in), embeddings N(0, 1), norms 1), built on the
    meta device and materialized once."""
    from llmkern.models import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 if "embed" in name else 1 / math.sqrt(p.shape[1]), generator=gen)
    return model.eval()


def transformers_twin(model):
    """transformers' LlamaForCausalLM sharing `model`'s weight tensors (state dict names are the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    dtype = model.model.embed_tokens.weight.dtype
    hf_cfg = LlamaConfig(**model.config.to_hf_dict())
    hf_cfg.dtype = dtype
    with torch.device("meta"):
        hf = LlamaForCausalLM(hf_cfg)
    hf.load_state_dict(model.state_dict(), strict=False, assign=True)
    hf.tie_weights()
    hf.model.rotary_emb = LlamaRotaryEmbedding(hf_cfg)  # its inv_freq buffer, computed on the CPU
    bad = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    assert not bad, f"transformers twin: tensors left on meta: {bad}"
    return hf.eval()


def step_bytes(model, batch: int, context: float) -> float:
    """Bytes a decode step reads: every weight tensor once (the embedding only through the tied head), and
    each sequence's K and V at `context` tokens."""
    from llmkern.models.serving import kv_block_bytes

    weights = sum(t.nbytes for n, t in [*model.named_parameters(), *model.named_buffers()]
                  if n not in ("rope_cache", "alibi_slopes"))
    return weights + batch * context * kv_block_bytes(model, 1)


def llmkern_decode(llm, prompts, new: int) -> float:
    """Median seconds of one decode step (the interval between consecutive model.step calls, sampling and
    detokenizing included, as transformers' streamer timestamps include them) in one batched generate.
    Medians, not means: on a shared machine one descheduled step can last several normal ones."""
    from llmkern.generation import SamplingParams

    starts, step = [], llm.model.step

    def timed_step(*args):
        starts.append(time.perf_counter())
        return step(*args)

    llm.model.step = timed_step  # an instance attribute shadowing the method, removed below
    try:
        outs = llm.generate(None, SamplingParams(temperature=0.0, max_tokens=new, ignore_eos=True),
                            prompt_token_ids=prompts)
        end = time.perf_counter()
    finally:
        del llm.model.step
    assert all(o.num_generated_tokens == new for o in outs)
    decode = starts[-(new - 1):] + [end]  # the last new - 1 steps are the decode steps
    return statistics.median(b - a for a, b in zip(decode, decode[1:]))


def hf_generate(hf, prompts, new: int) -> list[float]:
    """Times of one transformers generate: [start, prompt handed over, each new token (batch) out]."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):  # generate calls put() with the prompt, then with each step's tokens
        def __init__(self):
            self.times = [time.perf_counter()]

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    ids, clock = torch.tensor(prompts), Clock()
    with torch.inference_mode():
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, eos_token_id=None, pad_token_id=0, streamer=clock)
    assert len(clock.times) == new + 2, "transformers' generate did not stream every step"
    return clock.times


def run(cfg: Config, ceilings: Ceilings | None = None) -> list[list[str]]:
    from llmkern.generation import SamplingParams
    from llmkern.llm import LLM
    from llmkern.quant import Int4Config, quantize_

    s = shapes(cfg)
    t0 = time.perf_counter()
    model = random_model(model_config(cfg))
    hf = transformers_twin(model)
    llm = LLM.from_model(model)
    print(f"  built the model and its transformers twin in {time.perf_counter() - t0:.0f} s", flush=True)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size

    def prompts(batch, n):
        return torch.randint(0, vocab, (batch, n), generator=gen).tolist()

    rows = []

    def decode_row(dtype: str, batch: int, prompt: int, new: int, hf_new: int | None):
        step_s = llmkern_decode(llm, prompts(batch, prompt), new)
        rate, hf_rate = batch / step_s, None
        if hf_new:
            times = hf_generate(hf, prompts(batch, prompt), hf_new)[2:]  # the decode steps' tokens
            hf_rate = batch / statistics.median(b - a for a, b in zip(times, times[1:]))
        read_gbps = bandwidth(cfg.ceiling_bytes, cfg)[1]
        bound_s = step_bytes(model, batch, prompt + new / 2) / (read_gbps * 1e9)
        print(f"  decode {dtype} batch {batch}: llmkern {rate:.2f} tok/s" +
              (f", transformers {hf_rate:.2f} tok/s" if hf_rate else "") + f", read {read_gbps:.1f} GB/s", flush=True)
        rows.append([f"decode {dtype}, prompt {prompt}, {new} new", str(batch), f"{rate:.2f}",
                     f"{hf_rate:.2f}" if hf_rate else "-", f"{rate / hf_rate:.2f}" if hf_rate else "-",
                     f"{step_s * 1e3:.1f}", f"{bound_s * 1e3:.1f}", f"{100 * bound_s / step_s:.0f}"])

    llmkern_decode(llm, prompts(1, 8), 3)  # warm-up (first calls allocate, pick kernels)
    hf_generate(hf, prompts(1, 8), 2)
    for batch, prompt, new, hf_new in s["decode"]:
        decode_row("bf16", batch, prompt, new, hf_new)
    p = prompts(1, s["prefill"])
    lk_prefill = llm.generate(None, SamplingParams(temperature=0.0, max_tokens=1), prompt_token_ids=p)[0].prefill_s
    times = hf_generate(hf, p, 1)
    hf_prefill = times[-1] - times[0]  # prompt in, first token out, as llmkern's prefill_s
    rows.append([f"prefill bf16, prompt {s['prefill']}", "1", f"{s['prefill'] / lk_prefill:.1f}",
                 f"{s['prefill'] / hf_prefill:.1f}", f"{hf_prefill / lk_prefill:.2f}", "-", "-", "-"])
    print(f"  prefill {s['prefill']}: llmkern {lk_prefill:.2f} s, transformers {hf_prefill:.2f} s", flush=True)
    del hf
    quantize_(model, Int4Config())
    llmkern_decode(llm, prompts(1, 8), 3)
    for batch, prompt, new, _ in s["decode"]:
        decode_row("int4", batch, prompt, new, None)
    print(f"  bench_model: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows
