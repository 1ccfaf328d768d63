"""Which CPU ISA path the kernels use (scalar, avx2, avx512, avx512bf16; LLMKERN_CPU_ISA sets it at start-up), and
which threads run them (the parallel backend)."""

from __future__ import annotations

import contextlib

from llmkern._ext import ops


def cpu_isa() -> str:
    """The CPU path in use now."""
    return ops().cpu_isa()


def supported_cpu_isas() -> list[str]:
    """The paths this CPU can run, narrowest first."""
    return list(ops().supported_cpu_isas())


def set_cpu_isa(isa: str) -> None:
    """Forces a path; raises ValueError for an unknown one or one this CPU lacks."""
    ops().set_cpu_isa(isa)


@contextlib.contextmanager
def use_cpu_isa(isa: str):
    """Runs the block on the given CPU path, then restores the previous one."""
    previous = cpu_isa()
    set_cpu_isa(isa)
    try:
        yield
    finally:
        set_cpu_isa(previous)


def parallel_backend() -> str:
    """The kernels' threads: "openmp" (torch's OpenMP threads, the default) or "pool" (llmkern's own)."""
    return ops().parallel_backend()


def set_parallel_backend(backend: str) -> None:
    """Runs the CPU kernels on "openmp" (torch's threads: kernels and torch's ops share one team, best when they
    interleave, as in training) or "pool" (llmkern's own workers, which hand a descheduled thread's work to the
    others instead of waiting for it at every kernel: best when other busy threads share the cores, as the HTTP
    front end and local clients do in `llmkern serve`). Both use torch.get_num_threads() threads. ValueError for
    any other name."""
    ops().set_parallel_backend(backend)
