"""The flat Llama-family model against transformers: logits (fp32, bf16), loss, gradients, packed varlen."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from model_refs import ARCHS, VOCAB, hf_checkpoints, make_hf_model, rel_err  # noqa: F401 (fixture)

from helpers import assert_close_derived
from llmkern.models import LlamaForCausalLM, load_model, preset

SEQ = 13  # longer than mistral's sliding window (5)


def _batch(b=3, s=SEQ, seed=1):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_fp32_match_transformers(hf_checkpoints, arch):
    hf, path = hf_checkpoints[arch]
    model = load_model(path)
    ids = _batch()
    with torch.no_grad():
        ref = hf(ids).logits
        out = model(ids).logits
    assert out.shape == (3, SEQ, VOCAB) and out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_bf16_within_derived_tolerance(hf_checkpoints, arch):
    """Error vs transformers in float64 at most 2x transformers' own bf16 error (tests/helpers.py)."""
    hf, path = hf_checkpoints[arch]
    ids = _batch()
    with torch.no_grad():
        ref64 = make_hf_model(arch).double()(ids).logits
        hf_bf16 = make_hf_model(arch).to(torch.bfloat16)(ids).logits
        out = load_model(path, dtype=torch.bfloat16)(ids).logits
    assert_close_derived(out, ref64, hf_bf16, name=f"{arch} bf16 logits")


@pytest.mark.parametrize("arch", ARCHS)
def test_loss_and_gradients_match_transformers(hf_checkpoints, arch):
    hf, path = hf_checkpoints[arch]
    model = load_model(path)
    ids = _batch()
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    labels[2, -3:] = -100
    hf.zero_grad()
    ref = hf(ids, labels=labels)
    ref.loss.backward()
    out = model(ids, labels=labels)
    out.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) <= 1e-5 * ref.loss.item()
    ref_grads = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        g_ref = ref_grads[name].grad
        assert p.grad is not None, f"{name}: no gradient"
        assert rel_err(p.grad, g_ref) < 1e-4, f"{arch} {name}: gradient rel err {rel_err(p.grad, g_ref):.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_varlen_equals_separate(hf_checkpoints, arch):
    """Sequences of lengths 7, 1, 13 packed into [1, 21] with cu_seqlens: each token's logits as if run
    alone, and the loss is the mean over all scored tokens of the three (never across a boundary)."""
    _, path = hf_checkpoints[arch]
    model = load_model(path)
    seqs = [_batch(1, n, seed=n)[0] for n in (7, 1, 13)]
    packed = torch.cat(seqs)[None]
    cu = torch.tensor([0, 7, 8, 21], dtype=torch.int32)
    with torch.no_grad():
        out = model(packed, labels=packed, cu_seqlens=cu)
        separate = [model(s[None]).logits[0] for s in seqs]
    assert rel_err(out.logits[0], torch.cat(separate)) < 1e-5
    token_losses = [F.cross_entropy(lg[:-1], s[1:], reduction="sum") for lg, s in zip(separate, seqs)]
    expected = sum(token_losses) / sum(len(s) - 1 for s in seqs)
    assert abs(out.loss.item() - expected.item()) <= 1e-5 * expected.item()


def test_alibi_model_packed_equals_separate():
    """llmkern's own ALiBi option (no transformers reference): no rope cache, and a sequence's logits do
    not depend on where it sits in a pack."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset("tiny-alibi")).eval()
    assert model.rope_cache is None and model.alibi_slopes.shape == (6,)
    seqs = [_batch(1, n, seed=n)[0] for n in (5, 9)]
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    with torch.no_grad():
        packed = model(torch.cat(seqs)[None], cu_seqlens=cu).logits[0]
        separate = torch.cat([model(s[None]).logits[0] for s in seqs])
    assert rel_err(packed, separate) < 1e-5


def test_bad_inputs_raise_clear_errors(hf_checkpoints):
    model = load_model(hf_checkpoints["llama"][1])
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(1, 5, dtype=torch.int64), cu_seqlens=torch.tensor([0, 3, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="labels"):
        model(torch.zeros(2, 5, dtype=torch.int64), labels=torch.zeros(2, 4, dtype=torch.int64))


def test_to_dtype_keeps_rope_cache_float32(hf_checkpoints):
    path = hf_checkpoints["llama"][1]
    model = load_model(path).to(torch.bfloat16)
    assert model.rope_cache.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    ids = _batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, load_model(path, dtype=torch.bfloat16)(ids).logits)


def test_linear_takes_the_matmul_that_measured_faster(monkeypatch):
    from llmkern.models import llama

    lin_mod = importlib.import_module("llmkern.ops.linear")  # (llmkern.ops.linear is the function)

    beats = lin_mod.linear_beats_torch
    monkeypatch.setattr(lin_mod, "_torch_bf16_gemm", lambda: True)  # a CPU with AVX512_BF16
    monkeypatch.setattr(lin_mod, "_kernels_on_amx", lambda: False)
    assert beats(torch.bfloat16, 31, 2048, 512) and not beats(torch.bfloat16, 32, 2048, 512)
    assert beats(torch.bfloat16, 127, 320, 512) and not beats(torch.bfloat16, 128, 320, 512)
    monkeypatch.setattr(lin_mod, "_kernels_on_amx", lambda: True)  # the kernels' bf16 linear on AMX tiles
    assert beats(torch.bfloat16, 127, 2048, 512) and not beats(torch.bfloat16, 128, 2048, 512)
    assert not beats(torch.bfloat16, 32, 2056, 512)  # k not a multiple of 32: no tiles, oneDNN's
    monkeypatch.setattr(lin_mod, "_torch_bf16_gemm", lambda: False)
    assert beats(torch.bfloat16, 4096, 2048, 512) and beats(torch.float16, 4096, 2048, 512)
    for mkl_on_amd in (False, True):
        monkeypatch.setattr(lin_mod, "_torch_fp32_gemm_is_mkl_on_amd", lambda v=mkl_on_amd: v)
        assert beats(torch.float32, 16, 64, 64) and not beats(torch.float32, 17, 64, 64)
        assert beats(torch.float32, 256, 320, 8192) == mkl_on_amd and not beats(torch.float32, 257, 320, 8192)
        assert beats(torch.float32, 8192, 320, 864) == mkl_on_amd  # training's linears: mm where MKL is slow
    # Either way the module computes x @ W.T + b.
    lin = llama.Linear(64, 24).to(torch.bfloat16)
    x = torch.randn(130, 64, dtype=torch.bfloat16)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    for fast_torch in (False, True):
        monkeypatch.setattr(lin_mod, "_torch_bf16_gemm", lambda v=fast_torch: v)
        with torch.no_grad():
            assert_close_derived(lin(x), ref, F.linear(x, lin.weight, lin.bias))
