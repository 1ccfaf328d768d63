"""`python -m bench [--quick] [--only norm|activation|rope|loss|sampling|attention|quant|matmul|model|train] [--markdown]
[--no-compile]`

Measures the machine's ceilings, runs the bench_<family>.py modules, prints one table of the
element-wise ops, the attention table, then the ceilings (bandwidth measured again at the end, since it
drifts on shared machines)."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import time

import torch

from bench import harness

FAMILIES = ("norm", "activation", "rope", "loss", "sampling", "attention", "quant", "matmul", "model", "train")
FLOP_FAMILIES = ("attention", "quant", "matmul", "model", "train")  # their own tables (bench_<family>.HEADER), not bytes-per-op rows


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer reps and smaller shapes (smoke test)")
    ap.add_argument("--only", choices=FAMILIES, action="append", help="run only this family (repeatable)")
    ap.add_argument("--markdown", action="store_true", help="print markdown tables (for bench/RESULTS.md)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    args = ap.parse_args(argv)

    cfg = harness.Config.quick_config() if args.quick else harness.Config()
    cfg.compile = not args.no_compile
    import llmkern.ops  # noqa: F401  (loads _C; fails here with the rebuild hint if it is missing)

    t0 = time.perf_counter()
    print("measuring ceilings ...", flush=True)
    ceilings = harness.measure_ceilings(cfg)
    rows: list[harness.Row] = []
    own_rows: dict[str, list[list[str]]] = {}
    for fam in args.only or FAMILIES:
        print(f"bench_{fam} ...", flush=True)
        module = importlib.import_module(f"bench.bench_{fam}")
        if fam in FLOP_FAMILIES:
            own_rows[fam] = module.run(cfg, ceilings)
        else:
            rows += module.run(cfg)
    harness.remeasure_bandwidth(ceilings, cfg)

    md = args.markdown
    print()
    print(f"{cpu_model()}, {ceilings.threads} threads, torch {torch.__version__}, llmkern ISA "
          f"{torch.ops.llmkern.cpu_isa()}, {time.strftime('%Y-%m-%d')}" + (", --quick" if args.quick else "")
          + f", THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}")
    print()
    if rows:
        print(harness.format_table(harness.HEADER, harness.table_rows(rows), md))
        print()
        print_bytes_legend(cfg)
    for fam, fam_rows in own_rows.items():
        module = importlib.import_module(f"bench.bench_{fam}")
        print(harness.format_table(module.HEADER, fam_rows, md))
        print()
        print(module.LEGEND)
        print()
    print(harness.format_ceilings(ceilings, cfg, md))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


def print_bytes_legend(cfg: harness.Config) -> None:
    print("GB/s: bytes the op must move / llmkern time; copy GB/s: bench_copy_ of as many bytes (read +"
          " write), timed interleaved with the row's calls; % copy BW: GB/s / copy GB/s; "
          "x eager / x compile: baseline time / llmkern time (medians of up to "
          f"{cfg.reps} interleaved calls, fewer (>= 5) for calls slower than {cfg.budget_s / cfg.reps:.2f} s; "
          "inputs rotated over > 4x LLC).")
    print()


if __name__ == "__main__":
    raise SystemExit(main())
