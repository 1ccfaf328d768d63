"""`python -m llmkern.quant` / `llmkern quantize` on a tiny random Llama checkpoint (no downloads)."""

import json
import shutil
import warnings

import pytest
import torch

from llmkern.quant import Int4Config, NF4Config, quantize_
from llmkern.quant.convert import main as convert_main

transformers = pytest.importorskip("transformers")


def tiny_llama_dir(path, shard: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, max_shard_size="100KB" if shard else "1GB")
    (path / "tokenizer_config.json").write_text("{}")
    return model


def load_dir(path):
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(f))
    return sd


@pytest.mark.parametrize("shard", [False, True], ids=["single", "sharded"])
def test_convert_nf4_loads_into_quantized_model(tmp_path, shard, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    model = tiny_llama_dir(src, shard)
    assert (src / "model.safetensors.index.json").exists() == shard
    assert convert_main([str(src), "--out", str(dst), "--format", "nf4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "quantized 14 layers to nf4" in out and "MiB ->" in out

    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "llmkern" and qc["format"] == "nf4"
    assert qc["block_size"] == 64 and qc["double_quant"] is True
    assert len(qc["modules"]) == 14 and "lm_head" not in qc["modules"]
    assert (dst / "tokenizer_config.json").exists()
    if shard:
        index = json.loads((dst / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in load_dir(dst).values())
        assert set(index["weight_map"]) == set(load_dir(dst))

    # The converted tensors are exactly quantize_(model, NF4Config()).state_dict(), and load strictly.
    with torch.no_grad():
        ids = torch.randint(0, 96, (1, 9))
        dense = model(ids).logits
        quantize_(model, NF4Config())
        want = model.state_dict()
        got = load_dir(dst)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        model.load_state_dict(got, strict=True)
        logits = model(ids).logits
    assert (logits - dense).norm() / dense.norm() < 0.2


def test_convert_int4_in_place_with_llmkern_cli(tmp_path, capsys):
    from llmkern.cli import main as cli_main

    src = tmp_path / "ckpt"
    tiny_llama_dir(src, shard=True)
    before = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    with pytest.raises(SystemExit) as e:
        cli_main(["quantize", str(src), "--format", "int4", "--group-size", "32", "--asymmetric", "--no-progress"])
    assert e.value.code == 0
    assert "size:" in capsys.readouterr().out
    after = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    assert after < before
    assert not list(src.glob("*.tmp"))
    qc = json.loads((src / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "int4" and qc["group_size"] == 32 and qc["symmetric"] is False
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(src))
    quantize_(model, Int4Config(group_size=32, symmetric=False))
    model.load_state_dict(load_dir(src), strict=True)

    # Converting twice is refused.
    assert convert_main([str(src), "--format", "int4", "--no-progress"]) == 2
    assert "already quantized" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int8"])
def test_transformers_refuses_converted_checkpoints(tmp_path, fmt):
    # transformers skips quant_method "llmkern" with a warning and loads by name, so each format must store its
    # codes under a shape nn.Linear's weight cannot take: a size-mismatch error, never codes read as weights.
    src, dst = tmp_path / "src", tmp_path / "dst"
    tiny_llama_dir(src, shard=False)
    group = ["--group-size", "32"] if fmt == "int4" else []
    assert convert_main([str(src), "--out", str(dst), "--format", fmt, "--no-progress", *group]) == 0
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        transformers.AutoModelForCausalLM.from_pretrained(dst)


def test_convert_skips_unsupported_shapes_and_bad_args(tmp_path, capsys):
    src = tmp_path / "src"
    tiny_llama_dir(src, shard=False)
    # int4 group 128: hidden 64 / intermediate 160 are not divisible, so every layer is left as is.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert convert_main([str(src), "--out", str(tmp_path / "o"), "--format", "int4", "--no-progress"]) == 0
    assert len(caught) == 14
    assert "not quantizing 'model.layers.0.mlp.down_proj' (in_features 160 is not divisible" in \
        "".join(str(w.message) for w in caught)
    assert "quantized 0 layers" in capsys.readouterr().out
    assert convert_main([str(src), "--format", "int8", "--group-size", "64"]) == 2
    assert "does not apply to int8" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "missing"), "--format", "nf4"]) == 2
    shutil.rmtree(tmp_path / "o")


def test_convert_refuses_conv1d_models(tmp_path, capsys):
    """GPT-2's Conv1D weights are [in, out]: quantizing them as nn.Linear weights would be silently wrong."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=1, n_head=4, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt2")
    assert convert_main([str(tmp_path / "gpt2"), "--format", "nf4", "--no-progress"]) == 2
    assert "stores its linear weights transposed" in capsys.readouterr().err


def test_an_interrupted_conversion_leaves_the_source_as_it_was(tmp_path, monkeypatch, capsys):
    """Everything is written aside and moved into place whole: a crash mid-way leaves the source as it was (in place
    included) and no output that loads; the next run converts it."""
    import safetensors.torch

    src = tmp_path / "ckpt"
    tiny_llama_dir(src, shard=True)
    (src / "original").mkdir()
    (src / "original" / "params.json").write_text("{}")  # a sub-directory (Meta's original weights) is kept
    before = {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()}
    real, calls = safetensors.torch.save_file, []

    def crash_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_second_shard)
    for out in (None, tmp_path / "new"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            convert_main([str(src), *(["--out", str(out)] if out else []), "--format", "nf4", "--no-progress"])
        assert {f.name: f.read_bytes() for f in src.iterdir() if f.is_file()} == before
        assert out is None or not out.exists()
    monkeypatch.undo()
    assert convert_main([str(src), "--format", "nf4", "--no-progress"]) == 0
    assert "quantization_config" in json.loads((src / "config.json").read_text())
    assert (src / "original" / "params.json").exists() and not list(tmp_path.glob(".*"))


def test_bad_outputs_and_half_converted_inputs_are_refused(tmp_path, capsys):
    src = tmp_path / "src"
    tiny_llama_dir(src, shard=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "model.safetensors.index.json").write_text("{}")  # an earlier output: never mixed into
    (tmp_path / "file").write_text("")
    for out in ("full", "file"):
        assert convert_main([str(src), "--out", str(tmp_path / out), "--format", "nf4", "--no-progress"]) == 2
        assert "exists and is not an empty directory" in capsys.readouterr().err
    assert convert_main([str(src), "--out", str(tmp_path / "o"), "--format", "nf4", "--include", "(", "--no-progress"]) == 2
    assert "--include: not a regular expression" in capsys.readouterr().err and not (tmp_path / "o").exists()
    # A shard quantized by hand (or by a run of an older version that stopped half-way) without the config saying so.
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.scales"] = torch.ones(160, 1)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert convert_main([str(src), "--format", "nf4", "--no-progress"]) == 2
    assert "'model.layers.0.mlp.up_proj.scales' is already quantized" in capsys.readouterr().err
