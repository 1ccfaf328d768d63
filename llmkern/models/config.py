"""ModelConfig: the typed config of the Llama-family models (llama, qwen2, qwen3, mistral).

Read from a Hugging Face `config.json` with the semantics of transformers 5 (`models/<type>/configuration_*.py`):
- rope: transformers 5 writes `rope_parameters` ({"rope_theta", "rope_type", scaling keys}); older Hub
  checkpoints write `rope_theta` + `rope_scaling` ({"type" | "rope_type", ...}). Both are accepted.
- biases: llama's `attention_bias` covers q/k/v/o and `mlp_bias` the MLP; qwen2 always has q/k/v bias
  (no o bias); qwen3's `attention_bias` covers q/k/v/o; mistral has none.
- sliding window: mistral applies `sliding_window` (if not null) to every layer; qwen2/qwen3 only when
  `use_sliding_window`, to the layers `layer_types` marks "sliding_attention" (default: layers >=
  `max_window_layers`). A key j is visible from query i when i - window < j <= i (masking_utils).
- `position_encoding` ("rope" | "alibi") is llmkern's own key; transformers' checkpoints are all rope.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from llmkern._json import read_json_object
from llmkern.ops import rope_cos_sin_cache, rope_parameters

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mistral": "MistralForCausalLM"}  # fmt: skip
LAYER_TYPES = ("full_attention", "sliding_attention")
POSITION_ENCODINGS = ("rope", "alibi")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3" | ..., scaling keys}; None: plain rope
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim of q and k before rope
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # per layer; None: every layer sliding iff sliding_window is set
    position_encoding: str = "rope"
    # config.json keys this config does not model (token ids, dtype, ...): written back by to_hf_dict.
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"ModelConfig.model_type: expected one of {MODEL_TYPES}, got {self.model_type!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):  # fmt: skip
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise ValueError(f"ModelConfig.{name}: expected a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"ModelConfig: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads} (grouped-query attention shares each kv head evenly)")
        if self.head_dim % 2 or self.head_dim > 256:
            raise ValueError(f"ModelConfig.head_dim: expected an even value <= 256 (the attention kernels' limit), "
                             f"got {self.head_dim}")
        if not (isinstance(self.rms_norm_eps, float) and self.rms_norm_eps > 0):
            raise ValueError(f"ModelConfig.rms_norm_eps: expected a positive float, got {self.rms_norm_eps!r}")
        if not (isinstance(self.rope_theta, float) and self.rope_theta > 0):
            raise ValueError(f"ModelConfig.rope_theta: expected a positive float, got {self.rope_theta!r}")
        if self.sliding_window is not None and not (isinstance(self.sliding_window, int) and self.sliding_window > 0):
            raise ValueError(f"ModelConfig.sliding_window: expected None or a positive int, "
                             f"got {self.sliding_window!r}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or any(t not in LAYER_TYPES for t in self.layer_types):
                raise ValueError(f"ModelConfig.layer_types: expected {self.num_layers} entries from {LAYER_TYPES}, "
                                 f"got {self.layer_types!r}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("ModelConfig.layer_types: sliding_attention layers need sliding_window")
        if self.position_encoding not in POSITION_ENCODINGS:
            raise ValueError(f"ModelConfig.position_encoding: expected one of {POSITION_ENCODINGS}, "
                             f"got {self.position_encoding!r}")
        if self.position_encoding == "rope":
            rope_cos_sin_cache(self.head_dim, 1, self.rope_theta, self.rope_scaling)  # unsupported scaling: raises

    # ---- derived values ----

    def window(self, layer: int) -> tuple[int, int]:
        """flash-attn window_size of a layer: (-1, -1) (causal only) or (sliding_window - 1, 0)."""
        sliding = self.sliding_window is not None and (self.layer_types is None
                                                       or self.layer_types[layer] == "sliding_attention")
        return (self.sliding_window - 1, 0) if sliding else (-1, -1)

    def rope_cache(self, max_position: int | None = None) -> torch.Tensor:
        """cos|sin cache float32 [max_position, head_dim] (llmkern.ops.rope_cos_sin_cache's layout)."""
        n = self.max_position_embeddings if max_position is None else max_position
        return rope_cos_sin_cache(self.head_dim, n, self.rope_theta, self.rope_scaling)

    def alibi_slopes(self) -> torch.Tensor:
        """float32 [num_heads]: Press et al. 2022 (arXiv:2108.12409) geometric slopes 2^(-8 i / n), with the
        interleaved extension for a head count that is not a power of two (as in BLOOM / MPT)."""
        closest = 2 ** math.floor(math.log2(self.num_heads))
        base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
        extra = [2 ** (-4 * (2 * i + 1) / closest) for i in range(self.num_heads - closest)]
        return torch.tensor(base + extra, dtype=torch.float32)

    def weight_dtype(self) -> torch.dtype | None:
        """The checkpoint's dtype from config.json ("dtype", or "torch_dtype" before transformers 5)."""
        name = self.extra.get("dtype") or self.extra.get("torch_dtype")
        return getattr(torch, name) if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype) \
            else None

    # ---- config.json in and out ----

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """From a parsed config.json; errors name `source` (the file) and the offending key."""
        model_type = d.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{source}: unsupported model_type {model_type!r}; llmkern runs {MODEL_TYPES}")
        try:
            return cls(model_type=model_type, **_hf_fields(model_type, d),
                       extra={k: v for k, v in d.items() if k not in _HF_KEYS})
        except KeyError as e:
            raise ValueError(f"{source}: missing key {e.args[0]!r} (model_type {model_type!r})") from None
        except (ValueError, TypeError) as e:
            raise ValueError(f"{source}: {e}") from e

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            d = read_json_object(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file (a model directory needs config.json)") from None
        return cls.from_hf_dict(d, str(path))

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json that transformers 5 reads back as the same model."""
        rope = {"rope_theta": self.rope_theta, "rope_type": "default", **(self.rope_scaling or {})}
        rope.pop("type", None)
        d = {**self.extra, "architectures": [ARCHITECTURES[self.model_type]], "model_type": self.model_type,
             "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
             "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
             "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
             "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_parameters": rope,
             "max_position_embeddings": self.max_position_embeddings, "hidden_act": "silu",
             "tie_word_embeddings": self.tie_word_embeddings}  # fmt: skip
        if self.model_type == "llama":
            d.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        if self.model_type == "qwen3":
            d.update(attention_bias=self.qkv_bias)
        if self.model_type in ("qwen2", "qwen3"):
            d.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                     layer_types=list(self.layer_types or [
                         "sliding_attention" if self.sliding_window else "full_attention"] * self.num_layers))
        if self.model_type == "mistral":
            d.update(sliding_window=self.sliding_window)
        if self.position_encoding != "rope":
            d["position_encoding"] = self.position_encoding
        return d

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_HF_KEYS = {"model_type", "architectures", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling",
            "rope_parameters", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
            "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "position_encoding",
            "hidden_act"}  # fmt: skip


# transformers' class defaults for keys a config.json may leave out, where a family's differ from the generic
# fallbacks below (num_key_value_heads: the head count; head_dim: hidden / heads; max_position_embeddings: 2048).
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096, "max_position_embeddings": 131072},
    "qwen2": {"num_key_value_heads": 32, "sliding_window": 4096, "max_position_embeddings": 32768},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "sliding_window": 4096, "max_position_embeddings": 32768},
}


def _hf_fields(model_type: str, d: dict) -> dict[str, Any]:
    if d.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act: only 'silu' (SwiGLU) is supported, got {d['hidden_act']!r}")
    d = {**_FAMILY_DEFAULTS.get(model_type, {}), **d}
    heads = d["num_attention_heads"]
    theta, scaling, _ = rope_parameters(d)  # llama-family configs have no partial rotary
    layers = d["num_hidden_layers"]
    # Llama has no sliding window in transformers: a stray key in its config.json is not one.
    sliding, layer_types = None if model_type == "llama" else d.get("sliding_window"), None
    if model_type in ("qwen2", "qwen3"):
        sliding = sliding if d.get("use_sliding_window", False) else None
        if sliding is not None:
            layer_types = d.get("layer_types") or [
                "sliding_attention" if i >= d.get("max_window_layers", 28) else "full_attention" for i in range(layers)]
            layer_types = tuple(layer_types)
    attention_bias = bool(d.get("attention_bias", False))
    return dict(
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
        num_layers=layers, num_heads=heads, num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        rope_theta=theta, rope_scaling=scaling, max_position_embeddings=d.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or (attention_bias and model_type in ("llama", "qwen3")),
        o_bias=attention_bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(d.get("mlp_bias", False)) and model_type == "llama", qk_norm=model_type == "qwen3",
        sliding_window=sliding, layer_types=layer_types, position_encoding=d.get("position_encoding", "rope"),
    )  # fmt: skip


# Named presets: tiny ones for tests, real shapes for benchmarks (random weights).
PRESETS: dict[str, ModelConfig] = {
    "tiny-llama": ModelConfig("llama", vocab_size=131, hidden_size=96, intermediate_size=161, num_layers=2,
                              num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=256),
    "tiny-qwen3": ModelConfig("qwen3", vocab_size=131, hidden_size=96, intermediate_size=161, num_layers=2,
                              num_heads=4, num_kv_heads=2, head_dim=32, qk_norm=True, tie_word_embeddings=True,
                              max_position_embeddings=256),
    "tiny-alibi": ModelConfig("llama", vocab_size=131, hidden_size=96, intermediate_size=161, num_layers=2,
                              num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=256,
                              position_encoding="alibi"),
    "llama-3.2-1b": ModelConfig("llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, rms_norm_eps=1e-5,
                                rope_theta=500000.0, max_position_embeddings=131072, tie_word_embeddings=True,
                                rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
}  # fmt: skip


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"preset: unknown name {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
