"""Which CPU ISA path the kernels use (scalar, avx2, avx512, avx512bf16, amx; LLMKERN_CPU_ISA sets it at
start-up), and which threads run them (the parallel backend)."""

from __future__ import annotations

import contextlib

import torch

from llmkern._ext import ops

_pool_threads = 0  # the pool's size as set_parallel_backend last set it (0: torch's count, or not the pool)


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


def set_parallel_backend(backend: str, num_threads: int | None = None) -> None:
    """Runs the CPU kernels on "openmp" (torch's threads: kernels and torch's ops share one team, best when they
    interleave, as in training) or "pool" (llmkern's own workers, which hand a descheduled thread's work to the
    others instead of waiting for it at every kernel: best when other busy threads share the cores, as the HTTP
    front end and local clients do in `llmkern serve`). The pool has num_threads threads (None: torch.get_num_threads()
    at each call); "openmp" always has torch's. ValueError for another name or num_threads outside 0..4096."""
    global _pool_threads
    ops().set_parallel_backend(backend, num_threads or 0)
    _pool_threads = (num_threads or 0) if backend == "pool" else 0


def kernel_threads() -> int:
    """The threads the CPU kernels run on: the pool's num_threads if set, else torch.get_num_threads()."""
    return _pool_threads or torch.get_num_threads()
