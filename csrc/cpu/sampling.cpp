// Token selection on the CPU: the sampler's argmax, penalties, top-k / top-p filter, whole draw (sample_) and logprobs.
#include "kernels/sampling.h"
#include "ops/common.h"

#include <algorithm>
#include <limits>
#include <string>
#include <tuple>

namespace llmkern {
namespace {

// x [..., n] (n >= 1, unit stride along n) -> int64 [...]: the index of each row's first maximum (first NaN).
Tensor argmax(const Tensor& x) {
  check_device(x, "x", c10::DeviceType::CPU);
  TORCH_CHECK(x.dim() >= 1, "x: expected [..., n], got a 0-dim tensor");
  TORCH_CHECK(x.size(-1) > 0, "x: expected a non-empty last dim (argmax of nothing), got shape ", x.sizes());
  ArgmaxParams p;
  p.dtype = kernel_dtype(x, "x");
  const Rows xr = as_rows(x, "x");
  Tensor out = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kLong));
  p.rows = xr.rows;
  p.cols = xr.cols;
  p.stride = xr.stride;
  p.x = xr.data();
  p.out = out.data_ptr<int64_t>();
  if (p.rows) argmax_kernel(p);
  return out;
}

// Which ends of a per-row value range are open.
enum class Ends { kClosed, kLowOpen, kHighOpen };

// A float32 [rows] tensor of per-row values in the range lo..hi (ends as given), contiguous; NaN refused.
Tensor row_values(const Tensor& v, const char* name, int64_t rows, float lo, float hi, Ends ends = Ends::kClosed) {
  check_device(v, name, c10::DeviceType::CPU);
  TORCH_CHECK(v.dim() == 1 && v.size(0) == rows && v.scalar_type() == at::kFloat,
              name, ": expected float32 [", rows, "], got ", v.scalar_type(), " ", v.sizes());
  Tensor c = v.contiguous();
  const bool lo_open = ends == Ends::kLowOpen, hi_open = ends == Ends::kHighOpen;
  for (int64_t r = 0; r < rows; ++r) {
    const float x = c.data_ptr<float>()[r];
    TORCH_CHECK((lo_open ? x > lo : x >= lo) && (hi_open ? x < hi : x <= hi), name, ": expected values in ",
                lo_open ? "(" : "[", lo, ", ", hi, hi_open ? ")" : "]", ", got ", x, " in row ", r);
  }
  return c;
}

// An int64 [n] tensor with unit stride (n < 0: any length) on the CPU; its data is read through a pointer.
void check_long(const Tensor& t, const char* name, int64_t n) {
  check_device(t, name, c10::DeviceType::CPU);
  TORCH_CHECK(t.dim() == 1 && (n < 0 || t.size(0) == n) && t.scalar_type() == at::kLong && t.is_contiguous(), name,
              ": expected int64 [", n < 0 ? "T" : std::to_string(n), "] with unit stride, got ", t.scalar_type(), " ",
              t.sizes());
}

// logits: float32 [rows, vocab] with unit stride along vocab, written in place.
Rows logits_rows(Tensor& logits) {
  check_device(logits, "logits", c10::DeviceType::CPU);
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat,
              "logits: expected float32 [rows, vocab], got ", logits.scalar_type(), " ", logits.sizes());
  return as_rows(logits, "logits", /*writable=*/true);
}

// The filter's parameters for logits_rows(logits), top_k int64 [rows], top_p float32 [rows] in (0, 1]. The tensors
// they point into stay alive with logits, top_k and top_p.
TopKTopPParams filter_params(Tensor& logits, const Tensor& top_k, const Tensor& top_p) {
  const Rows xr = logits_rows(logits);
  check_long(top_k, "top_k", xr.rows);
  const Tensor p = row_values(top_p, "top_p", xr.rows, 0.f, 1.f, Ends::kLowOpen);
  TORCH_CHECK(p.data_ptr() == top_p.data_ptr(), "top_p: expected a contiguous tensor");
  TopKTopPParams f;
  f.rows = xr.rows;
  f.cols = xr.cols;
  f.stride = xr.stride;
  f.x = static_cast<float*>(xr.data());
  f.top_k = top_k.data_ptr<int64_t>();
  f.top_p = top_p.data_ptr<float>();
  return f;
}

// Removed tokens of logits become -inf in place (kernels/sampling.h).
void top_k_top_p_(Tensor& logits, const Tensor& top_k, const Tensor& top_p) {
  const TopKTopPParams f = filter_params(logits, top_k, top_p);
  if (f.rows && f.cols) top_k_top_p_kernel(f);
}

// logits [rows, vocab] float32 (scratch, overwritten), temperature / top_p / min_p / u float32 [rows], top_k int64
// [rows] -> int64 [rows] (kernels/sampling.h).
Tensor sample_(Tensor& logits, const Tensor& temperature, const Tensor& top_k, const Tensor& top_p,
               const Tensor& min_p, const Tensor& u) {
  TopKTopPParams f = filter_params(logits, top_k, top_p);
  const int64_t rows = f.rows;
  SampleParams p;
  const Tensor t = row_values(temperature, "temperature", rows, 0.f, std::numeric_limits<float>::infinity());
  const Tensor mp = row_values(min_p, "min_p", rows, 0.f, 1.f);
  const Tensor uu = row_values(u, "u", rows, 0.f, 1.f, Ends::kHighOpen);
  Tensor out = at::empty({rows}, logits.options().dtype(at::kLong));
  p.filter = f;
  p.temperature = t.data_ptr<float>();
  p.min_p = mp.data_ptr<float>();
  p.u = uu.data_ptr<float>();
  p.out = out.data_ptr<int64_t>();
  if (rows) sample_kernel(p);
  return out;
}

