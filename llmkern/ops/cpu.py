"""Which CPU ISA path the kernels use (scalar, avx2, avx512, avx512bf16); LLMKERN_CPU_ISA sets it at start-up."""

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
