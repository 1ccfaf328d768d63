"""Hugging Face checkpoints in and out: sharded loads, save_pretrained that transformers reads, dtype,
quantized loads, and bad checkpoints that fail naming the file and the tensor."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from model_refs import ARCHS, VOCAB, hf_checkpoints, make_hf_model, rel_err, write_int4_checkpoint  # noqa: F401
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from llmkern.models import LlamaForCausalLM, load_model, preset, save_pretrained
from llmkern.models.llama import Linear
from llmkern.quant import Int4Config, Int4Linear, Int8Config, Int8Linear, NF4Config, NF4Linear
from llmkern.quant.convert import main as convert_main

IDS = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("llama")
    hf.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(list(tmp_path.glob("*.safetensors"))) > 2
    assert rel_err(_logits(load_model(tmp_path)), _logits(hf)) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_save_pretrained_loads_in_transformers_with_equal_logits(hf_checkpoints, tmp_path, arch):
    hf, path = hf_checkpoints[arch]
    save_pretrained(load_model(path), tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reloaded) is type(hf)
    assert torch.equal(_logits(reloaded), _logits(hf))  # the same weights through the same code: bit-equal
    assert torch.equal(_logits(load_model(tmp_path)), _logits(load_model(path)))


def test_dtype_defaults_to_the_checkpoints_and_can_be_overridden(tmp_path):
    make_hf_model("qwen2").to(torch.bfloat16).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    model = load_model(tmp_path)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.model.embed_tokens.weight  # qwen2 ties them
    assert {p.dtype for p in load_model(tmp_path, dtype=torch.float32).parameters()} == {torch.float32}


# A model whose linears every quantized format takes (in_features divisible by the int4 group size 128).
QUANT_SHAPES = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def _mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over tokens of KL(ref || model) of the next-token distributions (float32 math)."""
    logp, logq = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).mean().item()


@pytest.mark.parametrize("quant, module, max_kl", [("int8", Int8Linear, 5e-4), ("int4", Int4Linear, 0.06),
                                                   ("nf4", NF4Linear, 0.04)])  # fmt: skip
def test_quantized_load_stays_close_to_full_precision(tmp_path, quant, module, max_kl):
    """Every linear but the head quantized; next-token distributions close to the unquantized model's, in
    bfloat16 (the issue's reference) and float32: mean KL divergence per token, printed with -s.
    Measured (float32 / bfloat16): int8 6.5e-5 / 1.0e-4, int4 2.0e-2 / 2.0e-2, nf4 1.35e-2 / 1.36e-2. The
    rounding noise of the weights does not depend on the activations' dtype, so both share one bound, 3x to 5x
    the larger measurement; bfloat16's own rounding (the dense bf16 model vs the float32 one: KL 3.2e-5)
    is checked to stay well below it, so the bf16 comparison measures quantization, not bf16 noise."""
    make_hf_model("llama", **QUANT_SHAPES).save_pretrained(tmp_path)
    dense = {dtype: _logits(load_model(tmp_path, dtype=dtype)) for dtype in (torch.float32, torch.bfloat16)}
    assert _mean_kl(dense[torch.float32], dense[torch.bfloat16]) < max_kl / 5
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tmp_path, dtype=dtype, quant=quant)
        kinds = {name: type(m) for name, m in model.named_modules() if name.endswith("_proj")}
        assert set(kinds.values()) == {module} and len(kinds) == 2 * 7
        assert type(model.lm_head) is Linear and model.lm_head.weight.dtype == dtype  # the head stays dense
        kl = _mean_kl(dense[dtype], _logits(model))
        print(f"{quant}: mean KL vs the {str(dtype).removeprefix('torch.')} model {kl:.2e}")
        assert 0 < kl < max_kl, f"{quant} {dtype}: KL {kl:.2e}"
    with pytest.raises(ValueError, match="quantized"):
        save_pretrained(model, tmp_path / "out")


