"""llmkern.ops: the public kernel surface, one module per op family."""

from llmkern.ops.cpu import cpu_isa, set_cpu_isa, supported_cpu_isas, use_cpu_isa
from llmkern.ops.norm import fused_add_rms_norm, fused_add_rms_norm_, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from llmkern.ops.activation import act_and_mul_ref, act_mul_ref, gelu_and_mul, gelu_mul, silu_and_mul, silu_mul
from llmkern.ops.attention import (
    attention_ref,
    flash_attn_func,
    flash_attn_varlen_func,
    flash_attn_with_kvcache,
    write_kv_cache,
)
from llmkern.ops.rope import (
    apply_rotary_emb,
    rope_cos_sin_cache,
    rope_cos_sin_cache_from_config,
    rope_inv_freq,
    rotary_embedding_,
    rotary_embedding_ref,
)

__all__ = [
    "cpu_isa",
    "set_cpu_isa",
    "supported_cpu_isas",
    "use_cpu_isa",
    "rms_norm",
    "rms_norm_ref",
    "fused_add_rms_norm",
    "fused_add_rms_norm_",
    "fused_add_rms_norm_ref",
    "silu_and_mul",
    "gelu_and_mul",
    "silu_mul",
    "gelu_mul",
    "act_and_mul_ref",
    "act_mul_ref",
    "rotary_embedding_",
    "apply_rotary_emb",
    "rotary_embedding_ref",
    "rope_cos_sin_cache",
    "rope_cos_sin_cache_from_config",
    "rope_inv_freq",
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    "write_kv_cache",
    "attention_ref",
]
