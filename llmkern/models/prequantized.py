"""GPTQ and AWQ checkpoints: `quantization_config` in config.json, 4-bit linears stored as
`<linear>.qweight` / `.qzeros` / `.scales` (/ `.g_idx` for GPTQ) instead of `<linear>.weight`.

Each such linear becomes an Int4Linear through llmkern.quant's lossless import (from_gptq / from_awq);
everything else (embeddings, norms, the head, biases) loads densely. Tensor layouts: llmkern/quant/gptq_awq.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmkern.quant import Int4Linear, from_awq, from_gptq

QUANT_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


@dataclass(frozen=True)
class PrequantizedFormat:
    method: str  # "gptq" | "awq"
    group_size: int  # -1: one group over all of in_features
    checkpoint_format: str = "gptq"  # GPTQ: "gptq" (v1, zeros stored minus one) | "gptq_v2"

    def __post_init__(self):
        if self.method not in ("gptq", "awq"):
            raise ValueError(f"quant_method: expected 'gptq' or 'awq', got {self.method!r}")
        if not (isinstance(self.group_size, int) and (self.group_size > 0 or self.group_size == -1)):
            raise ValueError(f"group_size: expected a positive int or -1, got {self.group_size!r}")

    def tensor_shapes(self, linear: nn.Linear, has_g_idx: bool) -> dict[str, tuple[int, ...]]:
        """The stored tensors of one linear (K = in_features, N = out_features, G groups) and their shapes."""
        k, n = linear.in_features, linear.out_features
        g = 1 if self.group_size == -1 else -(-k // self.group_size)
        if self.method == "awq":
            return {"qweight": (k, n // 8), "qzeros": (g, n // 8), "scales": (g, n)}
        shapes = {"qweight": (k // 8, n), "qzeros": (g, n // 8), "scales": (g, n)}
        return {**shapes, "g_idx": (k,)} if has_g_idx else shapes

    def to_int4_linear(self, tensors: dict, bias) -> Int4Linear:
        if self.method == "awq":
            qw = from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], self.group_size)
        else:
            qw = from_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors.get("g_idx"),
                           group_size=self.group_size, checkpoint_format=self.checkpoint_format)
        return Int4Linear(qw, bias)


def read_quantization_config(extra: dict, source: str) -> PrequantizedFormat | None:
    """The format of config.json's quantization_config (None without one); errors name `source`."""
    qc = extra.get("quantization_config")
    if qc is None:
        return None
    try:
        method = qc.get("quant_method")
        if qc.get("bits", 4) != 4:
            raise ValueError(f"bits: only 4-bit {method} checkpoints are supported, got {qc.get('bits')!r}")
        if method == "awq" and qc.get("version", "gemm").lower() != "gemm":
            raise ValueError(f"version: only AWQ 'gemm' checkpoints are supported, got {qc.get('version')!r}")
        if method == "gptq" and qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
            raise ValueError(f"checkpoint_format: expected 'gptq' or 'gptq_v2', got {qc['checkpoint_format']!r}")
        return PrequantizedFormat(method, qc.get("group_size", 128), qc.get("checkpoint_format", "gptq"))
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{source}: quantization_config: {e}") from None
