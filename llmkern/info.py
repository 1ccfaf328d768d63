"""`python -m llmkern.info`: version, torch, CPU ISA path, threads, CUDA kernels, registered ops."""

from __future__ import annotations

import torch

import llmkern
from llmkern import _ext
from llmkern.memory import huge_pages_mode


def info_lines() -> list[str]:
    lines = [f"llmkern {llmkern.__version__}", f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'})"]
    if not _ext.available():
        lines.append(_ext.REBUILD_HINT.format(err=_ext._LOAD_ERROR))
        return lines
    ops = _ext.ops()
    lines.append(f"cpu isa: {ops.cpu_isa()} (supported: {', '.join(ops.supported_cpu_isas())})")
    lines.append(f"threads: {torch.get_num_threads()}")
    lines.append(f"transparent huge pages: {huge_pages_mode()} (the serving KV cache asks for them)")
    names = sorted(n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("llmkern::"))
    cuda = [n for n in names if torch._C._dispatch_has_kernel_for_dispatch_key(f"llmkern::{n}", "CUDA")]
    lines.append(f"cuda kernels: {'built' if cuda else 'not built'}" + (f" ({len(cuda)} ops)" if cuda else ""))
    lines.append(f"ops ({len(names)}):")
    for name in names:
        schema = getattr(ops, name).default._schema
        keys = [k for k in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(f"llmkern::{name}", k)]
        lines.append(f"  {schema}  [{', '.join(keys) or 'any device'}]")
    return lines


def main() -> None:
    print("\n".join(info_lines()))


if __name__ == "__main__":
    main()
