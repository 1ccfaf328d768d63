"""The pretraining loop on the tiny-test preset: learning, exact resume, the loss-spike guard, the CLI."""

import json
import math
import shutil

import pytest
import torch

from llmkern.cli import main as cli_main
from llmkern.models import load_model
from llmkern.train import Pretrainer, SpikeGuard, preset
from llmkern.train.pretrain import lr_at

CFG = preset("tiny-test")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """One tokenizer for the module (training it is most of a tiny run's set-up)."""
    out = tmp_path_factory.mktemp("tok")
    Pretrainer(CFG.with_(max_steps=3), out)
    return out / "tokenizer"


def _rows(out, key="loss"):
    """The log's rows that have `key`: by default the training steps (guard events are rows of their own)."""
    rows = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    return [r for r in rows if key in r and (key == "event" or "event" not in r)]


def test_training_lowers_the_held_out_loss_and_exports_a_loadable_model(tmp_path, tokenizer_dir):
    summary = Pretrainer(CFG, tmp_path, tokenizer_dir).train(progress=False)
    val = [r["val_loss"] for r in _rows(tmp_path, "val_loss")]
    assert val[0] == pytest.approx(math.log(CFG.model.vocab_size), rel=0.05)  # init: near-uniform predictions
    assert val[-1] < val[0] - 0.3 and summary["final_val_loss"] == val[-1]
    train = [r["loss"] for r in _rows(tmp_path)]
    assert len(train) == CFG.max_steps and train[-1] < train[0]
    model = load_model(tmp_path / "model")
    assert model.config == CFG.model
    assert next(model.parameters()).dtype == torch.bfloat16


def _stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("tokens_per_s", "elapsed_s")}  # timings differ run to run


@pytest.mark.parametrize("crash_at", [1, 6])
def test_resume_continues_exactly_where_it_stopped(tmp_path, tokenizer_dir, monkeypatch, crash_at):
    """A crash after step 1 (resumed from the step-0 checkpoint) or 6 (from step 4's); a corrupt batch right after
    step 4's checkpoint spikes in every run: the resumed run's whole log equals the uninterrupted one's."""
    straight = tmp_path / "straight"
    trainer = Pretrainer(CFG, straight, tokenizer_dir)
    _inject(trainer, monkeypatch, {4})
    trainer.train(progress=False)

    crashed = tmp_path / "crashed"
    trainer = Pretrainer(CFG, crashed, tokenizer_dir)
    _inject(trainer, monkeypatch, {4})
    real = trainer.forward_backward

    def crash():  # steps after the last checkpoint are lost and run again
        if trainer.step == crash_at:
            raise KeyboardInterrupt
        return real()

    monkeypatch.setattr(trainer, "forward_backward", crash)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(progress=False)
    resumed = Pretrainer(CFG, crashed, tokenizer_dir, resume=True)
    _inject(resumed, monkeypatch, {4})
    summary = resumed.train(progress=False)

    logs = [[_stable(json.loads(r)) for r in (out / "log.jsonl").read_text().splitlines()] for out in (crashed, straight)]
    assert logs[0] == logs[1]  # losses bit for bit, one step-0 evaluation, one spike
    assert [r["step"] for r in _rows(crashed)] == list(range(1, CFG.max_steps + 1)) and summary["spikes"] == 1


def test_resume_refuses_a_different_config_or_a_missing_checkpoint(tmp_path, tokenizer_dir):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        Pretrainer(CFG, tmp_path, tokenizer_dir, resume=True)
    Pretrainer(CFG.with_(max_steps=2), tmp_path, tokenizer_dir).train(progress=False)
    with pytest.raises(ValueError, match=r"different config \(differs in \['lr'\]\)"):
        Pretrainer(CFG.with_(max_steps=2, lr=1e-2), tmp_path, tokenizer_dir, resume=True)
    before = (tmp_path / "checkpoint" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="already holds a run's checkpoint"):  # a forgotten --resume loses nothing
        Pretrainer(CFG, tmp_path, tokenizer_dir)
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == before
    # Another tokenizer on resume is refused before anything is written (the run's token ids stay its own).
    other = tmp_path / "other_tokenizer"
    shutil.copytree(tokenizer_dir, other)
    (other / "tokenizer_config.json").write_text("{}")
    own = (tmp_path / "tokenizer" / "tokenizer_config.json").read_bytes()
    with pytest.raises(ValueError, match="--tokenizer: .* is not the run's tokenizer"):
        Pretrainer(CFG.with_(max_steps=2), tmp_path, other, resume=True)
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").read_bytes() == own
    Pretrainer(CFG.with_(max_steps=2), tmp_path, tokenizer_dir, resume=True)  # the same one is fine
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="--out: .* is a file"):
        Pretrainer(CFG, tmp_path / "file", tokenizer_dir)


