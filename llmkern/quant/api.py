"""Quantization configs and `quantize_(model, config, filter_fn=None)` (in place, as pytorch/ao's quant_api)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

from torch import nn

from llmkern.quant.formats import INT4_GROUP_SIZES, NF4_BLOCK_SIZES
from llmkern.quant.modules import Int4Linear, Int8Linear, NF4Linear


@dataclass(frozen=True)
class NF4Config:
    """bitsandbytes NF4: block_size over the flattened weight; double_quant = compress_statistics."""

    block_size: int = 64
    double_quant: bool = True

    def __post_init__(self):
        if self.block_size not in NF4_BLOCK_SIZES:
            raise ValueError(f"NF4Config.block_size must be one of {NF4_BLOCK_SIZES}, got {self.block_size}")
        if not isinstance(self.double_quant, bool):
            raise TypeError(f"NF4Config.double_quant must be a bool, got {self.double_quant!r}")

    def unsupported(self, linear: nn.Linear) -> str | None:
        return None  # NF4 blocks run over the flattened weight: any shape works

    def convert(self, linear: nn.Linear) -> nn.Module:
        return NF4Linear.from_linear(linear, self.block_size, self.double_quant)


@dataclass(frozen=True)
class Int4Config:
    """Group-wise int4 (round to nearest), symmetric (zero point 8) or with per-group zero points."""

    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"Int4Config.group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"Int4Config.symmetric must be a bool, got {self.symmetric!r}")

    def unsupported(self, linear: nn.Linear) -> str | None:
        if linear.in_features % self.group_size:
            return f"in_features {linear.in_features} is not divisible by group_size {self.group_size}"
        return None

    def convert(self, linear: nn.Linear) -> nn.Module:
        return Int4Linear.from_linear(linear, self.group_size, self.symmetric)


@dataclass(frozen=True)
class Int8Config:
    """Weight-only int8, one scale per output channel."""

    def unsupported(self, linear: nn.Linear) -> str | None:
        return None

    def convert(self, linear: nn.Linear) -> nn.Module:
        return Int8Linear.from_linear(linear)


QuantConfig = NF4Config | Int4Config | Int8Config


def output_heads(model: nn.Module) -> set[str]:
    """Qualified names of the output head Linear(s): `model.get_output_embeddings()` when the model has
    it (transformers models), every Linear whose weight shares storage with an nn.Embedding's weight (a
    tied head), and every Linear named `lm_head` (any depth). Not "the last Linear": in a bare block that
    is an ordinary projection."""
    heads = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    emb_ptrs = {m.weight.untyped_storage().data_ptr() for m in model.modules() if isinstance(m, nn.Embedding)}
    emb_ptrs.discard(0)  # meta / empty tensors have no storage to share
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear):
            continue
        if m is out_emb or name.rsplit(".", 1)[-1] == "lm_head" or m.weight.untyped_storage().data_ptr() in emb_ptrs:
            heads.add(name)
    return heads


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` accepted by filter_fn(module, qualified_name) with
    its quantized module (NF4Linear / Int4Linear / Int8Linear per config) and return the model.

    Default filter: every nn.Linear except the output head (see output_heads) and nn.MultiheadAttention's
    out_proj (which that module never calls). Shapes the format cannot
    take (Int4: in_features not divisible by group_size) are skipped with a warning naming the layer
    under the default filter, and refused with a ValueError naming it when filter_fn asked for them."""
    if not isinstance(config, (NF4Config, Int4Config, Int8Config)):
        raise TypeError(f"config must be NF4Config, Int4Config or Int8Config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if filter_fn is None:
        heads = output_heads(model)
        # nn.MultiheadAttention reads its out_proj.weight directly (never calls the module): leave it.
        chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in heads
                  and not isinstance(m, nn.modules.linear.NonDynamicallyQuantizableLinear)]
    else:
        chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and filter_fn(m, n)]
    if isinstance(model, nn.Linear) and chosen and chosen[0][0] == "":
        raise ValueError("quantize_ replaces submodules in place: wrap a bare nn.Linear in a module first")
    for name, linear in chosen:
        why = config.unsupported(linear)
        if why is not None:
            if filter_fn is not None:
                raise ValueError(f"cannot quantize layer {name!r} with {config}: {why}")
            warnings.warn(f"quantize_: skipping layer {name!r} ({why})", stacklevel=2)
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, config.convert(linear))
    return model