// logits [rows, vocab] float32 in place; ids int64 [T] with offsets int64 [rows + 1] (row r's history) and output_start
// int64 [rows]; repetition (> 0), frequency, presence float32 [rows] (kernels/sampling.h).
void apply_penalties_(Tensor& logits, const Tensor& ids, const Tensor& offsets, const Tensor& output_start,
                      const Tensor& repetition, const Tensor& frequency, const Tensor& presence) {
  const Rows xr = logits_rows(logits);
  const int64_t rows = xr.rows, vocab = xr.cols;
  check_long(ids, "ids", -1);
  check_long(offsets, "offsets", rows + 1);
  check_long(output_start, "output_start", rows);
  const int64_t* id = ids.data_ptr<int64_t>();
  const int64_t *off = offsets.data_ptr<int64_t>(), *os = output_start.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[rows] <= ids.size(0), "offsets: expected 0 first and at most ", ids.size(0), " last");
  for (int64_t r = 0; r < rows; ++r)
    TORCH_CHECK(off[r] <= os[r] && os[r] <= off[r + 1], "offsets, output_start: row ", r, " expects offsets[r] <= ",
                "output_start[r] <= offsets[r + 1], got ", off[r], ", ", os[r], ", ", off[r + 1]);
  if (off[rows] > 0) {
    const auto [lo, hi] = std::minmax_element(id, id + off[rows]);
    TORCH_CHECK_VALUE(*lo >= 0 && *hi < vocab, "token ids must be in [0, ", vocab, ") (the logits' vocabulary), got ",
                      *lo, "..", *hi);
  }
  constexpr float kInf = std::numeric_limits<float>::infinity(), kMax = std::numeric_limits<float>::max();
  const Tensor rep = row_values(repetition, "repetition", rows, 0.f, kInf, Ends::kLowOpen);
  const Tensor freq = row_values(frequency, "frequency", rows, -kMax, kMax);
  const Tensor pres = row_values(presence, "presence", rows, -kMax, kMax);
  PenaltyParams p;
  p.rows = rows;
  p.cols = vocab;
  p.stride = xr.stride;
  p.x = static_cast<float*>(xr.data());
  p.ids = id, p.offsets = off, p.output_start = os;
  p.repetition = rep.data_ptr<float>(), p.frequency = freq.data_ptr<float>(), p.presence = pres.data_ptr<float>();
  if (rows && vocab) penalties_kernel(p);
}

// logits [rows, vocab] (float32, bfloat16 or float16; unit stride along vocab), tokens int64 [rows] ->
// (token_logprob float32 [rows], rank int64 [rows], top float32 [rows, num_top], top_ids int64 [rows, num_top]).
std::tuple<Tensor, Tensor, Tensor, Tensor> logprobs(const Tensor& logits, const Tensor& tokens, int64_t num_top) {
  check_device(logits, "logits", c10::DeviceType::CPU);
  check_device(tokens, "tokens", c10::DeviceType::CPU);
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logits: expected [rows, vocab] with vocab >= 1, got ",
              logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(tokens.dim() == 1 && tokens.size(0) == rows && tokens.scalar_type() == at::kLong,
              "tokens: expected int64 [", rows, "], got ", tokens.scalar_type(), " ", tokens.sizes());
  TORCH_CHECK(num_top >= 0 && num_top <= vocab, "num_top: expected 0..", vocab, ", got ", num_top);
  const Tensor t = tokens.contiguous();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t id = t.data_ptr<int64_t>()[r];
    TORCH_CHECK_INDEX(id >= 0 && id < vocab, "tokens: expected ids in [0, ", vocab, "), got ", id, " in row ", r);
  }
  LogprobParams p;
  p.dtype = kernel_dtype(logits, "logits");
  const Rows xr = as_rows(logits, "logits");
  const auto f32 = logits.options().dtype(at::kFloat), i64 = logits.options().dtype(at::kLong);
  Tensor lp = at::empty({rows}, f32), rank = at::empty({rows}, i64);
  Tensor top = at::empty({rows, num_top}, f32), top_ids = at::empty({rows, num_top}, i64);
  p.rows = rows, p.cols = vocab, p.stride = xr.stride, p.num_top = num_top;
  p.x = xr.data();
  p.tokens = t.data_ptr<int64_t>();
  p.token_logprob = lp.data_ptr<float>(), p.rank = rank.data_ptr<int64_t>();
  p.top = top.data_ptr<float>(), p.top_ids = top_ids.data_ptr<int64_t>();
  if (rows) logprobs_kernel(p);
  return {lp, rank, top, top_ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmkern, CPU, m) {
  m.impl("logprobs", &logprobs);
  m.impl("apply_penalties_", &apply_penalties_);
  m.impl("argmax", &argmax);
  m.impl("top_k_top_p_", &top_k_top_p_);
  m.impl("sample_", &sample_);
}

}  // namespace llmkern
