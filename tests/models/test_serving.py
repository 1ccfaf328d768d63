"""Serving mode: steps mixing prefill chunks and decodes over a paged KV cache equal the full forward."""

from __future__ import annotations

import pytest
import torch
from helpers import thp_eligible
from model_refs import ARCHS, VOCAB, hf_checkpoints, make_hf_model, rel_err  # noqa: F401 (fixture)

from llmkern.memory import HUGE_PAGE, huge_pages_available
from llmkern.models import LlamaForCausalLM, SequenceChunk, allocate_kv_cache, build_step_input, load_model, preset
from llmkern.models.llama import _LINEAR_SLOTS, Linear
from llmkern.quant import Int8Config, quantize_

BLOCK = 3  # not a power of two; sequences straddle blocks
# Three sequences of final length 15, 10, 16 (longer than mistral's window 5), scheduled over five steps:
# (sequence, number of new tokens) per step. Prompts 9, 4, 13 arrive in chunks; then one token per decode.
SCHEDULE = [
    [(0, 5), (1, 4)],            # A: first prefill chunk; B: whole prompt
    [(0, 4), (1, 1), (2, 7)],    # A: rest of its prompt; B: decode; C: first chunk
    [(0, 1), (1, 1), (2, 6)],
    [(0, 1), (1, 1), (2, 1)],
    [(0, 4), (1, 3), (2, 2)],    # several tokens at once after decodes (as speculative verification does)
]  # fmt: skip
LENGTHS = [15, 10, 16]


