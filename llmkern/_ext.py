"""Loads the compiled extension. `import llmkern` works without it; the first op call then explains."""

from __future__ import annotations

import torch

_LOAD_ERROR: BaseException | None = None
try:
    from llmkern import _C  # noqa: F401  (registers torch.ops.llmkern.*)
except ImportError as e:  # a missing or stale build must not break `import llmkern`
    _LOAD_ERROR = e

REBUILD_HINT = (
    "llmkern's compiled extension llmkern._C failed to load ({err}). Rebuild it: run `make build` in the "
    "source tree, or `pip install --no-build-isolation -e .` in an environment that has torch."
)


def available() -> bool:
    return _LOAD_ERROR is None


def ops():
    """torch.ops.llmkern, or a clear error saying how to rebuild when _C did not load."""
    if _LOAD_ERROR is not None:
        raise RuntimeError(REBUILD_HINT.format(err=_LOAD_ERROR)) from _LOAD_ERROR
    return torch.ops.llmkern
