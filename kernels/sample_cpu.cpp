// The inverse-CDF draw of rollout/engine/sampling.py as one native op (CPU): the tail of
// `sample` after the log-softmax, with the torch path's bits.
//
// The torch path runs, per step, a dozen ops over the [R, V] rows: exp, cumsum, a counter-based
// uniform per row (a splitmix64 finalizer in int64), a product, searchsorted, clamp and gather.
// Here the exp is torch's own kernel (called from C++: its last bit is torch's), and the rest is
// one pass per row with the same arithmetic:
//   - torch's CPU cumsum of fp32 accumulates in double and rounds each prefix to fp32; so does
//     the scan here, and the total is the last prefix, as `cdf[:, -1]` reads it;
//   - the uniform is the same hash in wrapping 64-bit arithmetic and the same fp32 rounding;
//   - the token is the first whose rounded prefix is >= u * total (searchsorted, side left), the
//     last one where none is (the clamp).
// Rows run eight at a time, so eight independent double chains hide the adds' latency; one pass
// finds each token's chunk of 64 and only that chunk is scanned again; row blocks run in
// parallel on torch's threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

// Products and sums round separately, as the torch ops do (no fused multiply-adds).
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kRows = 8;  // rows scanned together

// sampling.uniform_noise(key)[0]: splitmix64's finalizer of key * GOLDEN + 1 * M2, top 24 bits.
float uniform(int64_t key) {
  const uint64_t golden = 0x9E3779B97F4A7C15ull, m1 = 0xBF58476D1CE4E5B9ull,
                 m2 = 0x94D049BB133111EBull;
  uint64_t z = static_cast<uint64_t>(key) * golden + m2;
  z = (z ^ (z >> 30)) * m1;
  z = (z ^ (z >> 27)) * m2;
  z = z ^ (z >> 31);
  const float top24 = static_cast<float>(z >> 40);
  return (top24 + 0.5f) / 16777216.0f;
}

constexpr int64_t kChunk = 64;  // prefix sums kept every kChunk tokens (the search's start)

// Rows [r0, r0 + N) of p [R, V]: each row's token by the scan above. One pass sums each row in
// order, keeping the double prefix at every chunk's start; the token's chunk is the first whose
// end reaches the target (prefixes never decrease, nor do their fp32 roundings), and only that
// chunk is summed again, from its kept prefix, token by token.
template <int64_t N>
void draw_block(const float* p, int64_t V, const int64_t* keys, int64_t r0, int64_t* tokens,
                double* marks) {
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  double acc[N];
  const float* row[N];
  for (int64_t j = 0; j < N; ++j) acc[j] = 0, row[j] = p + (r0 + j) * V;
  for (int64_t c = 0; c < chunks; ++c) {
    for (int64_t j = 0; j < N; ++j) marks[j * (chunks + 1) + c] = acc[j];
    const int64_t end = std::min(V, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i)
      for (int64_t j = 0; j < N; ++j) acc[j] += row[j][i];
  }
  for (int64_t j = 0; j < N; ++j) {
    const double* mark = marks + j * (chunks + 1);
    const float target = uniform(keys[r0 + j]) * static_cast<float>(acc[j]);
    int64_t token = V - 1;  // none reaches it (NaN): the last, as the clamp gives
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t end = std::min(V, (c + 1) * kChunk);
      const double next = c + 1 < chunks ? mark[c + 1] : acc[j];
      if (!(static_cast<float>(next) >= target)) continue;
      double a = mark[c];
      for (int64_t i = c * kChunk; i < end; ++i) {
        a += row[j][i];
        if (static_cast<float>(a) >= target) {
          token = i;
          break;
        }
      }
      break;
    }
    tokens[r0 + j] = token;
  }
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "sample_rows: ", what); }

// allowed: [R, V] fp32 log-probs the draw may pick (-inf where filtered); logp: [R, V] fp32 the
// log-probs to report; keys: [R] int64. Returns (tokens [R] int64, logp of each token [R] fp32).
std::tuple<at::Tensor, at::Tensor> sample_rows(const at::Tensor& allowed, const at::Tensor& logp,
                                               const at::Tensor& keys) {
  check(allowed.scalar_type() == at::kFloat && allowed.dim() == 2 && allowed.size(1) > 0,
        "allowed must be fp32 [R, V], V > 0");
  check(logp.scalar_type() == at::kFloat && logp.sizes() == allowed.sizes(),
        "logp must be fp32 of allowed's shape");
  check(keys.scalar_type() == at::kLong && keys.dim() == 1 && keys.size(0) == allowed.size(0),
        "keys must be int64 [R]");
  const int64_t R = allowed.size(0), V = allowed.size(1);
  const at::Tensor p = at::exp(allowed).contiguous();
  const at::Tensor k = keys.contiguous();
  at::Tensor tokens = at::empty({R}, keys.options());
  const float* pp = p.data_ptr<float>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  const int64_t blocks = (R + kRows - 1) / kRows;
  const int64_t chunks = (V + kChunk - 1) / kChunk;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<double> marks(kRows * (chunks + 1));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * kRows;
      if (R - r0 >= kRows) {
        draw_block<kRows>(pp, V, kp, r0, tp, marks.data());
      } else {
        for (int64_t r = r0; r < R; ++r) draw_block<1>(pp, V, kp, r, tp, marks.data());
      }
    }
  });
  at::Tensor chosen = logp.gather(1, tokens.unsqueeze(1)).squeeze(1);
  return {tokens, chosen};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tree_kernels_cpu, m) {
  m.def("sample_rows(Tensor allowed, Tensor logp, Tensor keys) -> (Tensor, Tensor)");
  m.impl("sample_rows", c10::DispatchKey::CPU, &sample_rows);
}
