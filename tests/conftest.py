import pytest
import torch

import llmkern.ops as lk

# Every CPU ISA path this machine can run; tests taking `cpu_isa` run once per path.
CPU_ISAS = lk.supported_cpu_isas()


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    with lk.use_cpu_isa(request.param):
        yield request.param


@pytest.fixture(params=[f"cpu-{isa}" for isa in CPU_ISAS] + ["cuda"])
def device(request):
    """'cpu' under each ISA path, or 'cuda' (skipped without a GPU): for tests of ops with CUDA kernels."""
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        yield "cuda"
        return
    with lk.use_cpu_isa(request.param[4:]):
        yield "cpu"


@pytest.fixture(params=["cpu", "cuda"])
def torch_device(request):
    """'cpu' (its default ISA) or 'cuda' (skipped without a GPU): for the layers above the kernels."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
