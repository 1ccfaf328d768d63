"""llmkern.models: Llama-family models (llama, qwen2, qwen3, mistral) on llmkern.ops, Hugging Face
checkpoints in and out.

    model = load_model("path/to/hf_dir", dtype=torch.bfloat16, quant="int4")
    out = model(input_ids, labels=labels)            # training / scoring: out.logits, out.loss
    logits = model.step(step_input, kv_caches)       # serving: ragged prefill chunks + decodes, paged cache
"""

from pathlib import Path

from llmkern.models.config import PRESETS, ModelConfig, preset
from llmkern.models.llama import AttentionInput, CausalLMOutput, LlamaForCausalLM
from llmkern.models.checkpoint import load_model, save_pretrained
from llmkern.models.serving import SequenceChunk, StepInput, allocate_kv_cache, build_step_input

DEMO_MODELS = ("demo-target", "demo-draft")


def demo_model_path(name: str = "demo-target") -> Path:
    """The directory of a built-in demo model: a small Python code model llmkern trained itself (its README.md
    says how), so generation and serving work offline. demo-draft is demo-target's speculative-decoding draft."""
    if name not in DEMO_MODELS:
        raise ValueError(f"demo_model_path: unknown name {name!r}; the demo models are {DEMO_MODELS}")
    return Path(__file__).parent / "demo" / name


__all__ = [
    "DEMO_MODELS",
    "demo_model_path",
    "ModelConfig",
    "PRESETS",
    "preset",
    "LlamaForCausalLM",
    "CausalLMOutput",
    "AttentionInput",
    "load_model",
    "save_pretrained",
    "StepInput",
    "SequenceChunk",
    "allocate_kv_cache",
    "build_step_input",
]