def test_a_save_interrupted_between_its_renames_keeps_the_last_checkpoint(tmp_path, tokenizer_dir):
    """checkpoint/ -> checkpoint.old, then checkpoint.tmp -> checkpoint/: a crash in between leaves no checkpoint/.
    The next start puts checkpoint.old back (a resume continues from it, a new run is refused); a half-deleted
    checkpoint.old left by a crash after the second rename does not block later saves."""
    Pretrainer(CFG.with_(max_steps=4), tmp_path, tokenizer_dir).train(progress=False)
    before = (tmp_path / "checkpoint" / "model.safetensors").read_bytes()
    shutil.copytree(tmp_path / "checkpoint", tmp_path / "checkpoint.tmp")
    (tmp_path / "checkpoint").rename(tmp_path / "checkpoint.old")
    with pytest.raises(ValueError, match="already holds a run's checkpoint"):
        Pretrainer(CFG, tmp_path, tokenizer_dir)
    assert (tmp_path / "checkpoint" / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "checkpoint.old").exists() and not (tmp_path / "checkpoint.tmp").exists()
    (tmp_path / "checkpoint.old").mkdir()
    (tmp_path / "checkpoint.old" / "model.safetensors").write_text("half deleted")
    trainer = Pretrainer(CFG.with_(max_steps=4), tmp_path, tokenizer_dir, resume=True)
    assert trainer.step == 4
    trainer._save_checkpoint()
    assert not (tmp_path / "checkpoint.old").exists() and (tmp_path / "checkpoint" / "state.pt").is_file()


@pytest.mark.parametrize("change, match", [
    ({"spike_factor": float("nan")}, "spike_factor: expected a finite number"), ({"lr": math.inf}, "lr: expected a"),
    ({"lr": True}, "lr: expected a"), ({"warmup_steps": 2.5}, "warmup_steps: expected an int"),
    ({"val_every": 1}, "val_every: expected >= 2"), ({"betas": (0.9, 1.5)}, r"betas: expected two numbers in \[0, 1\)"),
    ({"bf16": 1}, "bf16: expected a bool"), ({"grad_accum": 0}, "grad_accum: expected a positive int"),
])
def test_config_validation_names_the_field(change, match):
    with pytest.raises(ValueError, match=f"PretrainConfig.{match}"):
        CFG.with_(**change)


def _inject(trainer, monkeypatch, spiked_steps, times=1):
    """Report a 10x loss at the given steps (`times` attempts each), as a corrupt batch would."""
    real, seen = trainer.forward_backward, {}

    def forward_backward():
        loss, tokens = real()
        seen[trainer.step] = seen.get(trainer.step, 0) + 1
        return (loss * 10 if trainer.step in spiked_steps and seen[trainer.step] <= times else loss), tokens

    monkeypatch.setattr(trainer, "forward_backward", forward_backward)


def test_spike_guard_skips_a_spiking_batch(tmp_path, tokenizer_dir, monkeypatch):
    trainer = Pretrainer(CFG, tmp_path, tokenizer_dir)
    _inject(trainer, monkeypatch, {5})
    trainer.train(progress=False)
    events = _rows(tmp_path, "event")
    assert [(e["event"], e["step"]) for e in events] == [("spike", 5)]
    assert events[0]["loss"] > CFG.spike_factor * events[0]["running_mean"]
    assert [r["step"] for r in _rows(tmp_path)] == list(range(1, CFG.max_steps + 1))  # every step still taken
    assert trainer.stream.position == (CFG.max_steps + 1) * CFG.micro_batch_tokens  # the spiking batch skipped


def test_repeated_spikes_roll_back_to_the_last_checkpoint(tmp_path, tokenizer_dir, monkeypatch):
    trainer = Pretrainer(CFG, tmp_path, tokenizer_dir)
    _inject(trainer, monkeypatch, {6}, times=CFG.max_spikes)
    summary = trainer.train(progress=False)
    events = [(e["event"], e["step"]) for e in _rows(tmp_path, "event")]
    assert events == [("spike", 6)] * CFG.max_spikes + [("rollback", 4)]  # the checkpoint of step 4
    steps = [r["step"] for r in _rows(tmp_path)]
    assert steps == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8] and summary["rollbacks"] == 1 and math.isfinite(
        summary["final_val_loss"])


def test_spike_guard_rules():
    guard = SpikeGuard(factor=2.0, window=3, max_spikes=2)
    assert [guard.check(x) for x in (5.0, 100.0, 4.0)] == ["ok"] * 3  # the window fills before it judges
    assert guard.check(2 * guard.running_mean + 1e-3) == "skip"
    assert guard.check(float("nan")) == "rollback"
    assert guard.check(2 * guard.running_mean) == "ok" and guard.consecutive == 0


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = CFG.with_(max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, s) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == lrs[10] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[100] == pytest.approx(0.1)


def test_bf16_autocast_trains(tmp_path, tokenizer_dir):
    summary = Pretrainer(CFG.with_(bf16=True, max_steps=4), tmp_path, tokenizer_dir).train(progress=False)
    assert math.isfinite(summary["final_val_loss"]) and summary["final_val_loss"] < summary["unigram_loss"] + 2


def test_cli_trains_and_reports_bad_arguments(tmp_path, tokenizer_dir, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "pretrain", "--preset", "tiny-test", "--out", str(tmp_path), "--max-steps", "2",
                  "--tokenizer", str(tokenizer_dir), "--no-progress"])
    assert e.value.code == 0 and "done: 2 steps" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "pretrain", "--preset", "nope", "--out", str(tmp_path)])
    assert e.value.code == 2 and "unknown name 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli_main(["train", "pretrain", "--preset", "tiny-test", "--out", str(tmp_path / "new"), "--resume"])
    assert e.value.code == 2 and "no checkpoint" in capsys.readouterr().err
