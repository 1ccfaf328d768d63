"""Convert a Hugging Face checkpoint directory (config.json + *.safetensors, with or without
model.safetensors.index.json) to a quantized one: `python -m llmkern.quant SRC [--out DST] --format ...`.

Which weights: a tensor `<module>.weight` that is 2-D and floating, whose module's last name component
matches --include (default `LINEAR_PATTERN`: ends in `proj` or `fc`, `fc1`, `fc_in`, ... as q_proj,
gate_proj, down_proj, c_fc), and whose name has no `embed`, `norm`, `lm_head` component. It is assumed to
be an nn.Linear weight [out_features, in_features]. Each chosen weight is replaced by the state dict of the
matching llmkern.quant module (NF4Linear: bitsandbytes' keys; Int4Linear; Int8Linear) under the same
module name, so `quantize_(model, config)` + `load_state_dict` reads the result. Int4 weights whose
in_features is not divisible by the group size are left as they are (a warning names them).

The result is written into a sibling directory (.DST.quantizing) and moved into place whole, so an interrupted run
leaves the source as it was and no partial output; --out must be new or an empty directory.

config.json gains
    "quantization_config": {"quant_method": "llmkern", "format": "nf4" | "int4" | "int8",
                            "block_size": 64, "double_quant": true,          # nf4
                            "group_size": 128, "symmetric": true,             # int4
                            "modules": ["model.layers.0.mlp.down_proj", ...], # the converted modules
                            "llmkern_version": "0.1.0"}
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import warnings
from pathlib import Path

import torch

from llmkern.quant.api import Int4Config, Int8Config, NF4Config

LINEAR_PATTERN = r"(proj|fc\d*|fc_in|fc_out)$"
_EXCLUDED = re.compile(r"(^|\.)[^.]*(embed|norm|lm_head)[^.]*(\.|$)")
INDEX_NAME = "model.safetensors.index.json"
# Models built on transformers' Conv1D, which stores its weight [in_features, out_features] (the transpose of
# nn.Linear): converting them by name would quantize the wrong axis, so they are refused.
CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", type=Path, help="checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: convert SRC in place)")
    p.add_argument("--format", required=True, choices=("nf4", "int4", "int8"))
    p.add_argument("--group-size", type=int, default=None,
                   help="nf4: block size (default 64); int4: group size (default 128)")
    p.add_argument("--no-double-quant", action="store_true", help="nf4: keep fp32 absmax (no double quant)")
    p.add_argument("--asymmetric", action="store_true", help="int4: per-group zero points")
    p.add_argument("--include", default=LINEAR_PATTERN,
                   help=f"regex on a module's last name component (default {LINEAR_PATTERN!r})")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace):
    if args.format == "nf4":
        return NF4Config(block_size=args.group_size or 64, double_quant=not args.no_double_quant)
    if args.format == "int4":
        return Int4Config(group_size=args.group_size or 128, symmetric=not args.asymmetric)
    if args.group_size is not None:
        raise ValueError("--group-size does not apply to int8 (one scale per output channel)")
    return Int8Config()


_FLOAT_CODES = ("F32", "BF16", "F16")


def _is_linear(name: str, sl, include: str = LINEAR_PATTERN) -> bool:
    """Whether checkpoint tensor `name` (a safetensors slice) is a Linear weight to quantize (module doc)."""
    if not name.endswith(".weight") or len(sl.get_shape()) != 2 or sl.get_dtype() not in _FLOAT_CODES:
        return False
    module = name[: -len(".weight")]
    return re.search(include, module.rsplit(".", 1)[-1]) is not None and not _EXCLUDED.search(module)


def _quantize_tensor(module: str, w: torch.Tensor, config) -> dict[str, torch.Tensor]:
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
    lin.weight = torch.nn.Parameter(w, requires_grad=False)
    lin.in_features, lin.out_features = w.shape[1], w.shape[0]
    qmod = config.convert(lin)
    return {f"{module}.{k}": v.contiguous() for k, v in qmod.state_dict().items()}


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def _quant_config_dict(config, modules: list[str]) -> dict:
    from llmkern import __version__

    d = {"quant_method": "llmkern"}
    if isinstance(config, NF4Config):
        d.update(format="nf4", block_size=config.block_size, double_quant=config.double_quant)
    elif isinstance(config, Int4Config):
        d.update(format="int4", group_size=config.group_size, symmetric=config.symmetric)
    else:
        d.update(format="int8")
    d.update(modules=modules, llmkern_version=__version__)
    return d


def convert_checkpoint(src, out=None, config=None, include: str = LINEAR_PATTERN, progress: bool = True) -> dict:
    """Quantize checkpoint directory src into out (in place when out is None or src). Returns
    {"size_before", "size_after", "modules", "skipped"} (sizes in bytes of the *.safetensors files)."""
    config = NF4Config() if config is None else config
    src = Path(src)
    dst = Path(out) if out is not None else src
    try:
        re.compile(include)
    except re.error as e:
        raise ValueError(f"--include: not a regular expression ({e}): {include!r}") from None
    cfg_path = src / "config.json"
    if _original(src).exists():
        raise ValueError(f"{_original(src)} exists: an in-place conversion of {src} stopped while swapping the "
                         "directories (the original is there); move it back or away first")
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{src} has no config.json")
    model_cfg = json.loads(cfg_path.read_text())
    if model_cfg.get("model_type") in CONV1D_MODEL_TYPES:
        raise ValueError(f"{src}: model_type {model_cfg['model_type']!r} stores its linear weights transposed "
                         "(transformers Conv1D); converting it is not supported")
    if "quantization_config" in model_cfg:
        raise ValueError(f"{src} is already quantized (config.json has a quantization_config)")
    index = json.loads((src / INDEX_NAME).read_text()) if (src / INDEX_NAME).is_file() else None
    shards = sorted(set(index["weight_map"].values())) if index else sorted(p.name for p in src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{src} has no *.safetensors files")
    size_before = _dir_size(src)
    in_place = dst.resolve() == src.resolve()
    if not in_place and dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"--out: {dst} exists and is not an empty directory (the converter writes a checkpoint of "
                         "its own, never into another)")
    # Everything is written into a sibling directory first and moved into place whole (_finish), so an
    # interrupted run leaves either the old directory or the new one, never a mix that loads.
    stage = dst.parent / f".{dst.name}.quantizing"
    shutil.rmtree(stage, ignore_errors=True)  # what an interrupted run left
    stage.mkdir(parents=True)
    for f in src.iterdir():  # tokenizer, generation config, ...: copied as they are
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX_NAME):
            shutil.copy2(f, stage / f.name)

    try:
        modules, skipped = _write_quantized(src, shards, index, model_cfg, config, include, stage, progress)
    except BaseException:  # an error or Ctrl-C: nothing half-written stays behind
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _finish(stage, dst, in_place)
    return {"size_before": size_before, "size_after": _dir_size(dst), "modules": modules, "skipped": skipped}


def _write_quantized(src: Path, shards: list[str], index: dict | None, model_cfg: dict, config, include: str,
                     stage: Path, progress: bool) -> tuple[list[str], list[str]]:
    """The quantized shards, index and config.json of src, written into stage. -> (modules, skipped)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    total_layers = 0
    for shard in shards:
        with safe_open(src / shard, "pt") as f:
            total_layers += sum(_is_linear(k, f.get_slice(k), include) for k in f.keys())
    modules, skipped, weight_map, total_size = [], [], {}, 0
    bar = tqdm(total=total_layers, desc=f"quantizing to {_quant_config_dict(config, [])['format']}", unit="layer",
               disable=not progress)
    for shard in shards:
        out_tensors = {}
        with safe_open(src / shard, "pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            for name in f.keys():
                if name.endswith(_QUANTIZED_SUFFIXES):
                    raise ValueError(f"{src / shard}: tensor {name!r} is already quantized (a checkpoint changed by "
                                     "a run that did not finish?)")
                if not _is_linear(name, f.get_slice(name), include):
                    out_tensors[name] = f.get_tensor(name)
                    continue
                module = name[: -len(".weight")]
                t = f.get_tensor(name)
                why = config.unsupported(torch.nn.Linear(t.shape[1], t.shape[0], device="meta"))
                if why is not None:
                    warnings.warn(f"llmkern.quant: not quantizing {module!r} ({why})", stacklevel=3)
                    skipped.append(module)
                    out_tensors[name] = t
                    continue
                out_tensors.update(_quantize_tensor(module, t, config))
                modules.append(module)
                bar.update(1)
        save_file(out_tensors, stage / shard, metadata=metadata)
        weight_map.update({k: shard for k in out_tensors})
        total_size += sum(t.numel() * t.element_size() for t in out_tensors.values())
    bar.close()

    if index is not None:
        index = dict(index, weight_map=dict(sorted(weight_map.items())),
                     metadata=dict(index.get("metadata", {}), total_size=total_size))
        (stage / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    model_cfg["quantization_config"] = _quant_config_dict(config, sorted(modules))
    (stage / "config.json").write_text(json.dumps(model_cfg, indent=2, sort_keys=True) + "\n")
    return modules, skipped


# Tensor names only a quantized module writes (NF4Linear / Int4Linear / Int8Linear, GPTQ / AWQ).
_QUANTIZED_SUFFIXES = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", ".quant_state.bitsandbytes__nf4",
                       ".scales", ".qweight", ".qzeros", ".g_idx")


def _original(src: Path) -> Path:
    """Where an in-place conversion puts the original while the converted directory takes its name."""
    return src.parent / f".{src.name}.original"


def _finish(stage: Path, dst: Path, in_place: bool) -> None:
    """Moves the finished stage directory to dst. In place: the original steps aside (_original), the stage takes
    its name, the original's sub-directories move over, then it is deleted."""
    if not in_place:
        if dst.exists():
            dst.rmdir()  # empty (checked before writing)
        stage.rename(dst)
        return
    old = _original(dst)
    dst.rename(old)
    stage.rename(dst)
    for entry in old.iterdir():
        if entry.is_dir():
            entry.rename(dst / entry.name)
    shutil.rmtree(old)


def main(argv: list[str] | None = None, prog: str = "python -m llmkern.quant") -> int:
    p = argparse.ArgumentParser(prog=prog, description="Quantize the Linear weights of a safetensors checkpoint.")
    add_arguments(p)
    return run(p.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        r = convert_checkpoint(args.src, args.out, config, include=args.include, progress=not args.no_progress)
    except (ValueError, OSError) as e:  # OSError: a directory that cannot be read or written
        print(f"error: {e}", file=sys.stderr)
        return 2
    mb = 1024 * 1024
    print(f"quantized {len(r['modules'])} layers to {args.format} ({config}); skipped {len(r['skipped'])}")
    print(f"size: {r['size_before'] / mb:.2f} MiB -> {r['size_after'] / mb:.2f} MiB "
          f"({r['size_after'] / max(r['size_before'], 1):.2f}x) in {args.out or args.src}")
    return 0
