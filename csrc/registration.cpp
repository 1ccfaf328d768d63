// Every llmkern op schema, declared once. Backends register implementations from their own files
// (csrc/cpu/<family>.cpp for CPU, csrc/cuda/bindings.cpp for CUDA).
#include <Python.h>
#include <torch/library.h>

#include <stdexcept>

#include "cpu/vec/dispatch.h"
#include "kernels/parallel.h"

namespace {

std::string cpu_isa() { return llmkern::cpu_isa_name(llmkern::active_cpu_isa()); }

// Runs f, turning the torch-free layer's std::invalid_argument into torch's ValueError.
template <typename F>
void value_errors(F&& f) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

void set_cpu_isa(const std::string& name) { value_errors([&] { llmkern::set_cpu_isa(name); }); }

void set_parallel_backend(const std::string& name, int64_t num_threads) {
  value_errors([&] { llmkern::set_parallel_backend(name, num_threads); });
}

}  // namespace

TORCH_LIBRARY(llmkern, m) {
  // CPU ISA path: the one in use, the ones this CPU supports, and forcing one (like LLMKERN_CPU_ISA).
  m.def("cpu_isa() -> str", &cpu_isa);
  m.def("supported_cpu_isas() -> str[]", &llmkern::supported_cpu_isas);
  m.def("set_cpu_isa(str isa) -> ()", &set_cpu_isa);
  // The kernels' threads: "openmp" (torch's, the default) or "pool" (llmkern's own; csrc/cpu/parallel.cpp).
  m.def("parallel_backend() -> str", &llmkern::parallel_backend);
  m.def("set_parallel_backend(str backend, int num_threads=0) -> ()", &set_parallel_backend);

  // RMSNorm over the last dim: returns (out, rstd); rstd [rows] is saved for the backward.
  m.def("rms_norm(Tensor x, Tensor? weight, float eps, bool weight_offset) -> (Tensor, Tensor)");
  // RMSNorm into a preallocated out.
  m.def("rms_norm_out(Tensor(a!) out, Tensor x, Tensor? weight, float eps, bool weight_offset) -> ()");
  // s = x + residual, then RMSNorm(s): returns (out, s, rstd).
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor? weight, float eps, bool weight_offset)"
        " -> (Tensor, Tensor, Tensor)");
  // In place for inference: residual += x, then x = RMSNorm(residual).
  m.def("fused_add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor? weight, float eps,"
        " bool weight_offset) -> ()");
  // RMSNorm backward: (dx (+ dresidual), dweight); dweight is empty when weight is None.
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, bool weight_offset,"
        " Tensor? dresidual) -> (Tensor, Tensor)");
  // rms_norm_bwd into preallocated dx [..., hidden] and dweight [hidden] (None when weight is None).
  m.def("rms_norm_bwd_out(Tensor(a!) dx, Tensor(b!)? dweight, Tensor dy, Tensor x, Tensor? weight, Tensor rstd,"
        " bool weight_offset, Tensor? dresidual) -> ()");

  // act(x[..., :d]) * x[..., d:] for x [..., 2d]; activation is "silu" or "gelu_tanh".
  m.def("act_and_mul(Tensor x, str activation) -> Tensor");
  // act_and_mul into a preallocated out [..., d].
  m.def("act_and_mul_out(Tensor(a!) out, Tensor x, str activation) -> ()");
  // act_and_mul backward: dx [..., 2d].
  m.def("act_and_mul_bwd(Tensor dy, Tensor x, str activation) -> Tensor");
  // act_and_mul_bwd into a preallocated dx [..., 2d].
  m.def("act_and_mul_bwd_out(Tensor(a!) dx, Tensor dy, Tensor x, str activation) -> ()");
  // act(gate) * up for separate gate and up tensors of one shape.
  m.def("act_mul(Tensor gate, Tensor up, str activation) -> Tensor");
  // act_mul backward: (dgate, dup).
  m.def("act_mul_bwd(Tensor dy, Tensor gate, Tensor up, str activation) -> (Tensor, Tensor)");
  // act_mul_bwd into preallocated dgate and dup (each shaped like gate).
  m.def("act_mul_bwd_out(Tensor(a!) dgate, Tensor(b!) dup, Tensor dy, Tensor gate, Tensor up, str activation) -> ()");

  // RoPE in place on query [tokens, heads, head_dim] and key [tokens, kv_heads, head_dim] at
  // positions [tokens]; cos_sin_cache [max_position, rotary_dim] holds cos then sin halves.
  m.def("rotary_embedding_(Tensor positions, Tensor(a!) query, Tensor(b!)? key, Tensor cos_sin_cache,"
        " bool is_neox) -> ()");
  // RoPE out of place on one tensor; inverse=True rotates by -theta (the backward).
  m.def("rotary_embedding(Tensor positions, Tensor x, Tensor cos_sin_cache, bool is_neox, bool inverse)"
        " -> Tensor");
  // rotary_embedding into a preallocated out shaped like x.
  m.def("rotary_embedding_out(Tensor(a!) out, Tensor positions, Tensor x, Tensor cos_sin_cache, bool is_neox,"
        " bool inverse) -> ()");

  // Attention (math, masks and layouts: kernels/attention.h; Python face: llmkern/ops/attention.py).
  // q [batch, seqlen_q, heads, d], or packed [total_q, heads, d] with cu_seqlens_q [batch + 1] int32;
  // k/v [batch_k, seqlen_k, heads_k, d], packed [total_k, heads_k, d] with cu_seqlens_k, or paged
  // [num_blocks, block_size, heads_k, d] with block_table [batch, max_blocks] int32; seqused_k [batch]
  // int32 keys per sequence; kv_batch_idx [batch] int32 cache row per sequence; alibi_slopes [heads] or
  // [batch, heads] float32; window -1 = unbounded (causal: window_right = 0); softcap 0 = off.
  // -> (out shaped like q, lse float32 [batch, heads, seqlen_q] or [heads, total_q]).
  m.def("flash_attn_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k,"
        " Tensor? seqused_k, Tensor? kv_batch_idx, Tensor? block_table, Tensor? alibi_slopes, int max_seqlen_q,"
        " int max_seqlen_k, float softmax_scale, int window_left, int window_right, float softcap,"
        " int num_splits) -> (Tensor, Tensor)");
  // flash_attn_fwd backward (contiguous or packed k/v): (dq, dk, dv).
  m.def("flash_attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
        " Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, Tensor? alibi_slopes, int max_seqlen_q, int max_seqlen_k,"
        " float softmax_scale, int window_left, int window_right, float softcap) -> (Tensor, Tensor, Tensor)");
  // Scatters k/v [tokens, heads_k, d] into a paged cache [num_blocks, block_size, heads_k, d] at
  // slot_mapping [tokens] int64 (slot = block * block_size + offset; -1 skips the token).
  m.def("write_kv_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");

  // Dense linear x [..., K] @ weight [N, K]^T (+ bias [N]) -> [..., N], one dtype, fp32 accumulation (CPU; the
  // decode-shaped GEMV that reads each weight element once; Python face: llmkern/ops/linear.py).
  m.def("linear(Tensor x, Tensor weight, Tensor? bias=None) -> Tensor");
  // The linears of one x [..., K] (a layer's q, k, v projections): [linear(x, weights[i], biases[i])] in one call;
  // biases: empty, or one [N_i] per weight.
  m.def("linear_group(Tensor x, Tensor[] weights, Tensor[] biases) -> Tensor[]");
  // a [M, K] @ b [K, N] in float32 (CPU): the GEMMs of training's linears (forward over many rows, backward).
  m.def("mm(Tensor a, Tensor b) -> Tensor");

  // One inference step of a Llama-family decoder over a paged KV cache (csrc/ops/decoder.cpp; Python face and
  // the weights list's layout: llmkern/models/llama.py, LlamaForCausalLM.step) -> logits [logits rows, vocab].
  m.def("decoder_step(Tensor input_ids, Tensor positions, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q,"
        " int max_seqlen_k, Tensor block_tables, Tensor slot_mapping, Tensor logits_indices, Tensor?[] weights,"
        " Tensor[] kv_caches, int num_heads, int num_kv_heads, int head_dim, int[] window_left, float eps,"
        " int llmkern_linears) -> Tensor");

  // Weight-only quantization (formats and math: kernels/quant.h; Python face: llmkern/ops/quant.py).
  // Weights are W [N, K] (nn.Linear layout). Codes: nf4 code fp32 [16], nested/blockwise8 code fp32 [256].
  // bitsandbytes' quantize_4bit(nf4): w any shape -> (packed uint8 [(numel + 1) / 2, 1], absmax fp32 [blocks]).
  m.def("quantize_nf4(Tensor w, int block_size, Tensor code) -> (Tensor, Tensor)");
  // bitsandbytes' quantize_blockwise (CPU LUT algorithm): x fp32 -> (q uint8 [numel], absmax fp32 [blocks]).
  m.def("quantize_blockwise8(Tensor x, Tensor code, int block_size) -> (Tensor, Tensor)");
  // NF4 -> Tensor[shape] of dtype; absmax fp32 [blocks], or uint8 codes [blocks] when nested_absmax
  // (fp32 [ceil(blocks / 256)]) and nested_code are given (bitsandbytes' double quant).
  m.def("dequantize_nf4(Tensor packed, Tensor absmax, int[] shape, ScalarType dtype, int block_size, Tensor code,"
        " Tensor? nested_absmax, Tensor? nested_code, float nested_offset) -> Tensor");
  // Group-wise int4 (round to nearest): w [N, K] -> (packed uint8 [N, K / 2], scales [N, K / G] (w's dtype),
  // zeros uint8 [N, K / G], empty [0] when symmetric).
  m.def("quantize_int4(Tensor w, int group_size, bool symmetric) -> (Tensor, Tensor, Tensor)");
  // int4 -> [N, K] of dtype (None: scales' dtype); zeros None means symmetric (zero point 8).
  m.def("dequantize_int4(Tensor packed, Tensor scales, Tensor? zeros, int group_size, ScalarType? dtype) -> Tensor");
  // Per-row int8: w [N, K] -> (q int8 [N, K], scales [N] (w's dtype)).
  m.def("quantize_int8(Tensor w) -> (Tensor, Tensor)");
  // int8 -> [N, K] of dtype (None: scales' dtype).
  m.def("dequantize_int8(Tensor q, Tensor scales, ScalarType? dtype) -> Tensor");
  // x [..., K] @ dequantize_nf4(W [out_features, K]).T (+ bias [out_features]) -> [..., out_features] in x's dtype.
  m.def("nf4_linear(Tensor x, Tensor packed, Tensor absmax, int out_features, int block_size, Tensor code,"
        " Tensor? bias, Tensor? nested_absmax, Tensor? nested_code, float nested_offset) -> Tensor");
  // x [..., K] @ dequantize_int4(packed [N, K / 2], scales, zeros).T (+ bias [N]) -> [..., N] in x's dtype.
  m.def("int4_linear(Tensor x, Tensor packed, Tensor scales, Tensor? zeros, int group_size, Tensor? bias) -> Tensor");
  // x [..., K] @ dequantize_int8(q [N, K], scales [N]).T (+ bias [N]) -> [..., N] in x's dtype.
  m.def("int8_linear(Tensor x, Tensor q, Tensor scales, Tensor? bias) -> Tensor");

  // Softmax cross entropy (Python face: llmkern/ops/loss.py): logits [..., vocab] become scale * (softmax - onehot),
  // the gradient of scale * loss; -> loss [...] (0 where targets [...] int64 == ignore_index), float32 (float64 for
  // float64 logits). CPU.
  m.def("cross_entropy_grad_(Tensor(a!) logits, Tensor targets, float scale, int ignore_index) -> Tensor");

  // Token selection (Python face: llmkern/ops/sampling.py). Greedy: x [..., n] -> int64 [...], the index of each row's
  // first maximum (its first NaN if it holds one), as torch.argmax(x, -1). CPU.
  m.def("argmax(Tensor x) -> Tensor");
  // Sampling's top-k then top-p filter: logits [rows, vocab] float32 get -inf where removed; top_k int64 [rows] (<= 0:
  // none), top_p float32 [rows] in (0, 1] (1: none). Ties with a cut's value are kept. CPU.
  m.def("top_k_top_p_(Tensor(a!) logits, Tensor top_k, Tensor top_p) -> ()");
  // Repetition, frequency and presence penalties on logits float32 [rows, vocab] in place, from the token histories
  // ids int64 [T] (row r: ids[offsets[r], offsets[r + 1]), its output tokens from output_start[r]). CPU.
  m.def("apply_penalties_(Tensor(a!) logits, Tensor ids, Tensor offsets, Tensor output_start, Tensor repetition,"
        " Tensor frequency, Tensor presence) -> ()");
  // log_softmax(logits [rows, vocab]) at tokens int64 [rows], each token's rank (1 = the most likely) and the num_top
  // largest log-probabilities, descending, with their ids: (float32 [rows], int64 [rows], float32 [rows, num_top],
  // int64 [rows, num_top]). CPU.
  m.def("logprobs(Tensor logits, Tensor tokens, int num_top) -> (Tensor, Tensor, Tensor, Tensor)");
  // One token per row: temperature (0: argmax), top-k, top-p, min-p, then the inverse CDF at u float32 [rows]; logits
  // float32 [rows, vocab] are scratch (overwritten). -> int64 [rows]. CPU.
  m.def("sample_(Tensor(a!) logits, Tensor temperature, Tensor top_k, Tensor top_p, Tensor min_p, Tensor u) -> Tensor");

  // Benchmark ceilings: wide-SIMD copy and read loops and register-only FMA chains over all threads
  // (bench/harness.py).
  m.def("bench_copy_(Tensor(a!) dst, Tensor src) -> ()");
  m.def("bench_read(Tensor src) -> float");
  m.def("bench_fma_(Tensor(a!) out, int iters) -> int");
}

// `import llmkern._C` loads this library, which runs the registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "llmkern compiled ops", -1, nullptr};
  return PyModule_Create(&module);
}