@pytest.mark.parametrize("cache", ["small", "huge_pages"])
@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_prefill_chunks_and_decodes_equal_full_forward(hf_checkpoints, arch, cache):
    """cache="huge_pages": tensors of at least one huge page each, in mappings advised for them (llmkern.memory)."""
    model = load_model(hf_checkpoints[arch][1])
    gen = torch.Generator().manual_seed(3)
    seqs = [torch.randint(0, VOCAB, (n,), generator=gen) for n in LENGTHS]
    # Blocks handed out scattered (not in order), unused slots NaN: a read of an unwritten slot shows up.
    blocks = torch.randperm(20, generator=gen).tolist()
    tables = [blocks[0:5], blocks[5:9], blocks[9:15]]
    block_bytes = BLOCK * model.config.num_kv_heads * model.config.head_dim * 4
    num_blocks = 20 if cache == "small" else -(-HUGE_PAGE // block_bytes)
    kv = allocate_kv_cache(model.config, num_blocks=num_blocks, block_size=BLOCK, dtype=torch.float32)
    if cache == "huge_pages" and huge_pages_available():
        assert all(thp_eligible(t) for k_v in kv for t in k_v)
    for k, v in kv:
        k.fill_(float("nan"))
        v.fill_(float("nan"))
    done = [0, 0, 0]
    got = [[] for _ in seqs]
    for step in SCHEDULE:
        chunks = [SequenceChunk(seqs[i][done[i] : done[i] + n].tolist(), done[i], tables[i]) for i, n in step]
        batch = build_step_input(chunks, BLOCK)
        batch.logits_indices = torch.arange(batch.input_ids.numel())  # every token's logits, not just the last
        logits = model.step(batch, kv)
        start = 0
        for i, n in step:
            got[i].append(logits[start : start + n])
            start += n
            done[i] += n
    assert done == LENGTHS
    with torch.no_grad():
        for i, s in enumerate(seqs):
            full = model(s[None]).logits[0]
            assert rel_err(torch.cat(got[i]), full) < 1e-5, f"{arch}: sequence {i}"


def test_step_returns_the_wanted_rows_only(hf_checkpoints):
    model = load_model(hf_checkpoints["llama"][1])
    kv = allocate_kv_cache(model.config, num_blocks=4, block_size=BLOCK, dtype=torch.float32)
    chunks = [SequenceChunk([1, 2, 3, 4], 0, [2, 0]), SequenceChunk([5, 6], 0, [3], num_logits=0),
              SequenceChunk([7], 0, [1])]  # fmt: skip
    assert build_step_input([SequenceChunk([1, 2, 3], 0, [0], num_logits=3)], BLOCK).logits_indices.tolist() == [0, 1, 2]
    batch = build_step_input(chunks, BLOCK)
    assert batch.logits_indices.tolist() == [3, 6]
    assert batch.attn.slot_mapping.tolist() == [6, 7, 8, 0, 9, 10, 3]
    assert batch.attn.cu_seqlens_q.tolist() == [0, 4, 6, 7] and batch.attn.block_tables.dtype == torch.int32
    # decodes past the first block and a verification of 1 + 1 draft tokens; block tables padded with zeros
    later = build_step_input([SequenceChunk([8], 4, [0, 2]), SequenceChunk([9, 10], 5, [1, 3, 0], num_logits=2)],
                             BLOCK)
    assert later.input_ids.tolist() == [8, 9, 10] and later.positions.tolist() == [4, 5, 6]
    assert later.attn.slot_mapping.tolist() == [7, 11, 0] and later.logits_indices.tolist() == [0, 1, 2]
    assert later.attn.cu_seqlens_q.tolist() == [0, 1, 3] and later.attn.cu_seqlens_k.tolist() == [0, 5, 12]
    assert (later.attn.max_seqlen_q, later.attn.max_seqlen_k) == (2, 7)
    assert later.attn.block_tables.tolist() == [[0, 2, 0], [1, 3, 0]]
    assert {t.dtype for t in (later.input_ids, later.positions, later.attn.slot_mapping, later.logits_indices)} == {
        torch.int64} and later.attn.cu_seqlens_k.dtype == torch.int32
    logits = model.step(batch, kv)
    with torch.no_grad():
        full = model(torch.tensor([[1, 2, 3, 4]])).logits[0, -1]
    assert logits.shape == (2, VOCAB) and rel_err(logits[0], full) < 1e-5


def test_bad_step_inputs_raise_clear_errors(hf_checkpoints):
    model = load_model(hf_checkpoints["llama"][1])
    with pytest.raises(ValueError, match="block_table"):
        build_step_input([SequenceChunk([1, 2, 3, 4], 0, [0])], BLOCK)
    with pytest.raises(ValueError, match="tokens"):
        SequenceChunk([], 0, [0])
    with pytest.raises(ValueError, match="num_logits"):
        SequenceChunk([1, 2], 0, [0], num_logits=3)
    kv = allocate_kv_cache(model.config, num_blocks=2, block_size=BLOCK, dtype=torch.float32)
    with pytest.raises(ValueError, match="kv_caches"):
        model.step(build_step_input([SequenceChunk([1], 0, [0])], BLOCK), kv[:1])


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decode_of_32_tokens_equals_transformers_generate(hf_checkpoints, arch):
    """Prefill the prompt in one step, then one decode step per token (fp32), two sequences at once."""
    hf, path = hf_checkpoints[arch]
    model = load_model(path)
    prompts = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    new = 32
    with torch.no_grad():
        ref = hf.generate(prompts, max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[:, 7:]
    blocks_per_seq = -(-(7 + new) // BLOCK)
    kv = allocate_kv_cache(model.config, num_blocks=2 * blocks_per_seq, block_size=BLOCK, dtype=torch.float32)
    tables = [list(range(i, 2 * blocks_per_seq, 2)) for i in range(2)]  # interleaved blocks
    seqs = [p.tolist() for p in prompts]
    chunks = [SequenceChunk(s, 0, t) for s, t in zip(seqs, tables)]
    for _ in range(new):
        next_tokens = model.step(build_step_input(chunks, BLOCK), kv).argmax(-1).tolist()
        chunks = [SequenceChunk([tok], len(s), t) for tok, s, t in zip(next_tokens, seqs, tables)]
        for s, tok in zip(seqs, next_tokens):
            s.append(tok)
    assert torch.tensor(seqs)[:, 7:].tolist() == ref.tolist()


def test_quantized_model_steps_equal_its_full_forward(tmp_path):
    """Serving an int4-quantized model: chunked prefill then decodes, against the same model's full
    forward. float32 activations; the difference left is the int4 kernels' own: the one-row GEMV holds
    x as int16 per block (relative rounding ~2^-15), the multi-row GEMM does not (measured 5e-5)."""
    make_hf_model("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=32).save_pretrained(tmp_path)
    model = load_model(tmp_path, quant="int4")
    ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(6)).tolist()
    kv = allocate_kv_cache(model.config, num_blocks=4, block_size=4, dtype=torch.float32)
    got = [model.step(build_step_input([SequenceChunk(ids[a:b], a, [3, 1, 0])], 4), kv)
           for a, b in [(0, 7), (7, 8), (8, 9), (9, 12)]]  # fmt: skip
    with torch.no_grad():
        full = model(torch.tensor([ids])).logits[0]
    assert rel_err(torch.cat(got), full[[6, 7, 8, 11]]) < 5e-4


def _run_schedule(model, dtype):
    """Every step's logits for SCHEDULE's three sequences (every token's row), from a fresh cache."""
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in LENGTHS]
    tables, done, out = [[4, 0, 9, 2, 7], [1, 8, 3, 5], [6, 10, 11, 12, 13, 14]], [0, 0, 0], []
    kv = allocate_kv_cache(model.config, num_blocks=15, block_size=BLOCK, dtype=dtype)
    for step in SCHEDULE:
        chunks = [SequenceChunk(seqs[i][done[i] : done[i] + n], done[i], tables[i], num_logits=n) for i, n in step]
        out.append(model.step(build_step_input(chunks, BLOCK), kv))
        for i, n in step:
            done[i] += n
    return out


def _python_steps(model, dtype, monkeypatch):
    with monkeypatch.context() as m:  # no decoder_step weights: step() runs its layer loop in Python
        m.setattr(LlamaForCausalLM, "_decoder_weights", lambda self: None)
        return _run_schedule(model, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", [*ARCHS, "alibi"])
def test_decoder_step_in_cxx_equals_the_python_layer_loop(hf_checkpoints, arch, dtype, monkeypatch):
    """llmkern::decoder_step calls the ops Python's layers call, on the same inputs: the logits are the same
    bits (qkv and o biases, QK-Norm, sliding window, ALiBi, tied and untied heads)."""
    if arch == "alibi":
        torch.manual_seed(0)
        model = LlamaForCausalLM(preset("tiny-alibi"))
    else:
        model = load_model(hf_checkpoints[arch][1])
    model = model.to(dtype).eval()
    assert model._decoder_weights() is not None
    cxx, python = _run_schedule(model, dtype), _python_steps(model, dtype, monkeypatch)
    assert all(torch.equal(a, b) for a, b in zip(cxx, python, strict=True))


def test_decoder_step_follows_modules_replaced_after_a_step(hf_checkpoints):
    """The cached weights list is rebuilt when a layer changes: a model quantized after it stepped steps through
    its quantized layers (in Python), and a new dense weight is the one used."""
    model = load_model(hf_checkpoints["llama"][1])
    _run_schedule(model, torch.float32)
    layer = model.model.layers[0].mlp
    layer.down_proj = Linear(layer.down_proj.in_features, layer.down_proj.out_features, bias=False)
    assert model._decoder_weights()[_LINEAR_SLOTS[6]] is layer.down_proj.weight  # layer 0's down_proj
    quantize_(model, Int8Config())
    assert model._decoder_weights() is None
    _run_schedule(model, torch.float32)  # steps in Python through the int8 layers


def test_decoder_step_rejects_a_wrong_weights_list(hf_checkpoints):
    model = load_model(hf_checkpoints["llama"][1])
    batch = build_step_input([SequenceChunk([1, 2], 0, [0])], BLOCK)
    kv = allocate_kv_cache(model.config, num_blocks=1, block_size=BLOCK, dtype=torch.float32)
    a, c = batch.attn, model.config
    args = (batch.input_ids, batch.positions, a.cu_seqlens_q, a.cu_seqlens_k, a.max_seqlen_q, a.max_seqlen_k,
            a.block_tables, a.slot_mapping, batch.logits_indices)
    tail = (c.num_heads, c.num_kv_heads, c.head_dim, [-1] * c.num_layers, c.rms_norm_eps, 0)
    with pytest.raises(ValueError, match=r"weights: expected 41 entries"):
        torch.ops.llmkern.decoder_step(*args, model._decoder_weights()[:-1], [t for p in kv for t in p], *tail)
    with pytest.raises(ValueError, match=r"kv_caches: expected 4 tensors"):
        torch.ops.llmkern.decoder_step(*args, model._decoder_weights(), [t for p in kv for t in p][:3], *tail)
