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
