"""Quantized linear layers: NF4Linear, Int4Linear, Int8Linear (nn.Module, forward = llmkern.ops).

Each holds its packed weight as buffers (not parameters: optimizers never see them and they get no
gradient; x and bias do, so LoRA adapters on top train as in QLoRA). `state_dict` keys:
- NF4Linear: bitsandbytes' Linear4bit keys, so the two load each other's state dicts:
  `weight` (uint8 [(N*K+1)//2, 1]), `weight.absmax`, `weight.quant_map`, (`weight.nested_absmax`,
  `weight.nested_quant_map` with double quant), `weight.quant_state.bitsandbytes__nf4` (JSON), `bias`.
- Int4Linear: `weight` (uint8 [N, K/2]), `scales` [N, K/G], `zeros` (uint8 [N, K/G], asymmetric only),
  `perm` (int64 [K], GPTQ act-order only), `bias`. The group size is K / scales.shape[1].
- Int8Linear: `weight` (int8 [N*K], the row-major codes flattened), `scales` [N], `bias`. Flat so that a loader
  that does not know the format (transformers skips quant_method "llmkern") fails on the shape instead of
  reading the codes as an nn.Linear weight.
`.to(dtype)` / `.half()` move the quantized state between devices but never cast it (only the bias).
`load_state_dict` takes the layout from the state dict (block size, double quant, group size,
symmetric, perm may differ from the module's), checks it against in/out features and replaces the buffers
(with assign=True, as loading into a meta-device model, by the loaded tensors themselves).
"""

from __future__ import annotations

import torch
from torch import nn

import llmkern.ops as ops
from llmkern.quant import formats as F


