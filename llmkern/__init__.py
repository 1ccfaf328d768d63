"""llmkern: fused LLM kernels (CPU SIMD and CUDA) as PyTorch custom ops."""

__version__ = "0.1.0"

from llmkern._ext import available as _c_available  # noqa: F401  (import never fails without _C)
from llmkern import ops  # noqa: E402,F401
