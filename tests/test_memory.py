"""llmkern.memory: CPU buffers advised for transparent huge pages."""

from __future__ import annotations

import gc

import pytest
import torch
from helpers import thp_eligible

from llmkern.memory import HUGE_PAGE, empty_on_huge_pages, huge_pages_available, huge_pages_mode


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nbytes", [4096, 2 * HUGE_PAGE + 512])
def test_buffer_is_a_contiguous_writable_tensor_that_outlives_its_mapping_handle(dtype, nbytes):
    shape = (nbytes // dtype.itemsize // 8, 8)
    t = empty_on_huge_pages(shape, dtype)
    assert t.shape == shape and t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    ref = torch.randn(shape).to(dtype)
    t.copy_(ref)
    gc.collect()  # the mapping must live as long as the tensor, not as long as a local name
    assert torch.equal(t, ref)
    view = t[1:]
    del t
    gc.collect()
    assert torch.equal(view, ref[1:])


def test_large_buffers_are_advised_for_huge_pages():
    if not huge_pages_available():
        pytest.skip(f"transparent huge pages: {huge_pages_mode()}")
    assert thp_eligible(empty_on_huge_pages((HUGE_PAGE // 4,), torch.float32))
