"""Single-process pretraining of a llmkern model on the standard-library corpus (`llmkern train pretrain`).

    llmkern train pretrain --preset demo-target --out runs/demo-target
    llmkern train pretrain --preset demo-target --out runs/demo-target --resume      # after an interruption

OUT holds tokenizer/ (trained on the first run unless --tokenizer names one), log.jsonl (a row per step, per
evaluation and per guard event), checkpoint/ (model in Hugging Face format + state.pt: optimizer, step, data
position, guard, RNG; written every checkpoint_every steps, replaced atomically) and, at the end, model/ (bf16
Hugging Face checkpoint with tokenizer and generation_config.json) and summary.json.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from collections import deque
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from tqdm import tqdm

from llmkern.models import LlamaForCausalLM, save_pretrained
from llmkern.models.checkpoint import SINGLE_FILE
from llmkern.train.config import PretrainConfig, preset
from llmkern.train.data import (BOS, EOS, PAD, PackedStream, encode_documents, read_texts, save_tokenizer,
                                split_files, stdlib_files, train_tokenizer, unigram_loss)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.is_file() else None


class SpikeGuard:
    """Skips a step whose loss is not finite or exceeds `factor` x the mean of the last `window` accepted losses
    (checked once `window` are in); `max_spikes` skips in a row ask for a rollback to the last checkpoint."""

    def __init__(self, factor: float, window: int, max_spikes: int):
        self.factor, self.max_spikes = factor, max_spikes
        self.history: deque[float] = deque(maxlen=window)
        self.consecutive = 0

    def check(self, loss: float) -> str:
        """"ok" (the caller steps), "skip" or "rollback"."""
        full = len(self.history) == self.history.maxlen
        if math.isfinite(loss) and not (full and loss > self.factor * self.running_mean):
            self.history.append(loss)
            self.consecutive = 0
            return "ok"
        self.consecutive += 1
        return "rollback" if self.consecutive >= self.max_spikes else "skip"

    @property
    def running_mean(self) -> float:
        return sum(self.history) / max(len(self.history), 1)

    def state_dict(self) -> dict:
        return {"history": list(self.history), "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.history.clear()
        self.history.extend(state["history"])
        self.consecutive = state["consecutive"]


def lr_at(cfg: PretrainConfig, step: int) -> float:
    """Linear warm-up over warmup_steps, then cosine decay to min_lr_ratio * lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.inference_mode()
def evaluate(model: LlamaForCausalLM, batches, bf16: bool = False) -> float:
    """Mean loss (nats) per target token over packed batches."""
    total, n = 0.0, 0
    for b in batches:
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = model(b.input_ids, labels=b.input_ids, cu_seqlens=b.cu_seqlens, num_items_in_batch=1,
                        return_logits=False)
        total, n = total + out.loss.item(), n + b.num_targets
    return total / n


