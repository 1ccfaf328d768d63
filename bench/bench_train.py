"""Training throughput of the demo-target model: llmkern's model against transformers' LlamaForCausalLM of the
same config (issue 6's benchmark).

Both start from the same weights (llmkern's init, copied) and train on the same batches of token ids with the
same step: forward, mean token loss, backward, gradient clipping at 1.0, AdamW (lr 1e-4, so neither diverges).
llmkern computes the loss as its trainer does, without storing logits (ops.linear_cross_entropy). Two cases: fp32
(the preset's default) and the trainer's `--bf16` (bf16 autocast of the forward, weights and optimizer in fp32), the
latter run under the same autocast on both sides.
Their steps alternate, so machine noise hits both alike; tokens/s is batch tokens / median step time. Peak memory
is measured in a fresh process per implementation: the rise of peak RSS over the RSS after the model, optimizer
and batch exist (activations, gradients, optimizer state, allocator slack), and the peak RSS itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.harness import Ceilings, Config, measure

HEADER = ["case", "tokens/step", "llmkern tok/s", "transformers tok/s", "x transformers", "llmkern ms/step",
          "transformers ms/step", "llmkern peak MiB (+train)", "transformers peak MiB (+train)"]
LEGEND = ("demo-target preset (llama, hidden 320, 4 layers, 5 heads, 1 kv head, intermediate 864, vocab 8192, untied "
          "embeddings: 9.55M parameters), fp32 and under bf16 autocast (the trainer's --bf16: the forward in bf16, "
          "weights and AdamW in fp32, on both sides), batch of 16 sequences x 512 random token ids. "
          "A step: forward + mean loss (llmkern: "
          "fused head + cross entropy, no logits stored) + backward + "
          "clip_grad_norm_(1.0) + AdamW + zero_grad; median of alternating steps after 2 warm-up steps each. "
          "transformers: LlamaForCausalLM (its default sdpa attention) with llmkern's initial weights. Peak MiB: "
          "peak RSS of a fresh process running 3 steps; (+train): its rise over the RSS before the first step.")


def shapes(cfg: Config) -> dict:
    return dict(preset="tiny-test", batch=4, seq=64, steps=3) if cfg.quick else \
        dict(preset="demo-target", batch=16, seq=512, steps=5)


def build(impl: str, cfg: Config):
    """(model, optimizer, input_ids) for "llmkern" or "transformers", identical weights and batch for both."""
    from llmkern.models import LlamaForCausalLM
    from llmkern.train import preset

    s = shapes(cfg)
    config = preset(s["preset"]).model
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.init_weights()
    if impl == "transformers":
        from transformers import LlamaConfig
        from transformers import LlamaForCausalLM as HFLlama

        hf = HFLlama(LlamaConfig(**config.to_hf_dict()))
        hf.load_state_dict(model.state_dict())
        model = hf
    model.train()
    ids = torch.randint(0, config.vocab_size, (s["batch"], s["seq"]), generator=torch.Generator().manual_seed(1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4), ids


def train_step(model, optimizer, ids, bf16: bool = False) -> float:
    # llmkern's trainer asks for the loss without logits (ops.linear_cross_entropy); transformers has no such option
    fused = {"return_logits": False} if model.__module__.startswith("llmkern") else {}
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):  # as the trainer's --bf16 runs its forward
        loss = model(ids, labels=ids, **fused).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def _status_mib(field: str) -> float:
    """VmRSS (resident now) or VmHWM (peak resident) of this process from /proc/self/status, in MiB. (Not
    getrusage's ru_maxrss: it survives exec, so a fresh process would report its parent's peak.)"""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def peak_memory(impl: str, quick: bool, bf16: bool) -> dict:
    """Run in a fresh process (`python -m bench.bench_train IMPL [--quick] [--bf16]`): peak RSS over 3 steps, in MiB."""
    setup = build(impl, Config.quick_config() if quick else Config())
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the current RSS (Linux >= 4.0)
    for _ in range(3):
        train_step(*setup, bf16=bf16)
    peak = _status_mib("VmHWM")
    return {"peak_mib": peak, "train_mib": peak - before}


def measure_peak(impl: str, cfg: Config, bf16: bool) -> dict:
    cmd = [sys.executable, "-m", "bench.bench_train", impl] + (["--quick"] if cfg.quick else []) + \
        (["--bf16"] if bf16 else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.splitlines()[-1])


def run(cfg: Config, ceilings: Ceilings | None = None) -> list[list[str]]:
    return [case_row(cfg, bf16) for bf16 in (False, True)]


def case_row(cfg: Config, bf16: bool) -> list[str]:
    s = shapes(cfg)
    t0 = time.perf_counter()
    setups = {impl: build(impl, cfg) for impl in ("llmkern", "transformers")}
    timings = measure({impl: lambda i, setup=setup: train_step(*setup, bf16=bf16) for impl, setup in setups.items()},
                      reps=s["steps"], warmup=2)
    del setups
    step = {impl: t.median_s for impl, t in timings.items()}
    mem = {impl: measure_peak(impl, cfg, bf16) for impl in step}
    tokens = s["batch"] * s["seq"]
    case = f"train {s['preset']} {'bf16 autocast' if bf16 else 'fp32'}"
    print(f"  {case}: llmkern {step['llmkern'] * 1e3:.0f} ms, transformers {step['transformers'] * 1e3:.0f} ms; "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return [case, str(tokens), f"{tokens / step['llmkern']:.0f}",
            f"{tokens / step['transformers']:.0f}", f"{step['transformers'] / step['llmkern']:.2f}",
            f"{step['llmkern'] * 1e3:.0f}", f"{step['transformers'] * 1e3:.0f}",
            *(f"{mem[i]['peak_mib']:.0f} (+{mem[i]['train_mib']:.0f})" for i in ("llmkern", "transformers"))]


if __name__ == "__main__":
    print(json.dumps(peak_memory(sys.argv[1], "--quick" in sys.argv, "--bf16" in sys.argv)))
