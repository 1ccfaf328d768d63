"""Measure a trained demo pair and ship it: `python -m llmkern.train.demo --target RUN --draft RUN --dest DIR`.

For the target and draft runs of `llmkern train pretrain` (their exported model/ directories), this measures
- the held-out loss over the whole validation split, and the unigram baseline on the same tokens;
- the held-out loss on a small fixed sample, written next to the model (heldout_sample.jsonl), which the tests
  recompute;
- how often the draft's greedy next token equals the target's over the held-out positions (the acceptance rate a
  greedy speculative decoder can expect);
- greedy continuations of a few prompts;
then copies each model/ to DEST/<name>/ with the sample and a model card (README.md) stating all of it.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
from pathlib import Path

import torch

from llmkern.models import load_model
from llmkern.train.config import PretrainConfig
from llmkern.train.data import PackedStream, encode_documents, read_texts, split_files, stdlib_files, unigram_loss
from llmkern.train.pretrain import evaluate

PROMPTS = ("def fibonacci(n):", "import os\n")
SAMPLE_TOKENS = 8192  # the shipped held-out sample


def sample_batches(texts: list[str], tokenizer, cfg: PretrainConfig, tokens: int | None = None) -> list:
    """Packed batches over `texts` in order (no shuffle): all of them, or the first `tokens` tokens."""
    docs = encode_documents(tokenizer, texts)
    total = sum(len(d) for d in docs) if tokens is None else tokens
    stream = PackedStream(docs, min(cfg.micro_batch_tokens, total), cfg.seq_len, seed=0, shuffle=False)
    return [next(stream) for _ in range(total // stream.tokens)]


@torch.inference_mode()
def greedy_agreement(target, draft, batches) -> float:
    """Fraction of scored positions where both models' argmax next tokens are equal."""
    same = n = 0
    for b in batches:
        keep = b.targets() != -100  # a piece's last token is not scored
        t = target(b.input_ids, cu_seqlens=b.cu_seqlens).logits[0, keep].argmax(-1)
        d = draft(b.input_ids, cu_seqlens=b.cu_seqlens).logits[0, keep].argmax(-1)
        same, n = same + int((t == d).sum()), n + t.numel()
    return same / n


def greedy_continuation(model_dir: Path, prompt: str, max_tokens: int = 64) -> str:
    from llmkern.generation import SamplingParams
    from llmkern.llm import LLM

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    return LLM(model_dir).generate(prompt, params)[0].text  # the checkpoint's dtype, as `llmkern generate` runs it


class Run:
    """A finished pretraining run: its summary, config, tokenizer, and exported model (evaluated in float32)."""

    def __init__(self, directory: str | Path):
        from tokenizers import Tokenizer

        self.dir = Path(directory)
        self.summary = json.loads((self.dir / "summary.json").read_text())
        self.cfg = PretrainConfig(**{**self.summary["config"], "model": load_model(self.dir / "model").config,
                                     "betas": tuple(self.summary["config"]["betas"])})
        self.tokenizer = Tokenizer.from_file(str(self.dir / "model" / "tokenizer.json"))
        self.model = load_model(self.dir / "model", dtype=torch.float32)


def measure(target: Run, draft: Run) -> dict:
    cfg = target.cfg
    train_files, val_files = split_files(stdlib_files()[: cfg.max_files], cfg.val_every)
    val_texts = read_texts(val_files)
    val = sample_batches(val_texts, target.tokenizer, cfg)
    train_docs = encode_documents(target.tokenizer, read_texts(train_files))
    sample_texts = _sample_texts(val_texts, target.tokenizer)
    sample = sample_batches(sample_texts, target.tokenizer, cfg, SAMPLE_TOKENS)
    m = {"python": platform.python_version(), "train_files": len(train_files), "val_files": len(val_files),
         "train_tokens": int(sum(len(d) for d in train_docs)), "val_tokens": sum(b.input_ids.numel() for b in val),
         "unigram_loss": unigram_loss(train_docs, val, cfg.model.vocab_size), "sample_texts": sample_texts,
         "agreement": greedy_agreement(target.model, draft.model, val)}
    for name, run in (("target", target), ("draft", draft)):
        m[name] = {"val_loss": evaluate(run.model, val), "sample_loss": evaluate(run.model, sample),
                   "continuations": {p: greedy_continuation(run.dir / "model", p) for p in PROMPTS}}
    return m


def _sample_texts(val_texts: list[str], tokenizer) -> list[str]:
    """The first validation files (sorted order) that together hold SAMPLE_TOKENS tokens."""
    out, n = [], 0
    for text in val_texts:
        out.append(text)
        n += len(tokenizer.encode(text).ids) + 1
        if n >= SAMPLE_TOKENS:
            return out
    raise ValueError(f"the validation split has fewer than {SAMPLE_TOKENS} tokens")


