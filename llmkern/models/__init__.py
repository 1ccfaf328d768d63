"""llmkern.models: Llama-family models (llama, qwen2, qwen3, mistral) on llmkern.ops, Hugging Face
checkpoints in and out.

    model = load_model("path/to/hf_dir", dtype=torch.bfloat16, quant="int4")
    out = model(input_ids, labels=labels)            # training / scoring: out.logits, out.loss
    logits = model.step(step_input, kv_caches)       # serving: ragged prefill chunks + decodes, paged cache
"""

from llmkern.models.config import PRESETS, ModelConfig, preset
from llmkern.models.llama import AttentionInput, CausalLMOutput, LlamaForCausalLM
from llmkern.models.checkpoint import load_model, save_pretrained
from llmkern.models.serving import SequenceChunk, StepInput, allocate_kv_cache, build_step_input

__all__ = [
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
