import pytest
import torch

import llmkern.ops as lk

# Every CPU ISA path this machine can run; tests taking `cpu_isa` run once per path.
CPU_ISAS = lk.supported_cpu_isas()


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    with lk.use_cpu_isa(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