@pytest.mark.parametrize("fmt, extra, config", [
    ("nf4", [], NF4Config()),
    ("int4", ["--group-size", "32", "--asymmetric"], Int4Config(group_size=32, symmetric=False)),
    ("int8", [], Int8Config()),
])  # fmt: skip
def test_llmkern_quantized_checkpoint_loads_as_quantizing_at_load_time(tmp_path, fmt, extra, config):
    """A checkpoint converted by `python -m llmkern.quant` (qwen2: q/k/v biases, tied head) loads with the
    module tree and buffers of quantizing the original at load time: the same codes through the same
    kernels, so bit-equal logits. Loading in bfloat16 keeps the stored quantized state and casts the rest."""
    make_hf_model("qwen2", **QUANT_SHAPES).save_pretrained(tmp_path / "src")
    assert convert_main([str(tmp_path / "src"), "--out", str(tmp_path / "q"), "--format", fmt, *extra,
                         "--no-progress"]) == 0
    model, ref = load_model(tmp_path / "q"), load_model(tmp_path / "src", quant=config)
    ref_dense = load_model(tmp_path / "src")
    assert {n: type(m) for n, m in model.named_modules()} == {n: type(m) for n, m in ref.named_modules()}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(_logits(model), _logits(ref))
    bf16 = load_model(tmp_path / "q", dtype=torch.bfloat16)
    q_proj = bf16.model.layers[0].self_attn.q_proj
    assert q_proj.bias.dtype == torch.bfloat16 and not any(t.is_meta for t in bf16.state_dict().values())
    fp32_state = model.model.layers[0].self_attn.q_proj.state_dict()
    assert all(torch.equal(t, fp32_state[k]) for k, t in q_proj.state_dict().items() if k != "bias")
    # bfloat16 activations cost the quantized model what they cost the dense one (derived 2x rule, measured ~1x).
    dense_err = rel_err(_logits(load_model(tmp_path / "src", dtype=torch.bfloat16)).float(), _logits(ref_dense))
    assert rel_err(_logits(bf16).float(), _logits(model)) <= 2 * dense_err
    with pytest.raises(ValueError, match="already a llmkern checkpoint"):
        load_model(tmp_path / "q", quant=fmt)
    if fmt == "int8":  # the layout an older llmkern wrote: refused with what to do about it
        from safetensors.torch import load_file, save_file

        file = next((tmp_path / "q").glob("*.safetensors"))
        state = load_file(file)
        name = "model.layers.0.self_attn.q_proj.weight"
        state[name] = state[name].view(q_proj.out_features, q_proj.in_features)
        save_file(state, file, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=r"an int8 checkpoint from an older llmkern: convert the original"):
            load_model(tmp_path / "q")


@pytest.mark.parametrize("change, match", [
    ({"format": "nf5"}, r"format: expected one of \['int4', 'int8', 'nf4'\], got 'nf5'"),
    ({"modules": "all"}, "modules: expected a list of module names"),
    ({"modules": ["model.layers.0.mlp.nope"]}, "'model.layers.0.mlp.nope' is not a linear of the model"),
    ({"block_size": 7}, "block_size must be one of"),
    ({"double_quant": "yes"}, "double_quant must be a bool"),
])  # fmt: skip
def test_bad_llmkern_quantization_config_names_the_file(tmp_path, change, match):
    make_hf_model("llama", **QUANT_SHAPES).save_pretrained(tmp_path)
    assert convert_main([str(tmp_path), "--format", "nf4", "--no-progress"]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"config\.json: quantization_config: .*{match}"):
        load_model(tmp_path)


def test_llmkern_quantized_checkpoint_with_bad_tensors_names_file_and_tensor(tmp_path):
    make_hf_model("llama", **QUANT_SHAPES).save_pretrained(tmp_path)
    assert convert_main([str(tmp_path), "--format", "nf4", "--no-progress"]) == 0
    module = "model.layers.1.mlp.up_proj"
    state = f"{module}.weight.quant_state.bitsandbytes__nf4"  # JSON bytes: any length passes the header check
    _rewrite(tmp_path, lambda t: t.__setitem__(state, t[state][:-3].contiguous()))
    with pytest.raises(ValueError, match=rf"model\.safetensors: {re.escape(module)}: .*"):
        load_model(tmp_path)
    absmax = f"{module}.weight.absmax"
    _rewrite(tmp_path, lambda t: t.__setitem__(absmax, t[absmax][:-1].contiguous()))
    with pytest.raises(ValueError, match=rf"model\.safetensors: tensor '{re.escape(absmax)}' has shape"):
        load_model(tmp_path)


# ---- bad checkpoints: an error naming the file and the tensor, nothing returned ----


@pytest.fixture
def ckpt(hf_checkpoints, tmp_path):
    """A writable copy of the tiny llama checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["llama"][1], dst)
    return dst


def _rewrite(path, change):
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_truncated_safetensors(ckpt):
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*(truncated|corrupt)"):
        load_model(ckpt)


def test_wrong_shape_names_file_and_tensor(ckpt):
    name = "model.layers.1.self_attn.k_proj.weight"
    _rewrite(ckpt, lambda t: t.__setitem__(name, t[name][:-1]))
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{name}.*\[31, 96\].*\[32, 96\]"):
        load_model(ckpt)


def test_a_tied_config_with_its_own_head_in_the_file_loads_untied_as_transformers_does(hf_checkpoints, tmp_path):
    """qwen2 ties its embeddings; a file holding an lm_head.weight of other values keeps that head (transformers:
    "we will NOT tie them"), with a warning. A copy equal to the embeddings stays tied."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints["qwen2"][1], dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    model = load_model(dst)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    _rewrite(dst, lambda t: t.update({"lm_head.weight": torch.randn_like(t["lm_head.weight"])}))
    with pytest.warns(UserWarning, match="lm_head.weight' differs .* loading them untied"):
        model = load_model(dst)
    hf = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert rel_err(_logits(model), _logits(hf)) < 1e-5


