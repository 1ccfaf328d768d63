"""Quantized weight formats: NF4 (bitsandbytes, with double quant), INT4 (group-wise) and INT8 (per row).

Thin, typed wrappers over the llmkern.ops quantize/dequantize kernels: each format is a small dataclass
holding the packed tensors, so modules, checkpoints and importers (GPTQ/AWQ) share one description.
The packed layouts are the kernel contract of csrc/kernels/quant.h.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import torch

import llmkern.ops as ops

# bitsandbytes' quantize_4bit blocksizes (functional.py raises ValueError for any other).
NF4_BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
INT4_GROUP_SIZES = (32, 64, 128)
NESTED_BLOCK_SIZE = 256  # bitsandbytes' double quant nests the absmax in blocks of 256
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_float_weight(w: torch.Tensor, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {w.dtype}")


def _check_2d(w: torch.Tensor, name: str = "w") -> None:
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [out_features, in_features], got shape {tuple(w.shape)}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unsupported weight dtype {name!r} (expected one of {sorted(_DTYPE_NAMES)})")
    return _DTYPE_NAMES[name]


# ----------------------------------------------------------------------------------------------- NF4
@dataclass
class NF4Weight:
    """bitsandbytes' NF4 state (QuantState): `packed` uint8 [(numel + 1) // 2, 1] (element 2i in the high
    nibble, blocks over the flattened weight), `absmax` fp32 [nblocks], or uint8 codes of absmax - offset
    when nested (double quant) with `nested_absmax` fp32 [ceil(nblocks / 256)], `nested_code` (the dynamic
    map) and `offset` (fp32 mean of the raw absmax, kept as a Python float)."""

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = 64
    code: torch.Tensor | None = None
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: float | None = None

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = ops.NF4_CODE.to(self.packed.device).clone()
        if self.block_size not in NF4_BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {NF4_BLOCK_SIZES}, got {self.block_size}")
        numel = self.shape.numel()
        nblocks = -(-numel // self.block_size)
        if self.packed.dtype != torch.uint8 or self.packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"packed must be uint8 with {(numel + 1) // 2} elements for shape {tuple(self.shape)}, "
                f"got {self.packed.dtype} with {self.packed.numel()}"
            )
        if self.absmax.numel() != nblocks:
            raise ValueError(f"absmax must have {nblocks} elements (numel {numel} / block_size "
                             f"{self.block_size}), got {self.absmax.numel()}")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise TypeError(f"absmax must be uint8 codes when nested, got {self.absmax.dtype}")
            nnested = -(-nblocks // NESTED_BLOCK_SIZE)
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != nnested:
                raise ValueError(f"nested_absmax must be float32 with {nnested} elements, got "
                                 f"{self.nested_absmax.dtype} with {self.nested_absmax.numel()}")
            if self.nested_code is None:
                self.nested_code = ops.DYNAMIC_CODE.to(self.packed.device).clone()
            if self.offset is None:
                raise ValueError("offset is required when nested_absmax is given")
            self.offset = float(self.offset)
        elif self.absmax.dtype != torch.float32:
            raise TypeError(f"absmax must be float32 (or uint8 with nested_absmax), got {self.absmax.dtype}")

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    def quant_state_dict(self) -> dict:
        """The JSON bitsandbytes stores as `weight.quant_state.bitsandbytes__nf4` (QuantState.as_dict)."""
        d = {"quant_type": "nf4", "blocksize": self.block_size, "dtype": _dtype_name(self.dtype),
             "shape": list(self.shape)}
        if self.double_quant:
            d.update(nested_blocksize=NESTED_BLOCK_SIZE, nested_dtype="float32", nested_offset=self.offset)
        return d

    def to_state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """bitsandbytes' Linear4bit serialization: `weight`, `weight.absmax`, `weight.quant_map`,
        (`weight.nested_absmax`, `weight.nested_quant_map`,) `weight.quant_state.bitsandbytes__nf4`."""
        blob = torch.tensor(list(json.dumps(self.quant_state_dict()).encode()), dtype=torch.uint8)
        sd = {prefix + "weight": self.packed, prefix + "weight.absmax": self.absmax,
              prefix + "weight.quant_map": self.code}
        if self.double_quant:
            sd[prefix + "weight.nested_absmax"] = self.nested_absmax
            sd[prefix + "weight.nested_quant_map"] = self.nested_code
        sd[prefix + "weight.quant_state.bitsandbytes__nf4"] = blob
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "") -> "NF4Weight":
        """Reads what to_state_dict (or bitsandbytes' Linear4bit.state_dict) wrote."""
        blob_key = prefix + "weight.quant_state.bitsandbytes__nf4"
        for key in (prefix + "weight", prefix + "weight.absmax", blob_key):
            if key not in sd:
                raise KeyError(key)  # the missing key, as load_state_dict reports it
        qs = json.loads(bytes(sd[blob_key].cpu().tolist()).decode())
        if qs.get("quant_type") != "nf4":
            raise ValueError(f"{blob_key}: quant_type {qs.get('quant_type')!r} is not 'nf4'")
        nested = "nested_offset" in qs
        if nested and qs.get("nested_blocksize", NESTED_BLOCK_SIZE) != NESTED_BLOCK_SIZE:
            raise ValueError(f"{blob_key}: nested_blocksize {qs['nested_blocksize']} is not {NESTED_BLOCK_SIZE}")
        packed = sd[prefix + "weight"]
        return cls(
            packed=packed, absmax=sd[prefix + "weight.absmax"], shape=torch.Size(qs["shape"]),
            dtype=_dtype_from_name(qs["dtype"]), block_size=int(qs["blocksize"]),
            code=sd.get(prefix + "weight.quant_map"),
            nested_absmax=sd.get(prefix + "weight.nested_absmax") if nested else None,
            nested_code=sd.get(prefix + "weight.nested_quant_map") if nested else None,
            # bitsandbytes' from_dict: torch.tensor(float(v)), an fp32 value; keep it exactly that value.
            offset=float(torch.tensor(float(qs["nested_offset"]), dtype=torch.float32)) if nested else None,
        )


def quantize_nf4(w: torch.Tensor, block_size: int = 64, double_quant: bool = False) -> NF4Weight:
    """== bitsandbytes.functional.quantize_4bit(w, blocksize=block_size, quant_type="nf4",
    compress_statistics=double_quant): the same packed bytes, absmax and nested statistics."""
    _check_float_weight(w)
    if block_size not in NF4_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {NF4_BLOCK_SIZES}, got {block_size}")
    if w.numel() == 0:
        raise ValueError("w must not be empty")
    packed, absmax = ops.quantize_nf4(w.contiguous(), block_size)
    qw = dict(packed=packed, shape=w.shape, dtype=w.dtype, block_size=block_size)
    if not double_quant:
        return NF4Weight(absmax=absmax, **qw)
    # bitsandbytes' compress_statistics: the torch fp32 mean (its reduction order decides the last ulp),
    # then 8-bit blockwise quantization of absmax - offset with the dynamic map, blocks of 256.
    offset = absmax.mean()
    code2 = ops.DYNAMIC_CODE.to(w.device).clone()
    qabsmax, nested_absmax = ops.quantize_blockwise8(absmax - offset, code2, NESTED_BLOCK_SIZE)
    # A meta weight (a model built on the meta device, about to load a quantized checkpoint) has no value.
    value = 0.0 if offset.is_meta else offset.item()
    return NF4Weight(absmax=qabsmax, nested_absmax=nested_absmax, nested_code=code2, offset=value, **qw)


def dequantize_nf4(qw: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """== bitsandbytes.functional.dequantize_4bit (flat-block semantics, as its default backend and CUDA)."""
    if not isinstance(qw, NF4Weight):
        raise TypeError(f"qw must be an NF4Weight (from quantize_nf4), got {type(qw).__name__}")
    return ops.dequantize_nf4(
        qw.packed, qw.absmax, qw.shape, dtype or qw.dtype, qw.block_size, qw.code,
        nested_absmax=qw.nested_absmax, nested_code=qw.nested_code,
        nested_offset=qw.offset if qw.double_quant else 0.0,
    )


# ---------------------------------------------------------------------------------------------- INT4
@dataclass
class Int4Weight:
    """llmkern's int4: `packed` uint8 [N, K/2] (element 2i of a row in the high nibble), `scales` [N, K/G]
    (float), `zeros` uint8 [N, K/G] or None (symmetric: zero point 8); w = (q - z) * s.
    `perm` (int64 [K] or None): the weight's columns are the input features x[..., perm] (GPTQ act-order
    sorts K by group), so y = x[..., perm] @ W.T."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    group_size: int
    perm: torch.Tensor | None = None

    def __post_init__(self):
        if self.group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {self.group_size}")
        if self.packed.dtype != torch.uint8 or self.packed.dim() != 2:
            raise TypeError(f"packed must be uint8 [N, K/2], got {self.packed.dtype} {tuple(self.packed.shape)}")
        n, k = self.shape
        if self.scales.dtype not in _FLOAT_DTYPES or tuple(self.scales.shape) != (n, k // self.group_size):
            raise ValueError(f"scales must be float [{n}, {k // self.group_size}] (K {k} / group_size "
                             f"{self.group_size}), got {self.scales.dtype} {tuple(self.scales.shape)}")
        if self.zeros is not None and (self.zeros.dtype != torch.uint8 or self.zeros.shape != self.scales.shape):
            raise ValueError(f"zeros must be uint8 {tuple(self.scales.shape)}, got "
                             f"{self.zeros.dtype} {tuple(self.zeros.shape)}")
        if self.perm is not None and tuple(self.perm.shape) != (k,):
            raise ValueError(f"perm must have shape ({k},), got {tuple(self.perm.shape)}")

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.packed.shape[0], self.packed.shape[1] * 2))

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int4(self, dtype)


def quantize_int4(w: torch.Tensor, group_size: int = 128, symmetric: bool = True) -> Int4Weight:
    """Round-to-nearest group-wise int4 of w [N, K] (K divisible by group_size); scales in w's dtype."""
    _check_float_weight(w)
    _check_2d(w)
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if w.shape[1] % group_size:
        raise ValueError(f"in_features (K = {w.shape[1]}) must be divisible by group_size {group_size}")
    packed, scales, zeros = ops.quantize_int4(w.contiguous(), group_size, symmetric)
    return Int4Weight(packed, scales, zeros, group_size)


def dequantize_int4(qw: Int4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The float weight [N, K] in the original input-feature order (undoing perm)."""
    if not isinstance(qw, Int4Weight):
        raise TypeError(f"qw must be an Int4Weight, got {type(qw).__name__}")
    w = ops.dequantize_int4(qw.packed, qw.scales, qw.zeros, qw.group_size, dtype)
    if qw.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, qw.perm] = w
    return out


# ---------------------------------------------------------------------------------------------- INT8
@dataclass
class Int8Weight:
    """Per-output-channel int8: q int8 [N, K], scales [N] (float); w = q * s."""

    q: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self):
        if self.q.dtype != torch.int8 or self.q.dim() != 2:
            raise TypeError(f"q must be int8 [N, K], got {self.q.dtype} {tuple(self.q.shape)}")
        if self.scales.dtype not in _FLOAT_DTYPES or tuple(self.scales.shape) != (self.q.shape[0],):
            raise ValueError(f"scales must be float [{self.q.shape[0]}], got {self.scales.dtype} "
                             f"{tuple(self.scales.shape)}")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_int8(self, dtype)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric per-row int8 of w [N, K]: s = max|w| / 127 (in w's dtype), q = round(w / s)."""
    _check_float_weight(w)
    _check_2d(w)
    q, scales = ops.quantize_int8(w.contiguous())
    return Int8Weight(q, scales)


def dequantize_int8(qw: Int8Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    if not isinstance(qw, Int8Weight):
        raise TypeError(f"qw must be an Int8Weight, got {type(qw).__name__}")
    return ops.dequantize_int8(qw.q, qw.scales, dtype)


def with_device(qw, device):
    """A copy of a weight dataclass with every tensor moved to `device`."""
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(qw).items()}
    return replace(qw, **moved)