def eval_batches(documents, cfg: PretrainConfig) -> list:
    """The fixed held-out sample: the first eval_tokens of the validation documents in seeded order."""
    stream = PackedStream(documents, cfg.micro_batch_tokens, cfg.seq_len, cfg.seed)
    return [next(stream) for _ in range(-(-cfg.eval_tokens // cfg.micro_batch_tokens))]


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, out_dir: str | Path, tokenizer_dir: str | Path | None = None,
                 resume: bool = False, corpus_root: str | Path | None = None):
        self.cfg, self.out = cfg, Path(out_dir)
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out: {self.out} is a file, not a run directory")
        self._restore_interrupted_save()
        if not resume and (self.out / "checkpoint").exists():
            raise ValueError(f"{self.out} already holds a run's checkpoint: pass --resume (resume=True) to continue "
                             "it, or choose another output directory")
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        files = stdlib_files(corpus_root)[: cfg.max_files]
        train_files, val_files = split_files(files, cfg.val_every)
        self.tokenizer = self._tokenizer(tokenizer_dir, train_files, resume)
        self.train_docs = encode_documents(self.tokenizer, read_texts(train_files))
        self.eval_batches = eval_batches(encode_documents(self.tokenizer, read_texts(val_files)), cfg)
        self.stream = PackedStream(self.train_docs, cfg.micro_batch_tokens, cfg.seq_len, cfg.seed)
        self.model = LlamaForCausalLM(cfg.model)
        self.model.init_weights()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]  # matrices and embeddings; not norm gains
        keep = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": keep, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas)
        self.guard = SpikeGuard(cfg.spike_factor, cfg.spike_window, cfg.max_spikes)
        self.step, self.elapsed = 0, 0.0
        self.log_file = self.out / "log.jsonl"
        if resume:
            self._truncate_log(self._load_checkpoint(check_config=True))
        else:
            self.log_file.unlink(missing_ok=True)
            self._save_checkpoint()  # a rollback target from the start

    # ---- tokenizer ----
    def _tokenizer(self, tokenizer_dir, train_files, resume: bool) -> Tokenizer:
        """The given tokenizer, the run's own (a resume), or a new one trained on the training split."""
        own = self.out / "tokenizer"
        source = Path(tokenizer_dir) if tokenizer_dir is not None else own
        if resume and (own / "tokenizer.json").is_file():  # a resumed run keeps the token ids it was trained on
            if source != own and any(_read_or_none(source / n) != _read_or_none(own / n) for n in TOKENIZER_FILES):
                raise ValueError(f"--tokenizer: {source} is not the run's tokenizer ({own}); a resumed run keeps its "
                                 "own (omit --tokenizer)")
            source = own
        if not (source / "tokenizer.json").is_file():
            if tokenizer_dir is not None:
                raise FileNotFoundError(f"--tokenizer: {source / 'tokenizer.json'} does not exist")
            save_tokenizer(train_tokenizer(read_texts(train_files), self.cfg.model.vocab_size), own,
                           self.cfg.model.max_position_embeddings)
        elif source != own:
            own.mkdir(exist_ok=True)
            for name in TOKENIZER_FILES:
                shutil.copy(source / name, own / name)
        tok = Tokenizer.from_file(str(own / "tokenizer.json"))
        if tok.get_vocab_size() > self.cfg.model.vocab_size or tok.token_to_id(EOS) is None:
            raise ValueError(f"{own}: the tokenizer has {tok.get_vocab_size()} tokens (model vocab_size "
                             f"{self.cfg.model.vocab_size}) and needs {BOS}, {EOS}, {PAD}")
        return tok

    # ---- the loop ----
    def train(self, progress: bool = True) -> dict:
        cfg = self.cfg
        if self.step == 0:
            self._log(step=0, val_loss=self.evaluate(), unigram_loss=self.unigram_loss())
        bar = tqdm(total=cfg.max_steps, initial=self.step, unit="step", disable=not progress, dynamic_ncols=True)
        while self.step < cfg.max_steps:
            t0 = time.perf_counter()
            lr = lr_at(cfg, self.step)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss, tokens = self.forward_backward()
            verdict = self.guard.check(loss)
            grad_norm = None
            if verdict == "ok":
                grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip))
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.elapsed += time.perf_counter() - t0
            if verdict != "ok":
                self._log(step=self.step, event="spike", loss=loss, running_mean=self.guard.running_mean,
                          data_position=self.stream.position)
                if verdict == "rollback":
                    self._rollback()
                continue
            self.step += 1
            tokens_per_s = tokens / (time.perf_counter() - t0)
            self._log(step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, tokens_per_s=round(tokens_per_s, 1),
                      tokens=self.stream.position, elapsed_s=round(self.elapsed, 2))
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:.0f}", lr=f"{lr:.2e}")
            if self.step % cfg.eval_every == 0 or self.step == cfg.max_steps:
                val = self.evaluate()
                self._log(step=self.step, val_loss=val, val_ppl=math.exp(val))
                bar.write(f"step {self.step}: held-out loss {val:.4f} (perplexity {math.exp(val):.2f})")
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self._save_checkpoint()
        bar.close()
        return self._finish()

    def forward_backward(self) -> tuple[float, int]:
        """One optimizer step's micro-batches: the summed loss (normalized by the step's target count) and
        the tokens read. Gradients accumulate in the parameters."""
        batches = [next(self.stream) for _ in range(self.cfg.grad_accum)]
        n_items = sum(b.num_targets for b in batches)
        loss = 0.0
        for b in batches:
            with torch.autocast("cpu", torch.bfloat16, enabled=self.cfg.bf16):
                out = self.model(b.input_ids, labels=b.input_ids, cu_seqlens=b.cu_seqlens, num_items_in_batch=n_items,
                                 return_logits=False)
            out.loss.backward()
            loss += out.loss.item()
        return loss, sum(b.input_ids.numel() for b in batches)

    def evaluate(self) -> float:
        self.model.eval()
        try:
            return evaluate(self.model, self.eval_batches, self.cfg.bf16)
        finally:
            self.model.train()

    def unigram_loss(self) -> float:
        return unigram_loss(self.train_docs, self.eval_batches, self.cfg.model.vocab_size)

    # ---- checkpoints ----
    def _checkpoint_dirs(self) -> tuple[Path, Path, Path]:
        return self.out / "checkpoint.tmp", self.out / "checkpoint", self.out / "checkpoint.old"

    def _save_checkpoint(self) -> None:
        """checkpoint/ is replaced whole (written aside, then renamed), so a crash never leaves half of one; a crash
        between the renames leaves the previous one as checkpoint.old (_restore_interrupted_save)."""
        tmp, final, old = self._checkpoint_dirs()
        shutil.rmtree(tmp, ignore_errors=True)
        save_pretrained(self.model, tmp)
        torch.save({"step": self.step, "elapsed": self.elapsed, "data_position": self.stream.position,
                    "optimizer": self.optimizer.state_dict(), "guard": self.guard.state_dict(),
                    "rng": torch.get_rng_state(), "config": self.cfg.as_dict(),
                    "log_bytes": self.log_file.stat().st_size if self.log_file.exists() else 0,
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None},
                   tmp / "state.pt")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)  # what a crash while deleting it left
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)

    def _restore_interrupted_save(self) -> None:
        """A save interrupted between its renames left no checkpoint/ but the previous one as checkpoint.old: put it
        back (before anything else looks for the run's checkpoint)."""
        tmp, final, old = self._checkpoint_dirs()
        if not final.exists() and (old / "state.pt").is_file():
            old.rename(final)
            shutil.rmtree(tmp, ignore_errors=True)

    def _load_checkpoint(self, check_config: bool) -> dict:
        """Restores the last checkpoint; returns its state.pt."""
        ckpt = self.out / "checkpoint"
        if not (ckpt / "state.pt").is_file():
            raise FileNotFoundError(f"--resume: no checkpoint in {ckpt}")
        state = torch.load(ckpt / "state.pt", weights_only=True)
        if check_config and state["config"] != self.cfg.as_dict():
            diff = sorted(k for k in state["config"] if state["config"][k] != self.cfg.as_dict().get(k))
            raise ValueError(f"--resume: {ckpt} was written with a different config (differs in {diff})")
        missing, unexpected = self.model.load_state_dict(load_file(ckpt / SINGLE_FILE), strict=False)
        tied = {"lm_head.weight"} if self.cfg.model.tie_word_embeddings else set()  # the file has no tied copy
        if unexpected or set(missing) - tied:
            raise ValueError(f"{ckpt / SINGLE_FILE}: missing {missing}, unexpected {unexpected}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.guard.load_state_dict(state["guard"])
        torch.set_rng_state(state["rng"])
        if state.get("cuda_rng") is not None:  # the CUDA generators too, when the run used CUDA
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.elapsed = state["step"], state["elapsed"]
        if check_config:  # a rollback keeps reading forward: the batches that spiked are skipped
            self.stream.position = state["data_position"]
        return state

    def _rollback(self) -> None:
        position = self.stream.position
        self._load_checkpoint(check_config=False)
        self.guard.consecutive = 0
        self._log(step=self.step, event="rollback", data_position=position)

    # ---- log and results ----
    def _log(self, **row) -> None:
        with self.log_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def _truncate_log(self, state: dict) -> None:
        """On resume: drop what was logged after the checkpoint was written (that work runs again, spikes and the
        step-0 evaluation included). Checkpoints from before log_bytes existed: the rows of later steps."""
        if not self.log_file.is_file():
            return
        if "log_bytes" in state:
            with self.log_file.open("r+b") as f:
                f.truncate(state["log_bytes"])
            return
        rows = [r for r in self.log_file.read_text().splitlines() if json.loads(r)["step"] <= state["step"]]
        self.log_file.write_text("".join(r + "\n" for r in rows))

    def _finish(self) -> dict:
        """Export model/ (bf16 Hugging Face checkpoint, tokenizer, generation_config.json) and summary.json."""
        export = self.out / "model"
        model = LlamaForCausalLM(self.cfg.model)
        model.load_state_dict(self.model.state_dict())
        save_pretrained(model.to(torch.bfloat16), export)
        for name in TOKENIZER_FILES:
            shutil.copy(self.out / "tokenizer" / name, export / name)
        ids = {"bos_token_id": self.tokenizer.token_to_id(BOS), "eos_token_id": self.tokenizer.token_to_id(EOS),
               "pad_token_id": self.tokenizer.token_to_id(PAD)}
        (export / "generation_config.json").write_text(json.dumps(ids, indent=2) + "\n")
        rows = [json.loads(r) for r in self.log_file.read_text().splitlines()]
        summary = {"steps": self.step, "tokens": self.stream.position, "train_seconds": round(self.elapsed, 1),
                   "final_val_loss": next(r["val_loss"] for r in reversed(rows) if "val_loss" in r),
                   "unigram_loss": next(r["unigram_loss"] for r in rows if "unigram_loss" in r),
                   "spikes": sum(r.get("event") == "spike" for r in rows),
                   "rollbacks": sum(r.get("event") == "rollback" for r in rows),
                   "threads": torch.get_num_threads(), "config": self.cfg.as_dict()}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary


# ---- command line ----
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", required=True, metavar="NAME", help="demo-target, demo-draft or tiny-test")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory (log, checkpoint, final model)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint exactly where it stopped")
    p.add_argument("--tokenizer", metavar="DIR", help="use this tokenizer (the draft shares the target's)")
    p.add_argument("--max-steps", type=int, metavar="N", help="override the preset's optimizer steps")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the log still has every step)")


def run(args: argparse.Namespace) -> int:
    cfg = preset(args.preset)
    if args.max_steps is not None:
        cfg = cfg.with_(max_steps=args.max_steps)
    if args.bf16:
        cfg = cfg.with_(bf16=True)
    trainer = Pretrainer(cfg, args.out, tokenizer_dir=args.tokenizer, resume=args.resume)
    summary = trainer.train(progress=not args.no_progress)
    print(f"done: {summary['steps']} steps, {summary['tokens']} tokens in {summary['train_seconds']:.0f} s; held-out "
          f"loss {summary['final_val_loss']:.4f} (unigram baseline {summary['unigram_loss']:.4f}); model in "
          f"{Path(args.out) / 'model'}", file=sys.stderr)
    return 0
