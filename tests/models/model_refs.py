"""Tiny random transformers models of each architecture, saved with save_pretrained, as llmkern's references."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

ARCHS = ("llama", "qwen2", "qwen3", "mistral")
VOCAB = 131

# Small, odd-ish sizes, grouped-query attention, each architecture's distinctive feature switched on:
# llama 3.1 rope scaling, qwen2 qkv bias + tied embeddings, qwen3 explicit head_dim + QK-Norm, mistral a
# sliding window shorter than the test sequences.
HF_CONFIGS = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=96, intermediate_size=161, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB, hidden_size=72, intermediate_size=161, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": lambda: Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=161, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=20, max_position_embeddings=128),
    "mistral": lambda: MistralConfig(
        vocab_size=VOCAB, hidden_size=84, intermediate_size=161, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=3, max_position_embeddings=128, sliding_window=5),
}  # fmt: skip


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights of unit-scale activations (transformers' 0.02 init makes attention nearly uniform, which
    would hide mask, window and rope errors): linears N(0, 1/fan_in), embeddings N(0, 1), norm weights
    1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            if "norm" in name:
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif "embed_tokens" in name:
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model


def make_hf_model(arch: str, **overrides) -> torch.nn.Module:
    cfg = HF_CONFIGS[arch]()
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return randomize_(AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)).eval()


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """arch -> (fp32 transformers model, its save_pretrained directory); built once per test module."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for arch in ARCHS:
        model = make_hf_model(arch)
        model.save_pretrained(root / arch)
        out[arch] = (model, root / arch)
    return out


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


# ---- GPTQ / AWQ checkpoints written from the formats' definitions (llmkern/quant/gptq_awq.py) ----

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _int32(words: torch.Tensor) -> torch.Tensor:
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


def _pack_rows(t: torch.Tensor) -> torch.Tensor:
    """[R, C] nibbles -> [R / 8, C]: nibble j of word (r, c) = t[8r + j, c] (GPTQ qweight)."""
    return _int32((t.reshape(-1, 8, t.shape[1]) << (torch.arange(8) * 4)[None, :, None]).sum(1))


def _pack_cols(t: torch.Tensor, order=tuple(range(8))) -> torch.Tensor:
    """[R, C] nibbles -> [R, C / 8]: nibble i of word (r, c) = t[r, 8c + order[i]]."""
    return _int32((t.reshape(t.shape[0], -1, 8)[:, :, list(order)] << (torch.arange(8) * 4)).sum(-1))


def write_int4_checkpoint(hf_model, path, method: str, group_size: int = 32) -> None:
    """Quantizes every decoder linear of hf_model in place to asymmetric round-to-nearest int4 (so the
    model now holds the dequantized weights, the reference) and saves it as a GPTQ (v1) or AWQ GEMM
    checkpoint: `<linear>.qweight/.qzeros/.scales(/.g_idx)` with fp16 scales, quantization_config."""
    import json

    from safetensors.torch import load_file, save_file

    hf_model.save_pretrained(path)
    tensors = load_file(path / "model.safetensors")
    for name, m in hf_model.named_modules():
        if not isinstance(m, torch.nn.Linear) or name == "lm_head":
            continue
        wt = m.weight.detach().t().double()  # [K, N]
        k, n = wt.shape
        g = wt.reshape(k // group_size, group_size, n)
        lo, hi = g.amin(1), g.amax(1)
        scales = ((hi - lo) / 15).clamp_min(1e-8).half()  # [G, N]
        zeros = (-lo / scales.double()).round().clamp(0, 15).long()
        q = (g / scales.double()[:, None] + zeros[:, None]).round().clamp(0, 15).long().reshape(k, n)
        group = torch.arange(k) // group_size
        with torch.no_grad():
            m.weight.copy_(((q - zeros[group]).double() * scales.double()[group]).t())
        del tensors[f"{name}.weight"]
        if method == "gptq":
            tensors.update({f"{name}.qweight": _pack_rows(q), f"{name}.qzeros": _pack_cols(zeros - 1),
                            f"{name}.scales": scales, f"{name}.g_idx": group.to(torch.int32)})
        else:
            tensors.update({f"{name}.qweight": _pack_cols(q, AWQ_ORDER), f"{name}.scales": scales,
                            f"{name}.qzeros": _pack_cols(zeros, AWQ_ORDER)})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    qc = ({"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": False,
           "checkpoint_format": "gptq"} if method == "gptq" else
          {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"})
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