def model_card(name: str, run: Run, other: str, m: dict) -> str:
    c, s, me = run.cfg.model, run.summary, m["target" if name == "demo-target" else "draft"]
    params = sum(p.numel() for p in run.model.parameters())
    tokenizer_arg = "" if name == "demo-target" else " --tokenizer runs/demo-target/tokenizer"
    samples = "\n".join(f"Prompt `{p!r}`:\n\n```python\n{p}{text}\n```\n" for p, text in me["continuations"].items())
    return f"""---
license: mit
library_name: llmkern
tags: [llmkern, llama, python, code, demo]
---

# {name}

llmkern's built-in {"target" if name == "demo-target" else "draft"} model: a Llama-architecture Python code model
trained by llmkern itself on the Python standard library, so that `llmkern generate` and `llmkern serve` work offline
out of the box. Its speculative-decoding partner is `{other}` (same tokenizer). It is a demo: it writes
Python-looking code, not correct programs.

## Model

| | |
|---|---|
| parameters | {params / 1e6:.2f} M ({"embeddings tied with the output head" if c.tie_word_embeddings
                                       else "input embeddings and output head untied"}) |
| layers, hidden, intermediate | {c.num_layers}, {c.hidden_size}, {c.intermediate_size} (SwiGLU) |
| heads, kv heads, head dim | {c.num_heads}, {c.num_kv_heads}, {c.head_dim} (RoPE theta {c.rope_theta:g}) |
| context | {c.max_position_embeddings} positions (trained on pieces of up to {run.cfg.seq_len} tokens) |
| vocabulary | {c.vocab_size}: byte-level BPE trained on the training split, with `<|pad|>` `<|bos|>` `<|eos|>` |
| weights | bfloat16 safetensors |

## Training

- Corpus: the `.py` files of the Python {m['python']} standard library (site-packages excluded), sorted; every
  {run.cfg.val_every}th file held out: {m['train_files']} training files ({m['train_tokens']:,} tokens), {m['val_files']}
  validation files ({m['val_tokens']:,} tokens). Documents are packed into varlen batches of
  {run.cfg.micro_batch_tokens} tokens.
- Command (from the repository root; `make demo-models` runs all three):

  ```
  llmkern train pretrain --preset {name} --out runs/{name}{tokenizer_arg}
  python -m llmkern.train.demo --target runs/demo-target --draft runs/demo-draft --dest llmkern/models/demo
  ```
- {s['steps']} AdamW steps (lr {run.cfg.lr:g}, warm-up {run.cfg.warmup_steps}, cosine to {run.cfg.min_lr_ratio:g}x,
  weight decay {run.cfg.weight_decay:g}, clip {run.cfg.grad_clip:g}), {s['tokens']:,} tokens, fp32, in
  {s['train_seconds'] / 60:.1f} min of training steps on {s['threads']} threads of the dev machine (a 2-vCPU Xeon VM
  shared with other work); the loss-spike guard skipped {s['spikes']} steps and rolled back {s['rollbacks']} times.

## Results (measured by `python -m llmkern.train.demo`)

| held-out loss (nats/token) | value |
|---|---|
| this model, whole validation split | {me['val_loss']:.4f} (perplexity {math.exp(me['val_loss']):.1f}) |
| unigram baseline, same tokens | {m['unigram_loss']:.4f} (perplexity {math.exp(m['unigram_loss']):.1f}) |
| this model, `heldout_sample.jsonl` ({SAMPLE_TOKENS} tokens; the tests recompute it) | {me['sample_loss']:.4f} |

The draft's greedy next token equals the target's at **{100 * m['agreement']:.1f}%** of the held-out positions
(the acceptance rate greedy speculative decoding can expect per drafted token).

Greedy continuations (64 new tokens, bfloat16, as `llmkern generate --temperature 0` writes them):

{samples}
Without `--temperature`, `llmkern generate` samples with this checkpoint's generation_config.json:
{", ".join(f"{k} {v}" for k, v in RECOMMENDED_SAMPLING.items())}.
"""


# What `llmkern generate` / `llmkern serve` use when a request sets nothing: greedy decoding of models this small
# falls into loops, so the demo recommends sampling (as most Hub checkpoints do in generation_config.json).
RECOMMENDED_SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.2}


def ship(run: Run, name: str, other: str, m: dict, dest: Path) -> None:
    out = dest / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(run.dir / "model", out)
    gen = json.loads((out / "generation_config.json").read_text())
    (out / "generation_config.json").write_text(json.dumps({**gen, **RECOMMENDED_SAMPLING}, indent=2) + "\n")
    with (out / "heldout_sample.jsonl").open("w") as f:
        for text in m["sample_texts"]:
            f.write(json.dumps({"text": text}) + "\n")
    (out / "README.md").write_text(model_card(name, run, other, m))
    results = {k: v for k, v in m.items() if k not in ("sample_texts", "target", "draft")}
    results.update(m["target" if name == "demo-target" else "draft"])
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llmkern.train.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True, metavar="RUN")
    ap.add_argument("--draft", required=True, metavar="RUN")
    ap.add_argument("--dest", required=True, metavar="DIR")
    args = ap.parse_args(argv)
    target, draft = Run(args.target), Run(args.draft)
    m = measure(target, draft)
    for run, name, other in ((target, "demo-target", "demo-draft"), (draft, "demo-draft", "demo-target")):
        ship(run, name, other, m, Path(args.dest))
    print(json.dumps({k: v for k, v in m.items() if k != "sample_texts"}, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