class _QuantLinear(nn.Module):
    """Shared buffer plumbing. Subclasses define _weight() -> dataclass and _set_weight(dataclass)."""

    in_features: int
    out_features: int

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def _apply(self, fn, recurse=True):
        """Moves the quantized state between devices but never casts it: `.to(torch.bfloat16)` / `.half()`
        would round scales and absmax (and break the uint8/int8 codes' meaning). The bias follows fn."""
        state = {k: v for k, v in self._buffers.items() if v is not None}
        for k in state:
            self._buffers[k] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for k, t in state.items():
                probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
                self._buffers[k] = fn(t) if probe.dtype == t.dtype else t.to(probe.device)
        return self

    def _bias_for(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight [out_features, in_features] these buffers encode."""
        return self._weight().dequantize(dtype)

    # state_dict: subclasses map their weight dataclass to keys (_to_sd) and back (_from_sd).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self._to_sd().items():
            destination[prefix + key] = t if keep_vars else t.detach()
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        try:
            qw = self._from_sd(own)
        except KeyError as e:
            missing_keys.append(prefix + str(e.args[0]).strip("'"))
            return
        except (ValueError, TypeError) as e:
            error_msgs.append(f"{prefix or 'module'}: {e}")
            return
        if tuple(qw.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"{prefix or 'module'}: weight shape {tuple(qw.shape)} does not match "
                              f"[out_features, in_features] = [{self.out_features}, {self.in_features}]")
            return
        # load_state_dict(assign=True) (a model built on the meta device): take the loaded tensors as they
        # are; otherwise they move to this module's device (and the bias is copied into the parameter).
        assign = local_metadata.get("assign_to_params_buffers", False)
        self._set_weight(qw if assign else F.with_device(qw, self.weight.device))
        if self.bias is not None:
            if "bias" not in own:
                missing_keys.append(prefix + "bias")
            elif assign:
                self.bias = nn.Parameter(own["bias"], requires_grad=self.bias.requires_grad)
            else:
                with torch.no_grad():
                    self.bias.copy_(own["bias"])
        known = set(self._to_sd()) | ({"bias"} if self.bias is not None else set())
        unexpected_keys.extend(prefix + k for k in own if k not in known)

    def _set_buffers(self, **tensors):
        for name, t in tensors.items():
            self._buffers[name] = None if t is None else t.detach()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class NF4Linear(_QuantLinear):
    """y = x @ W.T + b with W in bitsandbytes' NF4 (optionally double-quantized) format."""

    def __init__(self, weight: F.NF4Weight, bias: torch.Tensor | None = None):
        if len(weight.shape) != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight, got shape {tuple(weight.shape)}")
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self._set_weight(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, block_size: int = 64, double_quant: bool = True) -> "NF4Linear":
        qw = F.quantize_nf4(linear.weight.detach(), block_size, double_quant)
        return cls(qw, linear.bias)

    def _set_weight(self, qw: F.NF4Weight):
        self.block_size, self.weight_dtype, self.offset = qw.block_size, qw.dtype, qw.offset
        self._set_buffers(weight=qw.packed, weight_absmax=qw.absmax, weight_quant_map=qw.code,
                          weight_nested_absmax=qw.nested_absmax, weight_nested_quant_map=qw.nested_code)

    def _weight(self) -> F.NF4Weight:
        return F.NF4Weight(self.weight, self.weight_absmax, (self.out_features, self.in_features),
                           self.weight_dtype, self.block_size, self.weight_quant_map,
                           self.weight_nested_absmax, self.weight_nested_quant_map, self.offset)

    def _to_sd(self):
        return self._weight().to_state_dict()

    def _from_sd(self, sd):
        return F.NF4Weight.from_state_dict(sd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nested = self.weight_nested_absmax is not None
        return ops.nf4_linear(
            x, self.weight, self.weight_absmax, self.out_features, self.block_size, self.weight_quant_map,
            bias=self._bias_for(x), nested_absmax=self.weight_nested_absmax,
            nested_code=self.weight_nested_quant_map, nested_offset=self.offset if nested else 0.0,
        )

    def extra_repr(self) -> str:
        dq = self.weight_nested_absmax is not None
        return f"{super().extra_repr()}, block_size={self.block_size}, double_quant={dq}, dtype={self.weight_dtype}"


class Int4Linear(_QuantLinear):
    """y = x[..., perm] @ W.T + b with W group-wise int4 (llmkern layout; from RTN, GPTQ or AWQ)."""

    def __init__(self, weight: F.Int4Weight, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self._set_weight(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, symmetric: bool = True) -> "Int4Linear":
        return cls(F.quantize_int4(linear.weight.detach(), group_size, symmetric), linear.bias)

    def _set_weight(self, qw: F.Int4Weight):
        self.group_size = qw.group_size
        self._set_buffers(weight=qw.packed, scales=qw.scales, zeros=qw.zeros, perm=qw.perm)

    def _weight(self) -> F.Int4Weight:
        return F.Int4Weight(self.weight, self.scales, self.zeros, self.group_size, self.perm)

    def _to_sd(self):
        sd = {"weight": self.weight, "scales": self.scales}
        sd.update({k: v for k, v in (("zeros", self.zeros), ("perm", self.perm)) if v is not None})
        return sd

    def _from_sd(self, sd):
        w, s = sd["weight"], sd["scales"]
        if w.dim() != 2 or s.dim() != 2 or s.shape[1] == 0 or (w.shape[1] * 2) % s.shape[1]:
            raise ValueError(f"weight {tuple(w.shape)} and scales {tuple(s.shape)} do not describe int4 groups")
        perm = sd.get("perm")
        return F.Int4Weight(w, s, sd.get("zeros"), w.shape[1] * 2 // s.shape[1], None if perm is None else perm.long())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return ops.int4_linear(x, self.weight, self.scales, self.zeros, self.group_size, bias=self._bias_for(x))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, group_size={self.group_size}, symmetric={self.zeros is None}, "
                f"act_order={self.perm is not None}")


class Int8Linear(_QuantLinear):
    """y = x @ W.T + b with W per-output-channel int8."""

    def __init__(self, weight: F.Int8Weight, bias: torch.Tensor | None = None):
        super().__init__(weight.shape[1], weight.shape[0], bias)
        self._set_weight(weight)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(F.quantize_int8(linear.weight.detach()), linear.bias)

    def _set_weight(self, qw: F.Int8Weight):
        self._set_buffers(weight=qw.q, scales=qw.scales)

    def _weight(self) -> F.Int8Weight:
        return F.Int8Weight(self.weight, self.scales)

    def _to_sd(self):
        return {"weight": self.weight.reshape(-1), "scales": self.scales}

    def _from_sd(self, sd):
        w, s = sd["weight"], sd["scales"]
        if w.dim() != 1 or s.dim() != 1 or s.numel() == 0 or w.numel() % s.numel():
            raise ValueError(f"weight {tuple(w.shape)} and scales {tuple(s.shape)} do not describe int8 rows "
                             f"(expected weight [N*K] and scales [N])")
        return F.Int8Weight(w.view(s.numel(), w.numel() // s.numel()), s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.int8_linear(x, self.weight, self.scales, bias=self._bias_for(x))
