"""NF4Linear / Int4Linear / Int8Linear: forward, state_dict and safetensors round trips, bitsandbytes'
Linear4bit state dicts, quantize_, torch.compile of a quantized Llama MLP, QLoRA-style gradients."""

import warnings

import pytest
import torch
from torch import nn

import llmkern.ops as lk
from llmkern.quant import (
    Int4Config,
    Int4Linear,
    Int8Config,
    Int8Linear,
    NF4Config,
    NF4Linear,
    output_heads,
    quantize_,
)
from tests.helpers import assert_close_derived

FORMATS = {
    "nf4": lambda lin: NF4Linear.from_linear(lin, 64, double_quant=False),
    "nf4-dq": lambda lin: NF4Linear.from_linear(lin, 128, double_quant=True),
    "int4": lambda lin: Int4Linear.from_linear(lin, 32, symmetric=True),
    "int4-asym": lambda lin: Int4Linear.from_linear(lin, 64, symmetric=False),
    "int8": Int8Linear.from_linear,
}


def make_linear(k=192, n=80, bias=True, dtype=torch.float32):
    lin = nn.Linear(k, n, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.05)
        if bias:
            lin.bias.normal_(0, 0.1)
    return lin


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_equals_dequantized_linear(cpu_isa, fmt, xdtype, bias):
    lin = make_linear(bias=bias)
    q = FORMATS[fmt](lin)
    assert not any(p.requires_grad for p in q.buffers())
    x = torch.randn(2, 5, 192).to(xdtype)
    w = q.dequantize(torch.float32)
    b = None if q.bias is None else q.bias.detach()
    ref64 = nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    ref_t = nn.functional.linear(x, w.to(xdtype), None if b is None else b.to(xdtype))
    with torch.no_grad():
        assert_close_derived(q(x), ref64, ref_t, scale=ref64.abs().max().item())
    # The quantized weight is close to the original (4-bit: within a few percent).
    rel = (w - lin.weight).norm() / lin.weight.norm()
    assert rel < (0.02 if fmt == "int8" else 0.15), rel


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_and_safetensors_round_trip(fmt, tmp_path):
    from safetensors.torch import load_file, save_file

    q = FORMATS[fmt](make_linear())
    sd = q.state_dict()
    # Load into a module built with a different layout (other weights, block / group, symmetry).
    other = {"nf4": "nf4-dq", "nf4-dq": "nf4", "int4": "int4-asym", "int4-asym": "int4", "int8": "int8"}[fmt]
    q2 = FORMATS[other](make_linear())
    q2.load_state_dict(sd)
    save_file(q2.state_dict(), tmp_path / "w.safetensors")
    q3 = FORMATS[other](make_linear())
    q3.load_state_dict(load_file(tmp_path / "w.safetensors"))
    for m in (q2, q3):
        assert set(m.state_dict()) == set(sd)
        for k, v in m.state_dict().items():
            assert v.dtype == sd[k].dtype and torch.equal(v, sd[k]), k
    x = torch.randn(4, 192)
    with torch.no_grad():
        assert torch.equal(q3(x), q(x))


@pytest.mark.parametrize("fmt", ["nf4-dq", "int4-asym", "int8"])
def test_dtype_casts_keep_the_quantized_state(fmt):
    q = FORMATS[fmt](make_linear())
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q.to(torch.bfloat16)
    after = q.state_dict()
    assert after["bias"].dtype == torch.bfloat16
    for k, v in before.items():
        if k != "bias":
            assert after[k].dtype == v.dtype and torch.equal(after[k], v), k
    x = torch.randn(2, 192, dtype=torch.bfloat16)
    with torch.no_grad():
        assert q(x).dtype == torch.bfloat16
    q.half().float()
    assert all(torch.equal(q.state_dict()[k], v) for k, v in before.items() if k != "bias")


def test_load_state_dict_errors():
    q = NF4Linear.from_linear(make_linear())
    sd = q.state_dict()
    with pytest.raises(RuntimeError, match="Missing key.*weight.absmax"):
        q.load_state_dict({k: v for k, v in sd.items() if k != "weight.absmax"})
    with pytest.raises(RuntimeError, match="does not match"):
        NF4Linear.from_linear(make_linear(k=64)).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="Unexpected key.*extra"):
        q.load_state_dict({**sd, "extra": torch.zeros(1)})
    for cls in (NF4Linear, Int4Linear, Int8Linear):  # a bias the layer has no place for is not dropped silently
        no_bias = cls.from_linear(make_linear(k=256, bias=False))
        with pytest.raises(RuntimeError, match='Unexpected key.*"bias"'):
            no_bias.load_state_dict({**no_bias.state_dict(), "bias": torch.zeros(80)})
    i4 = Int4Linear.from_linear(make_linear(), group_size=64)
    with pytest.raises(RuntimeError, match="group_size must be one of .*got 96"):
        i4.load_state_dict({**i4.state_dict(), "scales": i4.scales[:, :2].contiguous()})
    i8 = Int8Linear.from_linear(make_linear())
    assert i8.state_dict()["weight"].shape == (i8.out_features * i8.in_features,)
    with pytest.raises(RuntimeError, match=r"weight \(80, 192\) and scales \(80,\) do not describe int8 rows"):
        i8.load_state_dict({**i8.state_dict(), "weight": i8.weight})  # the [N, K] codes an nn.Linear could take


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear_reads_and_writes_bitsandbytes_linear4bit(double_quant):
    bnb = pytest.importorskip("bitsandbytes")
    w = (torch.randn(64, 256) * 0.05).to(torch.bfloat16)
    lin = bnb.nn.Linear4bit(256, 64, bias=True, compute_dtype=torch.bfloat16, compress_statistics=double_quant,
                            quant_type="nf4", quant_storage=torch.uint8)
    lin.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=double_quant,
                                   blocksize=64)
    lin = lin.to("cpu")
    bnb_sd = lin.state_dict()
    ours = NF4Linear.from_linear(make_linear(256, 64), block_size=64, double_quant=not double_quant)
    ours.load_state_dict(bnb_sd)
    want = bnb.functional.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
    assert torch.equal(ours.dequantize(), want)
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        assert_close_derived(ours(x), x.double() @ want.double().T + lin.bias.double(),
                             nn.functional.linear(x, want, lin.bias.to(x.dtype)))
    # Our state dict has bitsandbytes' keys and values; bitsandbytes rebuilds the weight from it.
    m = NF4Linear.from_linear(nn.Linear(256, 64).to(torch.bfloat16), 64, double_quant)
    sd = m.state_dict()
    assert set(sd) == set(bnb_sd)
    for k in sd:
        assert k == "bias" or sd[k].dtype == bnb_sd[k].dtype, k
    quantized_stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(sd["weight"], quantized_stats, requires_grad=False, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state), m.dequantize())


