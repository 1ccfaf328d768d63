"""Large, long-lived CPU buffers on transparent huge pages (the serving engine's KV cache).

Paged attention reads a cache in random 16-token blocks: on 4 KB pages nearly every block misses the TLB, and in a
virtual machine each miss walks two page tables. On 2 MB pages the decode of issue 3's case (134 MB of K and V a
call) ran 1.07-1.41x faster from memory on a Zen 4 KVM guest, and a plain sequential read 1.2-1.4x (bench/RESULTS.md).

Linux backs an anonymous mapping with huge pages where the mapping asks for them (madvise(MADV_HUGEPAGE)) and
/sys/kernel/mm/transparent_hugepage/enabled is "madvise" or "always". Elsewhere the buffer keeps 4 KB pages: the
advice is a hint, and asking changes nothing but speed.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
_THP_ENABLED = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or "unavailable"."""
    try:
        text = _THP_ENABLED.read_text()
    except OSError:
        return "unavailable"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "unavailable"


def huge_pages_available() -> bool:
    """Whether a mapping can ask for transparent huge pages here (THP "always" or "madvise", and MADV_HUGEPAGE)."""
    return huge_pages_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized contiguous CPU tensor in its own anonymous mapping advised for transparent huge pages (the
    tensor keeps the mapping alive). Buffers under one huge page, and systems without THP, get torch.empty's memory.
    Pages are committed on first touch, as torch.empty's are; where the kernel defragments on fault (THP defrag
    "madvise", the usual default) that first touch may also compact memory."""
    numel = math.prod(shape)
    nbytes = numel * dtype.itemsize
    if nbytes < HUGE_PAGE or not huge_pages_available():
        return torch.empty(shape, dtype=dtype)
    # One huge page more than needed, so the tensor can start on a 2 MB boundary: the kernel does not always align a
    # mapping itself, and one whose 2 MB-aligned ranges start past its beginning wastes its first pages on 4 KB ones.
    buf = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        buf.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # a kernel built without THP: the mapping keeps 4 KB pages
        pass
    raw = torch.frombuffer(buf, dtype=torch.uint8)  # holds buf; untouched pages cost address space, not memory
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start : start + nbytes].view(dtype).view(shape)
