// Token selection (greedy argmax) and sampling's compiled pieces: kernel parameters and CPU entry points.
// out[r] = the index of the largest element of row r of x [rows, cols] (row stride `stride` elements, unit stride
// along cols), the first one on ties; a row holding NaN gives its first NaN, as torch.argmax does. cols >= 1.
#pragma once
#include <cstdint>
#include "cpu/vec/dispatch.h"
#include "kernels/dtype.h"

namespace llmkern {

struct ArgmaxParams {
  DType dtype;
  int64_t rows = 0, cols = 0, stride = 0;
  const void* x = nullptr;
  int64_t* out = nullptr;  // [rows]
};

LLMKERN_DECLARE_CPU_KERNEL(argmax_kernel, ArgmaxParams)

// Top-k then top-p (transformers' TopKLogitsWarper then TopPLogitsWarper) on float32 logits x [rows, cols] in place:
// removed tokens become -inf. Top-k keeps the values >= the k-th largest; top-p then keeps, in the top-k-filtered
// softmax, every value whose strictly larger values hold less than top_p of the probability. Ties with a boundary
// value are kept (a sort would break them arbitrarily). A row holding NaN is left as it is.
struct TopKTopPParams {
  int64_t rows = 0, cols = 0, stride = 0;
  float* x = nullptr;
  const int64_t* top_k = nullptr;  // [rows]; <= 0 or >= cols: no top-k
  const float* top_p = nullptr;    // [rows], in (0, 1]; 1: no top-p
};

LLMKERN_DECLARE_CPU_KERNEL(top_k_top_p_kernel, TopKTopPParams)

// One token per row of float32 logits x [rows, cols] (overwritten: scratch), as transformers' warpers and an inverse
// CDF draw pick it: temperature 0 gives the row's argmax (ties: the first; NaN: the first NaN). Otherwise x / t, top-k,
// top-p (as top_k_top_p_kernel), min-p (drops the tokens whose probability is below min_p times the largest), then
// the first token whose cumulative probability exceeds u times the total. A row holding NaN gives its first NaN.
struct SampleParams {
  TopKTopPParams filter;             // x and the per-row top_k, top_p
  const float* temperature = nullptr;  // [rows], >= 0
  const float* min_p = nullptr;        // [rows], in [0, 1]; 0: no min-p
  const float* u = nullptr;            // [rows], in [0, 1)
  int64_t* out = nullptr;              // [rows]
};

LLMKERN_DECLARE_CPU_KERNEL(sample_kernel, SampleParams)

// Penalties on float32 logits x [rows, cols] in place, from each row's token history ids[offsets[r], offsets[r + 1])
// (ids in [0, cols)), whose output tokens start at output_start[r]. transformers' repetition penalty over every
// distinct token of the history (x * penalty where x < 0, x / penalty otherwise), then vLLM's frequency and presence
// penalties over the output tokens (x - frequency * count - presence).
struct PenaltyParams {
  int64_t rows = 0, cols = 0, stride = 0;
  float* x = nullptr;
  const int64_t *ids = nullptr, *offsets = nullptr, *output_start = nullptr;  // offsets [rows + 1]
  const float *repetition = nullptr, *frequency = nullptr, *presence = nullptr;  // [rows]
};

LLMKERN_DECLARE_CPU_KERNEL(penalties_kernel, PenaltyParams)

// Log-probabilities of chosen tokens, as log_softmax(x) gives them ((x - max) - log(sum(exp(x - max))) in float32),
// with each token's rank (1 + the number of larger log-probabilities) and the row's num_top largest, descending
// (ties: the lower index first).
struct LogprobParams {
  DType dtype;
  int64_t rows = 0, cols = 0, stride = 0, num_top = 0;
  const void* x = nullptr;
  const int64_t* tokens = nullptr;  // [rows], in [0, cols)
  float* token_logprob = nullptr;   // [rows]
  int64_t* rank = nullptr;          // [rows]
  float* top = nullptr;             // [rows, num_top]
  int64_t* top_ids = nullptr;       // [rows, num_top]
};

LLMKERN_DECLARE_CPU_KERNEL(logprobs_kernel, LogprobParams)

}  // namespace llmkern