class TinyLM(nn.Module):
    """Embedding, two blocks (attention-like projections and an MLP, one with in_features 100) and a tied head."""

    def __init__(self, vocab=50, d=128):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.q_proj, self.o_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.up, self.odd = nn.Linear(d, 100), nn.Linear(100, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.o_proj(torch.relu(self.q_proj(h)))
        h = h + self.odd(torch.relu(self.up(h)))
        return self.head(h)


def test_quantize_model_default_filter_and_refusals():
    model = TinyLM()
    assert output_heads(model) == {"head"}  # tied to the embedding; not named lm_head
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        dense = model(ids)
    with pytest.warns(UserWarning, match="skipping layer 'odd'.*in_features 100"):
        quantize_(model, Int4Config(group_size=32))
    assert isinstance(model.q_proj, Int4Linear) and isinstance(model.o_proj, Int4Linear)
    assert isinstance(model.up, Int4Linear)  # in_features 128
    assert type(model.odd) is nn.Linear and type(model.head) is nn.Linear
    with torch.no_grad():
        out = model(ids)
    assert (out - dense).norm() / dense.norm() < 0.1

    # An explicit filter that asks for an impossible layer is refused, naming it.
    with pytest.raises(ValueError, match="cannot quantize layer 'odd'.*not divisible by group_size 64"):
        quantize_(TinyLM(), Int4Config(group_size=64), filter_fn=lambda m, name: name in ("odd", "up"))
    m = TinyLM()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_(m, NF4Config(), filter_fn=lambda mod, name: name != "head")  # NF4 takes any shape
    assert isinstance(m.odd, NF4Linear) and isinstance(m.head, nn.Linear)
    m = quantize_(TinyLM(), Int8Config())
    assert isinstance(m.odd, Int8Linear)
    mha = nn.Sequential(nn.MultiheadAttention(64, 4), nn.Linear(64, 64))
    quantize_(mha, NF4Config())
    assert type(mha[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    assert isinstance(mha[1], NF4Linear)


def test_config_validation():
    with pytest.raises(ValueError, match="NF4Config.block_size"):
        NF4Config(block_size=100)
    with pytest.raises(TypeError, match="double_quant must be a bool"):
        NF4Config(double_quant="yes")
    with pytest.raises(ValueError, match="Int4Config.group_size"):
        Int4Config(group_size=256)
    with pytest.raises(TypeError, match="config must be"):
        quantize_(TinyLM(), "nf4")
    with pytest.raises(ValueError, match="wrap a bare nn.Linear"):
        quantize_(nn.Linear(64, 64), NF4Config())


class LlamaMLP(nn.Module):
    def __init__(self, d=128, h=320):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d, bias=False)

    def forward(self, x):
        return self.down_proj(lk.silu_mul(self.gate_proj(x), self.up_proj(x)))


@pytest.mark.parametrize("config", [NF4Config(), Int4Config(group_size=64, symmetric=False), Int8Config()],
                         ids=["nf4", "int4", "int8"])
def test_quantized_mlp_compiles_fullgraph(config):
    mlp = quantize_(LlamaMLP(), config)
    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    for x in (torch.randn(3, 128), torch.randn(2, 3, 128, dtype=torch.bfloat16)):
        with torch.no_grad():
            assert torch.equal(compiled(x), mlp(x))


def test_qlora_gradients_flow_to_input_and_adapter():
    base = NF4Linear.from_linear(make_linear(), double_quant=True)
    base.bias.requires_grad_(False)
    lora_a, lora_b = nn.Linear(192, 8, bias=False), nn.Linear(8, 80, bias=False)
    nn.init.normal_(lora_b.weight, std=0.1)
    x = torch.randn(4, 192, requires_grad=True)
    dy = torch.randn(4, 80)
    (base(x) + lora_b(lora_a(x))).backward(dy)
    w = base.dequantize(torch.float32)
    want_dx = dy @ w + (dy @ lora_b.weight) @ lora_a.weight
    torch.testing.assert_close(x.grad, want_dx, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lora_b.weight.grad, dy.T @ (x.detach() @ lora_a.weight.T))
    assert lora_a.weight.grad is not None
    assert base.bias.grad is None and all(not b.requires_grad for b in base.buffers())
    assert [n for n, p in base.named_parameters() if p.requires_grad] == []
