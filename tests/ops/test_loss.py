"""llmkern.ops.linear_cross_entropy against the unfused reference in float64."""

import pytest
import torch

import llmkern.ops as lk
from llmkern.models import LlamaForCausalLM, preset
from tests.helpers import assert_close_derived, grads

# (tokens, hidden, vocab, chunk rows): chunks that divide the tokens, that do not, and one chunk for all
CASES = [(37, 24, 131, 8), (64, 16, 50, 64), (5, 59, 1000, None)]


def _inputs(n, h, v, dtype, bias, device="cpu"):
    hidden = torch.randn(n, h, dtype=dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    targets = torch.randint(0, v, (n,))
    targets[::3] = -100  # ignored positions
    b = (torch.randn(v) * 0.1).to(dtype) if bias else None
    return [t.to(device) if t is not None else None for t in (hidden, weight, targets, b)]


@pytest.mark.parametrize("n, h, v, chunk", CASES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_items", [None, 50.0])
def test_matches_reference_fp32(n, h, v, chunk, bias, num_items, torch_device):
    hidden, weight, targets, b = _inputs(n, h, v, torch.float32, bias, torch_device)
    inputs = [hidden, weight] + ([b] if bias else [])

    def fused(x, w, *b):
        return lk.linear_cross_entropy(x, w, targets, *b, num_items=num_items, chunk_rows=chunk)

    def ref(x, w, *b):
        return lk.linear_cross_entropy_ref(x, w, targets, *b, num_items=num_items)

    ref64 = ref(*(t.double() for t in inputs))
    # The loss sums its (positive) per-token terms in another order than PyTorch's: up to one rounding of the
    # loss per term (PyTorch's own error can be 0 by luck, as on CUDA).
    terms = (targets != -100).sum().item()
    assert_close_derived(fused(*inputs), ref64.float(), ref(*inputs), name="loss", scale=terms * ref64.item())
    g64 = grads(ref, [t.double() for t in inputs], [torch.tensor(0.7, dtype=torch.float64)])
    for name, g, gt, r in zip(("dhidden", "dweight", "dbias"), grads(fused, inputs, [torch.tensor(0.7)]),
                              grads(ref, inputs, [torch.tensor(0.7)]), g64):
        assert_close_derived(g, r, gt, name=name)


def test_bf16_gradients_within_twice_torch_error(torch_device):
    hidden, weight, targets, _ = _inputs(67, 32, 300, torch.bfloat16, False, torch_device)
    d = [torch.tensor(1.0)]
    g64 = grads(lambda x, w: lk.linear_cross_entropy_ref(x, w, targets), [hidden.double(), weight.double()], d)
    gt = grads(lambda x, w: lk.linear_cross_entropy_ref(x, w, targets), [hidden, weight], d)
    g = grads(lambda x, w: lk.linear_cross_entropy(x, w, targets, chunk_rows=16), [hidden, weight], d)
    for name, a, b, r in zip(("dhidden", "dweight"), g, gt, g64):
        assert_close_derived(a, r.to(a.dtype).double(), b, name=name)


def test_model_loss_without_logits_equals_the_logits_path():
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset("tiny-llama"))
    ids = torch.randint(0, model.config.vocab_size, (1, 40))
    cu = torch.tensor([0, 13, 40], dtype=torch.int32)
    outs, param_grads = [], []
    for return_logits in (True, False):
        model.zero_grad()
        out = model(ids, labels=ids, cu_seqlens=cu, num_items_in_batch=30, return_logits=return_logits)
        out.loss.backward()
        outs.append(out)
        param_grads.append([p.grad.clone() for p in model.parameters()])
    assert outs[1].logits is None
    torch.testing.assert_close(outs[1].loss, outs[0].loss, rtol=1e-5, atol=0)
    for a, b in zip(*param_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("args, match", [
    (dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 7), targets=torch.zeros(4, dtype=torch.long)), "hidden"),
    (dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.zeros(4, dtype=torch.int32)), "targets"),
    (dict(hidden=torch.randn(4, 8), weight=torch.randn(10, 8), targets=torch.zeros(4, dtype=torch.long),
          bias=torch.zeros(9)), "bias"),
])  # fmt: skip
def test_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        lk.linear_cross_entropy(**args)
