"""llmkern.ops: the public kernel surface, one module per op family."""

from llmkern.ops.cpu import cpu_isa, set_cpu_isa, supported_cpu_isas, use_cpu_isa
from llmkern.ops.norm import fused_add_rms_norm, fused_add_rms_norm_, fused_add_rms_norm_ref, rms_norm, rms_norm_ref

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
]