def test_missing_and_unexpected_tensors(ckpt):
    name = "model.layers.0.mlp.up_proj.weight"
    _rewrite(ckpt, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"model\.safetensors.*missing tensor '{name}'"):
        load_model(ckpt)
    _rewrite(ckpt, lambda t: t.update({name: torch.zeros(161, 96), "model.layers.0.mlp.extra": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.extra'"):
        load_model(ckpt)


def test_sharded_index_problems(tmp_path):
    make_hf_model("llama").save_pretrained(tmp_path, max_shard_size="300KB")
    index = tmp_path / "model.safetensors.index.json"
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "gone")
    with pytest.raises(FileNotFoundError, match=shard.name):
        load_model(tmp_path)
    index.write_text("{")
    with pytest.raises(ValueError, match="malformed index"):
        load_model(tmp_path)


def test_unknown_model_type_and_missing_files(ckpt, tmp_path):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "falcon"}))
    with pytest.raises(ValueError, match=r"config\.json.*'falcon'"):
        load_model(ckpt)
    with pytest.raises(FileNotFoundError, match="not a model directory"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")


def test_pickled_weights_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*never unpickles"):
        load_model(ckpt)
    with pytest.raises(ValueError, match="quant"):
        load_model(ckpt, quant="fp3")


# ---- peak memory of a load: weights plus a bounded amount, never a second copy ----

_MEASURE = """
import gc, sys, torch
from llmkern.models import LlamaForCausalLM, ModelConfig, load_model
def status(key):
    return int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) * 1024
with torch.device("meta"):  # first model build and first ops touch library code once (~70 MB): not weights
    LlamaForCausalLM(ModelConfig.from_json(sys.argv[1] + "/config.json"))
torch.ones(8, 8) @ torch.ones(8, 8)
for dtype in sys.argv[2:]:
    gc.collect()
    base = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # resets VmHWM, the peak resident set, to the current one
    model = load_model(sys.argv[1], dtype=getattr(torch, dtype))
    model(torch.zeros(1, 1, dtype=torch.int64))  # a forward touches every layer's weights
    print(dtype, (status("VmHWM") - base) / sum(p.nbytes for p in model.parameters()))
    del model
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_load_peak_memory_within_1_2x_weight_bytes(tmp_path):
    """A float32 file loaded as float32 (zero-copy views of the mapping) and as bfloat16 (converted in
    chunks). A 110 MB model whose embedding and head are each 30% of it: converting either whole would
    exceed the bound."""
    cfg = preset("tiny-llama").with_(vocab_size=16000, hidden_size=512, intermediate_size=1376, num_layers=4,
                                     num_heads=8, num_kv_heads=2, head_dim=64)
    save_pretrained(LlamaForCausalLM(cfg), tmp_path)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(tmp_path), "float32", "bfloat16"],
                         capture_output=True, text=True, check=True)
    ratios = dict(line.split() for line in out.stdout.splitlines())
    assert ratios.keys() == {"float32", "bfloat16"}
    for dtype, ratio in ratios.items():
        assert float(ratio) <= 1.2, f"{dtype}: peak resident memory of the load {float(ratio):.2f}x the weight bytes"


@pytest.mark.parametrize("arch, method", [("qwen2", "gptq"), ("llama", "awq")])
def test_gptq_awq_checkpoint_equals_its_dequantized_model(tmp_path, arch, method):
    """A GPTQ (qwen2: with q/k/v bias) or AWQ checkpoint loads its linears as Int4Linear and computes what
    transformers computes with the dequantized weights."""
    hf = make_hf_model(arch, **QUANT_SHAPES)
    write_int4_checkpoint(hf, tmp_path, method)
    model = load_model(tmp_path)
    kinds = {type(m) for name, m in model.named_modules() if name.endswith("_proj")}
    assert kinds == {Int4Linear}
    assert rel_err(_logits(model), _logits(hf)) < 1e-4
    with pytest.raises(ValueError, match="already a"):
        load_model(tmp_path, quant="nf4")
    name = "model.layers.0.mlp.up_proj.qzeros"
    _rewrite(tmp_path, lambda t: t.__setitem__(name, t[name][:, :-1].contiguous()))
    with pytest.raises(ValueError, match=rf"model\.safetensors.*{name}"):
        load_model(tmp_path)
