"""llmkern: fused LLM kernels (CPU SIMD and CUDA) as PyTorch custom ops."""

__version__ = "0.1.0"

from llmkern._ext import available as _c_available  # noqa: F401  (import never fails without _C)
from llmkern import ops  # noqa: E402,F401

# The generation API, imported on first use (it pulls in the models and the tokenizers library).
_LAZY = {"LLM": "llmkern.llm", "GenerationOutput": "llmkern.llm", "SamplingParams": "llmkern.generation"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'llmkern' has no attribute {name!r}")
