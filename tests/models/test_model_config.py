"""ModelConfig from config.json: field semantics of transformers 5 and of older Hub checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from model_refs import ARCHS, HF_CONFIGS
from transformers import AutoConfig

from llmkern.models import PRESETS, ModelConfig, preset
from llmkern.ops import rope_cos_sin_cache_from_config


@pytest.mark.parametrize("arch", ARCHS)
def test_from_transformers_config(arch):
    hf = HF_CONFIGS[arch]()
    cfg = ModelConfig.from_hf_dict(hf.to_dict())
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (hf.vocab_size, hf.hidden_size,
                                                                         hf.intermediate_size)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (hf.num_hidden_layers, hf.num_attention_heads,
                                                                 hf.num_key_value_heads)
    assert cfg.head_dim == getattr(hf, "head_dim", hf.hidden_size // hf.num_attention_heads)
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.tie_word_embeddings == hf.tie_word_embeddings
    assert cfg.qkv_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")
    assert cfg.window(0) == ((4, 0) if arch == "mistral" else (-1, -1))
    # the rope cache equals the one llmkern.ops builds from the transformers config itself
    assert torch.equal(cfg.rope_cache(), rope_cos_sin_cache_from_config(hf))


@pytest.mark.parametrize("arch", ARCHS)
def test_to_hf_dict_round_trips_through_transformers(arch):
    cfg = ModelConfig.from_hf_dict(HF_CONFIGS[arch]().to_dict())
    hf = AutoConfig.for_model(**cfg.to_hf_dict())
    assert ModelConfig.from_hf_dict(hf.to_dict()) == cfg


def test_old_rope_theta_and_rope_scaling_read_like_rope_parameters():
    """Hub checkpoints from before transformers 5 (Llama 3.1) write rope_theta + rope_scaling with "type"."""
    base = HF_CONFIGS["llama"]().to_dict()
    new = ModelConfig.from_hf_dict(base)
    old = {k: v for k, v in base.items() if k != "rope_parameters"}
    old.update(rope_theta=500000, rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    assert ModelConfig.from_hf_dict(old) == new
    assert new.rope_theta == 500000.0 and new.rope_scaling["rope_type"] == "llama3"


def test_qwen2_sliding_window_only_when_enabled_and_on_upper_layers():
    d = HF_CONFIGS["qwen2"]().to_dict()
    assert ModelConfig.from_hf_dict({**d, "sliding_window": 7}).sliding_window is None  # use_sliding_window off
    on = {**d, "use_sliding_window": True, "sliding_window": 7, "max_window_layers": 1, "layer_types": None}
    cfg = ModelConfig.from_hf_dict(on)
    assert [cfg.window(i) for i in range(2)] == [(-1, -1), (6, 0)]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("key", ["num_key_value_heads", "head_dim", "sliding_window", "max_position_embeddings"])
def test_a_missing_key_takes_transformers_default(arch, key):
    """A config.json without the key reads as transformers' config class of that family reads it (qwen2/qwen3: 32
    kv heads; qwen3: head_dim 128; mistral, and qwen with use_sliding_window: a 4096-token window)."""
    d = HF_CONFIGS[arch]().to_dict()
    if arch in ("qwen2", "qwen3"):
        d.update(use_sliding_window=True, sliding_window=7, max_window_layers=0, layer_types=None)
    if key == "num_key_value_heads":  # as many heads as qwen's default kv heads (32), so the config is valid
        d.update(num_attention_heads=32, hidden_size=128)
    d.pop(key, None)
    hf = AutoConfig.for_model(**d)
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.num_kv_heads == hf.num_key_value_heads
    assert cfg.head_dim == (getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads)
    assert cfg.sliding_window == (None if arch == "llama" else hf.sliding_window)
    assert cfg.max_position_embeddings == hf.max_position_embeddings


def test_llama_ignores_a_stray_sliding_window():
    """transformers' Llama has no sliding window: the key in a llama config.json changes nothing."""
    d = HF_CONFIGS["llama"]().to_dict()
    assert ModelConfig.from_hf_dict({**d, "sliding_window": 4}) == ModelConfig.from_hf_dict(d)


def test_unknown_model_type_names_file_and_value(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**HF_CONFIGS["llama"]().to_dict(), "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config\.json.*'gpt2'"):
        ModelConfig.from_json(path)


def test_malformed_and_missing_config_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_json(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        ModelConfig.from_json(tmp_path / "config.json")
    d = HF_CONFIGS["llama"]().to_dict()
    del d["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"num_kv_heads": 4}, "multiple of num_kv_heads"),
        ({"head_dim": 0}, "head_dim"),
        ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
        ({"position_encoding": "nope"}, "position_encoding"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
        ({"layer_types": ("full_attention",)}, "layer_types"),
        ({"layer_types": ("sliding_attention", "full_attention")}, "sliding_window"),
        ({"model_type": "gpt2"}, "model_type"),
    ],
)
def test_validation(change, match):
    with pytest.raises(ValueError, match=match):
        preset("tiny-llama").with_(**change)


def test_presets_are_valid_and_unknown_preset_is_named():
    assert {"tiny-llama", "llama-3.2-1b"} <= set(PRESETS)
    assert preset("llama-3.2-1b").num_kv_heads == 8
    with pytest.raises(ValueError, match="nope"):
        preset("nope")
