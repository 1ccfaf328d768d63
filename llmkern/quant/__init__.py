"""llmkern.quant: weight-only quantization (NF4 bitsandbytes-compatible, INT4 with GPTQ/AWQ import, INT8).

    quantize_(model, NF4Config())            # every nn.Linear but the output head -> NF4Linear
    quantize_nf4(w) / dequantize_nf4(qw)     # == bitsandbytes quantize_4bit / dequantize_4bit (nf4)
    from_gptq(...) / from_awq(...)           # Hub 4-bit checkpoint tensors -> Int4Weight
    python -m llmkern.quant SRC --format nf4 # convert a checkpoint directory
"""

from llmkern.quant.formats import (
    Int4Weight,
    Int8Weight,
    NF4Weight,
    dequantize_int4,
    dequantize_int8,
    dequantize_nf4,
    quantize_int4,
    quantize_int8,
    quantize_nf4,
)
from llmkern.quant.gptq_awq import from_awq, from_gptq
from llmkern.quant.modules import Int4Linear, Int8Linear, NF4Linear
from llmkern.quant.api import Int4Config, Int8Config, NF4Config, output_heads, quantize_

__all__ = [
    "NF4Weight",
    "Int4Weight",
    "Int8Weight",
    "quantize_nf4",
    "dequantize_nf4",
    "quantize_int4",
    "dequantize_int4",
    "quantize_int8",
    "dequantize_int8",
    "from_gptq",
    "from_awq",
    "NF4Linear",
    "Int4Linear",
    "Int8Linear",
    "NF4Config",
    "Int4Config",
    "Int8Config",
    "quantize_",
    "output_heads",
]
