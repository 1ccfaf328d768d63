"""The Llama-family decoder (llama, qwen2, qwen3, mistral) on llmkern.ops, one flat file (gpt-fast's model.py).

Parameter names are Hugging Face's (`model.layers.N.self_attn.q_proj.weight`, ...) so state dicts map 1:1.
Every layer works on packed tokens: hidden states are [T, hidden] (T = all tokens of all sequences) and
attention is flash_attn_varlen_func over per-sequence offsets. Two entry points share it:
- `forward(input_ids, labels=None, cu_seqlens=None)`: training / scoring over [batch, seq] (or a packed
  [1, total] with cu_seqlens); differentiable through the kernels' backward.
- `step(batch: StepInput, kv_caches)`: serving, ragged prefill chunks and decodes over a paged KV cache
  (llmkern.models.serving builds the inputs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import llmkern.ops as ops
from llmkern.models.config import ModelConfig


@dataclass
class AttentionInput:
    """Where each sequence's queries and keys are. Shape legend: T packed new tokens, B sequences.

    cu_seqlens_q   int32 [B + 1]  offsets of each sequence's new tokens in the packed T
    cu_seqlens_k   int32 [B + 1]  cumulative key counts (cached + new) per sequence
    max_seqlen_q/k int            bounds of the per-sequence lengths
    block_tables   int32 [B, max_blocks] or None (no cache: keys are the new tokens themselves)
    slot_mapping   int64 [T] or None: cache slot (block * block_size + offset) of each new token; -1 skips
    """

    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    block_tables: Tensor | None = None
    slot_mapping: Tensor | None = None


@dataclass
class CausalLMOutput:
    logits: Tensor | None  # [batch, seq, vocab]; None when the loss was computed without them
    loss: Tensor | None = None  # mean token loss over labels != -100 (float32 scalar)


class Linear(nn.Linear):
    """nn.Linear whose dense CPU matmul runs llmkern.ops.linear where it measured faster than torch's
    (ops.linear_beats_torch); CUDA and autocast regions use torch."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (x.device.type == "cpu" and x.dtype == w.dtype and not torch.is_autocast_enabled("cpu")
                and ops.linear_beats_torch(w.dtype, x.numel() // max(1, x.shape[-1]), x.shape[-1], w.shape[0])):
            return ops.linear(x, w, self.bias)
        return F.linear(x, w, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(self, x: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
        """(rms_norm(x + residual), x + residual) in one pass."""
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        h, hk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = h, hk, d
        self.window = cfg.window(layer)
        self.q_proj = Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, hk * d, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, hk * d, bias=cfg.qkv_bias)
        self.o_proj = Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x: Tensor, positions: Tensor, rope: Tensor | None, alibi: Tensor | None,
                attn: AttentionInput, kv_cache: tuple[Tensor, Tensor] | None) -> Tensor:
        """x [T, hidden], positions [T] int64, rope cos|sin [max_pos, head_dim] or None (ALiBi)."""
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):  # qwen3 QK-Norm: per head, before rope
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = ops.apply_rotary_emb(q, positions, rope), ops.apply_rotary_emb(k, positions, rope)
        if kv_cache is not None:  # serving: append the new keys, then attend over the paged cache
            k_cache, v_cache = kv_cache
            ops.write_kv_cache(k, v, k_cache, v_cache, attn.slot_mapping)
            k, v = k_cache, v_cache
        out = ops.flash_attn_varlen_func(
            q, k, v, attn.cu_seqlens_q, attn.cu_seqlens_k, attn.max_seqlen_q, attn.max_seqlen_k, causal=True,
            window_size=self.window, alibi_slopes=alibi, block_table=attn.block_tables if kv_cache else None,
        )  # fmt: skip
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(ops.silu_mul(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, residual: Tensor | None, *attn_args) -> tuple[Tensor, Tensor]:
        """Pre-norm block on the (x, residual) stream of vLLM: the block's input is x + residual (the
        previous block's output not yet added), so each add fuses into the next norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm.add_and_norm(x, residual)
        h, residual = self.post_attention_layernorm.add_and_norm(self.self_attn(h, *attn_args), residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    """transformers' `model.` submodule: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        # Constants derived from the config, not saved (persistent=False); rebuilt by init_buffers after a
        # meta-device build.
        self.register_buffer("rope_cache", None, persistent=False)
        self.register_buffer("alibi_slopes", None, persistent=False)
        self._decoder_cache: tuple[int, list | None] | None = None  # (registrations, _decoder_weights())
        if not any(p.is_meta for p in self.parameters()):
            self.init_buffers()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Weights for training from scratch: N(0, std) matrices and embeddings (transformers' initializer_range),
        zero biases, unit norm gains, and the residual-stream outputs (o_proj, down_proj) scaled by
        1/sqrt(2 num_layers) so the residual's variance stays put with depth (GPT-2, Radford et al. 2019)."""
        residual_std = std / (2 * self.config.num_layers) ** 0.5
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, residual_std if name.endswith(("o_proj", "down_proj")) else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)computes the rope cos|sin cache (float32, as the kernels take) or the ALiBi slopes."""
        device = self.model.embed_tokens.weight.device if device is None else device
        if self.config.position_encoding == "rope":
            self.rope_cache = self.config.rope_cache().to(device)
        else:
            self.alibi_slopes = self.config.alibi_slopes().to(device)

    def _apply(self, fn, recurse=True):
        """After .to(dtype / device), .half(), to_empty(...): the constants are rebuilt on the weights'
        device and stay float32 (a bf16 cos/sin cache would be refused by the kernels, and is less exact)."""
        super()._apply(fn, recurse)
        self.init_buffers()
        self._decoder_cache = None
        return self

    def _decode(self, input_ids: Tensor, positions: Tensor, attn: AttentionInput,
                kv_caches: list[tuple[Tensor, Tensor]] | None) -> Tensor:
        """input_ids, positions [T] -> final hidden states [T, hidden]."""
        x, residual = self.model.embed_tokens(input_ids), None
        for i, layer in enumerate(self.model.layers):
            x, residual = layer(x, residual, positions, self.rope_cache, self.alibi_slopes, attn,
                                None if kv_caches is None else kv_caches[i])
        return self.model.norm.add_and_norm(x, residual)[0]

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, cu_seqlens: Tensor | None = None,
                num_items_in_batch: int | Tensor | None = None, return_logits: bool = True) -> CausalLMOutput:
        """input_ids [batch, seq] int64, or packed [1, total] with cu_seqlens int32 [num_seqs + 1] (each
        sequence starts at position 0 and attends only to itself). labels like input_ids: token i's logits
        are scored against labels[i + 1] (transformers' shift; within a sequence when packed).
        num_items_in_batch (transformers' name): divide the summed token loss by it instead of taking the mean,
        so gradient accumulation over micro-batches normalizes by the global token count.
        return_logits=False (with labels): the loss comes from ops.linear_cross_entropy, which never stores the
        [tokens, vocab] logits (training's largest activation); out.logits is then None."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [batch, seq], got shape {tuple(input_ids.shape)}")
        b, s = input_ids.shape
        dev = input_ids.device
        if cu_seqlens is None:
            cu_seqlens = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=dev)
            positions = torch.arange(s, device=dev).repeat(b)
            max_len = s
        else:
            positions, max_len = _packed_positions(input_ids, cu_seqlens)
        attn = AttentionInput(cu_seqlens, cu_seqlens, max_len, max_len)
        hidden = self._decode(input_ids.reshape(-1), positions, attn, None)
        targets = None if labels is None else shifted_targets(labels, (b, s), cu_seqlens)
        if targets is not None and not return_logits and isinstance(self.lm_head, nn.Linear):
            loss = ops.linear_cross_entropy(hidden, self.lm_head.weight, targets, self.lm_head.bias,
                                            num_items=num_items_in_batch)
            return CausalLMOutput(None, loss)
        logits = self.lm_head(hidden).view(b, s, -1)
        if targets is None:
            return CausalLMOutput(logits)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets, reduction="sum")
        return CausalLMOutput(logits, loss / ((targets != -100).sum() if num_items_in_batch is None
                                              else num_items_in_batch))

    @torch.inference_mode()
    def step(self, batch, kv_caches: list[tuple[Tensor, Tensor]]) -> Tensor:
        """One serving step (batch: llmkern.models.serving.StepInput) -> logits [len(logits_indices), vocab].
        Writes the new tokens' keys and values into kv_caches (one (k_cache, v_cache) per layer). With dense linears
        the layer loop runs in C++ (llmkern::decoder_step, the same ops: the same logits); module hooks do not run
        there. Quantized or adapted models, and autocast regions, take the Python loop below."""
        if len(kv_caches) != self.config.num_layers:
            raise ValueError(f"kv_caches: expected {self.config.num_layers} (k, v) pairs, got {len(kv_caches)}")
        weights = self._decoder_weights()
        if weights is not None and not torch.is_autocast_enabled(batch.input_ids.device.type):
            return self._decoder_step(batch, kv_caches, weights)
        hidden = self._decode(batch.input_ids, batch.positions, batch.attn, kv_caches)
        # index_select, not hidden[indices]: ATen's advanced indexing starts an OpenMP region even for a decode
        # step's few rows, waking torch's threads while llmkern's own pool runs the kernels (csrc/cpu/parallel.cpp).
        return self.lm_head(hidden.index_select(0, batch.logits_indices))

    def _decoder_weights(self) -> list[Tensor | None] | None:
        """The weights list of llmkern::decoder_step (csrc/ops/decoder.cpp's slot layout), or None when a linear is
        not a dense Linear (quantized or adapted layers step in Python). Cached until a module, parameter or
        buffer is registered anywhere or the model is moved (_apply): building it takes ~35 us a layer of module
        attribute lookups (demo-target: 0.14 ms, a third of its batch-1 decode step)."""
        cache = self.__dict__.get("_decoder_cache")  # absent in a model pickled before it existed
        if cache is not None and cache[0] == _registrations:
            return cache[1]
        layers = self.model.layers
        linears = [self.lm_head] + [m for layer in layers for m in _layer_linears(layer)]
        weights = None
        if all(type(m) is Linear for m in linears) and self.lm_head.bias is None:
            weights = [self.model.embed_tokens.weight, self.model.norm.weight, self.lm_head.weight, self.rope_cache,
                       self.alibi_slopes]  # decoder.cpp's ModelSlot order
            weights += [t for layer in layers for t in _layer_tensors(layer)]
        self._decoder_cache = (_registrations, weights)
        return weights

    def _decoder_step(self, batch, kv_caches: list[tuple[Tensor, Tensor]], weights: list[Tensor | None]) -> Tensor:
        """step() as one llmkern::decoder_step call: the same ops with the same inputs, the layer loop in C++."""
        c, attn, ids = self.config, batch.attn, batch.input_ids
        use_llmkern = 0
        if ids.device.type == "cpu":  # Linear.forward's choice, per kind of linear (q k v o gate up down head)
            rows = [ids.shape[0]] * 7 + [batch.logits_indices.shape[0]]
            for i, (r, slot) in enumerate(zip(rows, _LINEAR_SLOTS)):
                n, k = weights[slot].shape
                use_llmkern |= ops.linear_beats_torch(weights[slot].dtype, r, k, n) << i
        return torch.ops.llmkern.decoder_step(
            ids, batch.positions, attn.cu_seqlens_q, attn.cu_seqlens_k, attn.max_seqlen_q, attn.max_seqlen_k,
            attn.block_tables, attn.slot_mapping, batch.logits_indices, weights,
            [t for kv in kv_caches for t in kv], c.num_heads, c.num_kv_heads, c.head_dim,
            [c.window(i)[0] for i in range(c.num_layers)], c.rms_norm_eps, use_llmkern)


def _layer_linears(layer: DecoderLayer) -> tuple[nn.Module, ...]:
    a, m = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


# decoder_step's weights list (csrc/ops/decoder.cpp's ModelSlot and LayerSlot enums): 5 tensors of the model (the
# output head's weight third), then each layer's in _LAYER_SLOTS' order; a linear's bias follows its weight, None
# where a model has none. _LINEARS: _layer_linears' order, decoder.cpp's LinearKind.
_MODEL_SLOTS, _HEAD_SLOT = 5, 2
_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
_LAYER_SLOTS = ("input_norm", "q", "q_bias", "k", "k_bias", "v", "v_bias", "q_norm", "k_norm", "o", "o_bias",
                "post_norm", "gate", "gate_bias", "up", "up_bias", "down", "down_bias")
# Where the list holds the first layer's linears' weights, then the output head's: the LinearKind bits' order.
_LINEAR_SLOTS = (*(_MODEL_SLOTS + _LAYER_SLOTS.index(name) for name in _LINEARS), _HEAD_SLOT)


def _layer_tensors(layer: DecoderLayer) -> list[Tensor | None]:
    a = layer.self_attn
    qk_norm = hasattr(a, "q_norm")
    tensors = {"input_norm": layer.input_layernorm.weight, "post_norm": layer.post_attention_layernorm.weight,
               "q_norm": a.q_norm.weight if qk_norm else None, "k_norm": a.k_norm.weight if qk_norm else None}
    for name, linear in zip(_LINEARS, _layer_linears(layer)):
        tensors[name], tensors[name + "_bias"] = linear.weight, linear.bias
    return [tensors[name] for name in _LAYER_SLOTS]


# Bumped whenever any module registers a submodule, parameter or buffer: a model's cached decoder_step weights
# list is then rebuilt (quantize_ or a LoRA wrapper replacing a Linear, a new weight assigned).
_registrations = 0


def _registered(*_) -> None:
    global _registrations
    _registrations += 1


nn.modules.module.register_module_module_registration_hook(_registered)
nn.modules.module.register_module_parameter_registration_hook(_registered)
nn.modules.module.register_module_buffer_registration_hook(_registered)


def _packed_positions(input_ids: Tensor, cu_seqlens: Tensor) -> tuple[Tensor, int]:
    """Position of each packed token within its sequence [total] int64, and the longest sequence."""
    if input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: with cu_seqlens expected a packed [1, total], got {tuple(input_ids.shape)}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens: expected int32 [num_seqs + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    lens = cu_seqlens.diff().long()
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != input_ids.shape[1] or (lens < 0).any():
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {input_ids.shape[1]}, "
                         f"got {cu_seqlens.tolist()}")
    starts = cu_seqlens[:-1].long().repeat_interleave(lens)
    return torch.arange(input_ids.shape[1], device=input_ids.device) - starts, int(lens.max())


def shifted_targets(labels: Tensor, shape: tuple[int, int], cu_seqlens: Tensor) -> Tensor:
    """The target of each token [batch * seq] for transformers' ForCausalLMLoss (float32 cross entropy, ignore_index
    -100, mean over counted tokens or sum / num_items_in_batch): the next label, with each sequence's last token
    ignored so packed sequences never score across a boundary."""
    if labels.shape != shape:
        raise ValueError(f"labels: expected shape {shape} (like input_ids), got {tuple(labels.shape)}")
    targets = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1).clone()
    targets[cu_seqlens[1:].long() - 1] = -100
    return targets
