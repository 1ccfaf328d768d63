"""Quantized checkpoints: `quantization_config` in config.json.

- GPTQ and AWQ: 4-bit linears stored as `<linear>.qweight` / `.qzeros` / `.scales` (/ `.g_idx` for GPTQ)
  instead of `<linear>.weight`. Each becomes an Int4Linear through llmkern.quant's lossless import
  (from_gptq / from_awq). Tensor layouts: llmkern/quant/gptq_awq.py.
- llmkern's own (`python -m llmkern.quant`, quant_method "llmkern"): the listed linears stored as the state
  dict of their NF4Linear / Int4Linear / Int8Linear. The meta model gets the same module tree from
  `quantize_` with the recorded config, so the checkpoint then loads like a dense one.
Everything else (embeddings, norms, the head, biases) loads densely.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llmkern.quant import Int4Config, Int4Linear, Int8Config, NF4Config, from_awq, from_gptq, quantize_

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


@dataclass(frozen=True)
class LlmkernFormat:
    """A checkpoint written by `python -m llmkern.quant` (llmkern/quant/convert.py documents the keys)."""

    config: NF4Config | Int4Config | Int8Config
    modules: tuple[str, ...]  # the quantized linears' qualified names
    method: str = "llmkern"

    def quantize_meta_model(self, model: nn.Module, source: str) -> None:
        """Replaces the listed linears of the (meta) model with their quantized modules, so its state dict
        names and shapes are the checkpoint's."""
        linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        unknown = [n for n in self.modules if n not in linears]
        if unknown:
            raise ValueError(f"{source}: quantization_config: modules: {unknown[0]!r} is not a linear of the "
                             f"model ({len(unknown)} such)")
        wanted = set(self.modules)
        try:
            quantize_(model, self.config, filter_fn=lambda m, name: name in wanted)
        except ValueError as e:
            raise ValueError(f"{source}: quantization_config: {e}") from None


_LLMKERN_KEYS = {"nf4": {"block_size", "double_quant"}, "int4": {"group_size", "symmetric"}, "int8": set()}
_LLMKERN_CONFIGS = {"nf4": NF4Config, "int4": Int4Config, "int8": Int8Config}


def _llmkern_format(qc: dict) -> LlmkernFormat:
    fmt = qc.get("format")
    if fmt not in _LLMKERN_CONFIGS:
        raise ValueError(f"format: expected one of {sorted(_LLMKERN_CONFIGS)}, got {fmt!r}")
    modules = qc.get("modules")
    if not (isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise ValueError(f"modules: expected a list of module names, got {modules!r}")
    # The dataclasses check the values (NF4Config: block size; Int4Config: group size; bool flags).
    config = _LLMKERN_CONFIGS[fmt](**{k: qc[k] for k in _LLMKERN_KEYS[fmt] if k in qc})
    return LlmkernFormat(config, tuple(modules))


def read_quantization_config(extra: dict, source: str) -> PrequantizedFormat | LlmkernFormat | None:
    """The format of config.json's quantization_config (None without one); errors name `source`."""
    qc = extra.get("quantization_config")
    if qc is None:
        return None
    try:
        if not isinstance(qc, dict):
            raise ValueError(f"expected a JSON object, got {qc!r}")
        method = qc.get("quant_method")
        if method == "llmkern":
            return _llmkern_format(qc)
        if qc.get("bits", 4) != 4:
            raise ValueError(f"bits: only 4-bit {method} checkpoints are supported, got {qc.get('bits')!r}")
        if method == "awq" and qc.get("version", "gemm").lower() != "gemm":
            raise ValueError(f"version: only AWQ 'gemm' checkpoints are supported, got {qc.get('version')!r}")
        if method == "gptq" and qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
            raise ValueError(f"checkpoint_format: expected 'gptq' or 'gptq_v2', got {qc['checkpoint_format']!r}")
        return PrequantizedFormat(method, qc.get("group_size", 128), qc.get("checkpoint_format", "gptq"))
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{source}: quantization_config: {e}") from None
