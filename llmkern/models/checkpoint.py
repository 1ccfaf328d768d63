"""Hugging Face checkpoints in and out: `load_model(path, ...)` and `save_pretrained(model, dir)`.

Loading builds the model on the meta device, checks every tensor's name and shape against the safetensors
headers before reading any data (so a bad checkpoint fails fast, naming the file and the tensor, and
nothing half-loaded is ever returned), then reads tensor by tensor through safe_open's mmap, so the peak
is the weights plus one tensor in flight. Pickled `.bin` weights are refused: unpickling runs code.
Quantized checkpoints (GPTQ, AWQ, `python -m llmkern.quant`): llmkern/models/prequantized.py.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from llmkern.models.config import ModelConfig
from llmkern.models.llama import LlamaForCausalLM
from llmkern.models.prequantized import (QUANT_SUFFIXES, LlmkernFormat, PrequantizedFormat,
                                         read_quantization_config)
from llmkern.quant import Int4Config, Int4Linear, Int8Config, Int8Linear, NF4Config, NF4Linear, quantize_

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
QUANT_CONFIGS = {"nf4": NF4Config, "int4": Int4Config, "int8": Int8Config}
# Tensors older checkpoints carry that the model recomputes (rope inverse frequencies).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# NF4Linear's quant-state JSON (uint8 bytes): its length depends on the values written, not on the shapes.
_ANY_SHAPE_SUFFIXES = (".weight.quant_state.bitsandbytes__nf4",)


def _weight_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json (sharded) or model.safetensors."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: malformed index, expected JSON with a 'weight_map' object ({e!r})") from None
        return {name: path / file for name, file in weight_map.items()}
    single = path / SINGLE_FILE
    if single.exists():
        with _open(single) as f:
            return {name: single for name in f.keys()}
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    if pickled:
        raise ValueError(f"{path}: only pickled weights {pickled} found; llmkern never unpickles checkpoints "
                         f"(it can run code). Convert them to safetensors (transformers: "
                         f"model.save_pretrained(dir, safe_serialization=True)).")
    raise FileNotFoundError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: no such file (listed by the checkpoint's index)") from None
    except SafetensorError as e:
        raise ValueError(f"{file}: not a valid safetensors file (truncated or corrupt?): {e}") from None


def _expected(model: LlamaForCausalLM) -> dict[str, tuple[int, ...] | None]:
    """Tensor name -> shape the checkpoint must hold (None: any shape)."""
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")  # shares model.embed_tokens.weight; transformers does not save it
    return {name: None if name.endswith(_ANY_SHAPE_SUFFIXES) else tuple(t.shape) for name, t in sd.items()}


def _check(files: dict[str, Path], expected: dict[str, tuple[int, ...] | None], handles: dict[Path, object]) -> None:
    """Every expected tensor present with its shape; no unexpected ones. Reads headers only."""
    for name, shape in expected.items():
        if name not in files:
            where = ", ".join(sorted({str(f) for f in files.values()})) or "the checkpoint"
            raise ValueError(f"{where}: missing tensor {name!r}" + (f" (shape {list(shape)})" if shape else ""))
        file = files[name]
        f = handles.setdefault(file, _open(file))
        if name not in f.keys():
            raise ValueError(f"{file}: missing tensor {name!r} (the index maps it to this file)")
        got = tuple(f.get_slice(name).get_shape())
        if shape is not None and got != shape:
            # int8 codes were stored [N, K] before they were flattened (so that transformers refuses the checkpoint)
            old_int8 = len(shape) == 1 and len(got) == 2 and got[0] * got[1] == shape[0]
            raise ValueError(f"{file}: tensor {name!r} has shape {list(got)}, the config needs {list(shape)}"
                             + (" (an int8 checkpoint from an older llmkern: convert the original checkpoint again "
                                "with `python -m llmkern.quant`)" if old_int8 else ""))
    tied = "lm_head.weight"  # a tied head's copy in the file (equal to the embeddings: load_model checks)
    extra = [n for n in files if n not in expected and n != tied and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise ValueError(f"{files[extra[0]]}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all; "
                         f"a quantized checkpoint needs quantization_config in config.json)")


def _stored_head_differs(files: dict[str, Path], handles: dict[Path, object]) -> bool:
    """Whether the checkpoint holds an output head other than its embeddings (a tied model saves none, or a copy)."""
    names = ("lm_head.weight", "model.embed_tokens.weight")
    if not all(n in files for n in names):
        return False
    head, embed = (handles.setdefault(files[n], _open(files[n])).get_tensor(n) for n in names)
    return head.shape != embed.shape or not torch.equal(head, embed)


def _drop_pages(t: torch.Tensor) -> None:
    """Drops t's pages from this process (madvise MADV_DONTNEED) once it has been copied. t is a tensor
    safe_open returned, a view of the read-only file mapping: its touched pages count in the resident set
    until the file is closed, which would put a dtype-converting load at file size + weights (measured 3.3x
    the bf16 weights when loading a float32 file). Dropped clean file pages are re-read if touched again;
    only whole pages inside t are dropped, so no other tensor is affected."""
    if sys.platform != "linux" or t.device.type != "cpu" or not t.nbytes:
        return
    start = -(-t.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (t.data_ptr() + t.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), 4)  # 4: MADV_DONTNEED


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _read(handle, name: str, dtype: torch.dtype | None, device) -> torch.Tensor:
    """The tensor in dtype on device. A same-dtype CPU tensor stays a zero-copy view of the mapping; any
    other is converted in row chunks whose source pages are dropped as they are done, so the peak is the
    loaded weights plus one chunk (a whole float32 embedding read for bf16 would add 1/2 the weights)."""
    src = handle.get_tensor(name)
    dtype = src.dtype if dtype is None else dtype
    if src.dtype == dtype and torch.device(device).type == "cpu":
        return src
    out = torch.empty(src.shape, dtype=dtype, device=device)
    if src.dim() == 0:
        return out.copy_(src)
    rows = max(1, _CHUNK_BYTES // max(1, src[0].nbytes))
    for i in range(0, src.shape[0], rows):
        out[i : i + rows].copy_(src[i : i + rows])
        _drop_pages(src[i : i + rows])
    return out


_CHUNK_BYTES = 4 << 20


def _prequantized_linears(model, files, prequant: PrequantizedFormat,
                          expected: dict[str, tuple[int, ...] | None]) -> list[str]:
    """Names of the linears a GPTQ/AWQ checkpoint stores quantized (those with a `.qweight`); their
    `.weight` leaves `expected` and their stored tensors join it."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and f"{n}.qweight" in files]
    for name in names:
        expected.pop(f"{name}.weight")
        linear = model.get_submodule(name)
        for suffix, shape in prequant.tensor_shapes(linear, f"{name}.g_idx" in files).items():
            expected[f"{name}.{suffix}"] = shape
    return names


def _quantized_owner(name: str, quantized: set[str]) -> str | None:
    """The quantized linear whose stored tensor `name` is, but its bias (None for any other tensor)."""
    for i, c in enumerate(name):
        if c == "." and name[:i] in quantized:
            return None if name[i + 1:] == "bias" else name[:i]
    return None


def _quant_config(quant):
    if quant is None or isinstance(quant, (NF4Config, Int4Config, Int8Config)):
        return quant
    if quant not in QUANT_CONFIGS:
        raise ValueError(f"quant: expected one of {sorted(QUANT_CONFIGS)} or a quant config, got {quant!r}")
    return QUANT_CONFIGS[quant]()


def load_model(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               quant=None) -> LlamaForCausalLM:
    """The model of a Hugging Face directory (config.json + safetensors), in `dtype` (default: config.json's
    dtype, else float32) on `device`; quant "nf4" | "int4" | "int8" (or a llmkern.quant config) quantizes
    every linear but the output head after loading (llmkern.quant.quantize_). GPTQ / AWQ checkpoints
    (quantization_config in config.json) load their 4-bit linears as Int4Linear directly; checkpoints written
    by `python -m llmkern.quant` load their NF4Linear / Int4Linear / Int8Linear state as stored (bit-equal
    to quantizing the original at load time), their quantized tensors kept in their stored dtypes.
    Weights already in `dtype` on the CPU are copy-on-write views of the file's private mapping: reading
    costs no copy, an in-place update (training) copies only the pages it writes, the file never changes."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a model directory")
    config = ModelConfig.from_json(path / "config.json")
    quant = _quant_config(quant)
    dtype = dtype or config.weight_dtype() or torch.float32
    prequant = read_quantization_config(config.extra, str(path / "config.json"))
    if prequant is not None and quant is not None:
        raise ValueError(f"quant: {path} is already a {prequant.method} checkpoint; pass quant=None")
    files = _weight_files(path)
    handles: dict[Path, object] = {}
    if config.tie_word_embeddings and _stored_head_differs(files, handles):
        warnings.warn(f"{files['lm_head.weight']}: 'lm_head.weight' differs from 'model.embed_tokens.weight' although "
                      f"config.json ties them: loading them untied, as transformers does", stacklevel=2)
        config = config.with_(tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    if isinstance(prequant, LlmkernFormat):
        prequant.quantize_meta_model(model, str(path / "config.json"))
    expected = _expected(model)
    gptq_awq = isinstance(prequant, PrequantizedFormat)
    qlinears = _prequantized_linears(model, files, prequant, expected) if gptq_awq else []
    own_quantized = list(prequant.modules) if isinstance(prequant, LlmkernFormat) else []
    _check(files, expected, handles)
    quantized = set(qlinears) | set(own_quantized)
    state = {}
    for name in expected:  # quantized tensors (codes, scales, absmax) keep their stored dtype; biases do not
        keep = _quantized_owner(name, quantized) is not None
        state[name] = _read(handles[files[name]], name, None if keep else dtype, device)
    for name in own_quantized:  # each module checks its own state dict (layout vs in/out features)
        own = {k[len(name) + 1:]: state.pop(k) for k in list(state) if k.startswith(name + ".")}
        try:
            model.get_submodule(name).load_state_dict(own, assign=True)
        except RuntimeError as e:
            raise ValueError(f"{files[name + '.weight']}: {name}: {e}") from None
    model.load_state_dict(state, strict=False, assign=True)
    for name in qlinears:
        tensors = {s: state[f"{name}.{s}"] for s in QUANT_SUFFIXES if f"{name}.{s}" in state}
        try:
            layer = prequant.to_int4_linear(tensors, state.get(f"{name}.bias"))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{files[name + '.qweight']}: {name}: {e}") from None
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    model.tie_weights()
    model.init_buffers(device)
    if quant is not None:
        quantize_(model, quant)
    return model.eval()


def save_pretrained(model: LlamaForCausalLM, directory: str | Path) -> None:
    """config.json + model.safetensors that transformers' AutoModelForCausalLM.from_pretrained loads."""
    if any(isinstance(m, (NF4Linear, Int4Linear, Int8Linear)) for m in model.modules()):
        raise ValueError("save_pretrained: the model is quantized; save the unquantized model, or convert the "
                         "checkpoint with `python -m llmkern.quant`")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    dtype = next(iter(sd.values())).dtype
    cfg = {**model.config.to_hf_dict(), "dtype": str(dtype).removeprefix("torch.")}
    cfg.pop("torch_dtype", None)
    # Written aside, then renamed over: a model loaded from this directory may still be reading the old
    # file through its mapping (truncating a mapped file in place would crash it with SIGBUS).
    tmp = directory / (SINGLE_FILE + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / SINGLE_FILE)
    (directory / INDEX_FILE).unlink(missing_ok=True)  # a stale shard index would take precedence
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
