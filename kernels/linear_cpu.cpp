// The engine's linear products on the CPU: x W^T (+ bias) for a packed nn.Linear.
//
//   linear(x [..., K], packed, weight [N, K], bias [N]?) -> [..., N]
//
// Most products run on oneDNN's prepacked weight (mkldnn::_linear_pointwise). A product of few
// rows runs here instead, on the model's own weight as stored: at most AMX_ROWS rows in bf16 on
// the CPU's AMX tiles, at most FMA_ROWS in fp32 on AVX-512. oneDNN costs about 20 us per call
// beyond its kernel (a 16 x 64 product takes 22 us; its verbose log times the kernel at 2-3), a
// decode step of a small model makes 57 such calls, and at these row counts its kernels stream
// the weights at about a third of what the cache delivers. On a 2-core Xeon with AMX, a step's 57
// products over 8 layers' distinct weights (so read from cache, not L2): bf16 at 8 rows 3.8 ms on
// oneDNN and 2.1 here, at 32 rows 4.6 and 3.6; fp32 at 8 rows 7.1 and 3.9, at 16 rows 6.3 and 4.7.
//
// bf16: W is the tiles' left operand as stored (16 rows of W by 32 of K per tile, one block of
// 16 rows being 16 contiguous rows), x is the right one, packed per call as AMX wants it (pairs
// of K by 16 rows of x: x viewed as 32-bit pairs, transposed). Each 16 x 16 fp32 accumulator
// holds out[m, n] transposed; it is written out with the bias added in fp32 and rounded to bf16
// once, to nearest even, as oneDNN and c10::BFloat16 do (cpu_vec.h's store). The sum over K
// runs in chunks of 32 in the tiles' own order, which is oneDNN's AMX order at these row counts
// (its outputs and these were equal bit for bit in every shape tested).
// fp32: two rows of W by up to eight of x at a time, each sum in 16 lanes over K, then the lanes'
// fixed tree; rows of W are prefetched a step ahead. The sum order differs from oneDNN's and
// MKL's (as theirs differ from each other) and does not depend on the threads.
// The engine calls this op on both of its paths (rollout/engine/packed_linear.py and the fused
// layers of layer_cpu.cpp), so they agree bit for bit whatever the backend.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "cpu_vec.h"

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define TREE_KERNELS_AVX512 1
#endif
#include "amx.h"

namespace {

using namespace tree_kernels_cpu;
using at::Tensor;
using Bias = std::optional<Tensor>;

constexpr int64_t AMX_ROWS = 32;  // bf16: above this oneDNN's kernel is as fast or faster
constexpr int64_t FMA_ROWS = 16;  // fp32: likewise

Tensor onednn_linear(const Tensor& x, const Tensor& packed, const Bias& bias) {
  using Sig = Tensor(const Tensor&, const Tensor&, const Bias&, std::string_view,
                     c10::List<std::optional<c10::Scalar>>, std::optional<std::string_view>);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "").typed<Sig>();
  return op.call(x.contiguous(), packed, bias, "none", c10::List<std::optional<c10::Scalar>>(),
                 "");
}

// Whether an own kernel takes this product: at most `rows` rows of `dtype`, W contiguous [N, K]
// with K a multiple of `k_grain` and N of `n_grain`, a bias of W's dtype or none.
bool own_fits(int64_t M, const Tensor& x, const Tensor& weight, const Bias& bias, int64_t rows,
              at::ScalarType dtype, int64_t k_grain, int64_t n_grain) {
  const int64_t K = x.size(-1);
  return M >= 1 && M <= rows && x.scalar_type() == dtype && weight.scalar_type() == dtype &&
         weight.layout() == at::kStrided && weight.dim() == 2 && weight.size(1) == K &&
         weight.is_contiguous() && K % k_grain == 0 && weight.size(0) % n_grain == 0 &&
         (!bias || (bias->scalar_type() == dtype && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0) && bias->layout() == at::kStrided));
}

#ifdef TREE_KERNELS_AVX512

// fp32: NN rows of W by MM rows of x, each sum 16 lanes over K then the lanes' fixed tree (a
// prefetch past W's end is harmless: prefetches do not fault)
template <int NN, int MM>
void fma_block(const float* w, int64_t K, const float* x, float* sums) {
  __m512 acc[NN][MM];
  for (int j = 0; j < NN; ++j)
    for (int i = 0; i < MM; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    __m512 wv[NN];
    for (int j = 0; j < NN; ++j) {
      wv[j] = _mm512_loadu_ps(w + j * K + k);
      // the next rows' line: this CPU's prefetchers keep too few lines in flight on their own
      // (8 rows of x over a step's fp32 weights: 1.85x faster with it, 0.8x oneDNN without)
      _mm_prefetch(reinterpret_cast<const char*>(w + (NN + j) * K + k), _MM_HINT_T0);
    }
    for (int i = 0; i < MM; ++i) {
      const __m512 xv = _mm512_loadu_ps(x + i * K + k);
      for (int j = 0; j < NN; ++j) acc[j][i] = _mm512_fmadd_ps(wv[j], xv, acc[j][i]);
    }
  }
  for (int j = 0; j < NN; ++j)
    for (int i = 0; i < MM; ++i) sums[j * 8 + i] = _mm512_reduce_add_ps(acc[j][i]);
}

template <int NN>
void fma_rows(const float* w, int64_t K, const float* x, int64_t rows, float* sums) {
  switch (rows) {
    case 1: return fma_block<NN, 1>(w, K, x, sums);
    case 2: return fma_block<NN, 2>(w, K, x, sums);
    case 3: return fma_block<NN, 3>(w, K, x, sums);
    case 4: return fma_block<NN, 4>(w, K, x, sums);
    case 5: return fma_block<NN, 5>(w, K, x, sums);
    case 6: return fma_block<NN, 6>(w, K, x, sums);
    case 7: return fma_block<NN, 7>(w, K, x, sums);
    default: return fma_block<NN, 8>(w, K, x, sums);
  }
}

// x [..., K] of M rows (M <= FMA_ROWS) -> `shape` ([..., N]) fp32
Tensor fma_linear(const Tensor& x_in, int64_t M, const Tensor& weight, const Bias& bias_in,
                  at::IntArrayRef shape) {
  const Tensor x = x_in.contiguous();
  const Tensor bias = bias_in ? bias_in->contiguous() : Tensor();
  const int64_t K = x.size(-1), N = weight.size(0);
  Tensor out = at::empty(shape, x.options());
  const float* w = weight.data_ptr<float>();
  const float* xs = x.data_ptr<float>();
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  at::parallel_for(0, (N + 1) / 2, 8, [&](int64_t first, int64_t last) {
    float sums[2 * 8];
    for (int64_t g = first; g < last; ++g) {
      const int64_t n = 2 * g, nn = std::min<int64_t>(2, N - n);
      for (int64_t m = 0; m < M; m += 8) {
        const int64_t mm = std::min<int64_t>(8, M - m);
        if (nn == 2) fma_rows<2>(w + n * K, K, xs + m * K, mm, sums);
        else fma_rows<1>(w + n * K, K, xs + m * K, mm, sums);
        for (int64_t j = 0; j < nn; ++j)
          for (int64_t i = 0; i < mm; ++i)
            y[(m + i) * N + n + j] = b ? sums[j * 8 + i] + b[n + j] : sums[j * 8 + i];
      }
    }
  });
  return out;
}

#endif  // TREE_KERNELS_AVX512

#ifdef TREE_KERNELS_AMX

// tile 0: 16 rows of W x 32 of K; 2, 3: 16 pairs of K x 16 rows of x (two chunks of x's rows);
// 4, 5: the 16 x 16 fp32 sums of each chunk
// x [..., K] of M rows (M <= 32) -> `shape` ([..., N]) bf16
Tensor amx_linear(const Tensor& x_in, int64_t M, const Tensor& weight, const Bias& bias_in,
                  at::IntArrayRef shape) {
  const Tensor x = x_in.contiguous();
  const Tensor bias = bias_in ? bias_in->contiguous() : Tensor();
  const int64_t K = x.size(-1), N = weight.size(0);
  const int64_t chunks = (M + 15) / 16, pairs = K / 2;
  // x as AMX's right operand: chunk c, pair p, row j -> the pair (x[16c + j, 2p], ..2p + 1)
  std::vector<uint32_t> xp(chunks * pairs * 16, 0u);
  const auto* x32 = reinterpret_cast<const uint32_t*>(x.data_ptr());
  for (int64_t m = 0; m < M; ++m) {
    uint32_t* dst = xp.data() + (m / 16) * pairs * 16 + m % 16;
    const uint32_t* src = x32 + m * pairs;
    for (int64_t p = 0; p < pairs; ++p) dst[p * 16] = src[p];
  }
  Tensor out = at::empty(shape, x.options());
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const auto* b = bias.defined() ? bias.data_ptr<at::BFloat16>() : nullptr;
  auto* y = out.data_ptr<at::BFloat16>();
  at::parallel_for(0, N / 16, 1, [&](int64_t first, int64_t last) {
    configure_tiles(6);
    alignas(64) float sums[2][16 * 16];  // per chunk: [n][m]
    const __m512i column = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16));
    for (int64_t block = first; block < last; ++block) {
      const uint16_t* a = w + block * 16 * K;
      const vf bias16 = b ? load(b + block * 16) : splat(0.f);
      const bool two = chunks == 2;
      _tile_zero(4);
      if (two) _tile_zero(5);
      for (int64_t k = 0; k < K / 32; ++k) {
        _tile_loadd(0, a + k * 32, K * 2);
        _tile_loadd(2, xp.data() + k * 256, 64);
        _tile_dpbf16ps(4, 0, 2);
        if (two) {
          _tile_loadd(3, xp.data() + pairs * 16 + k * 256, 64);
          _tile_dpbf16ps(5, 0, 3);
        }
      }
      _tile_stored(4, sums[0], 64);
      if (two) _tile_stored(5, sums[1], 64);
      for (int64_t m = 0; m < M; ++m) {
        const vf sum = (vf)_mm512_i32gather_ps(column, sums[m / 16] + m % 16, 4);
        store(y + m * N + block * 16, sum + bias16);  // rounded as c10::BFloat16 rounds
      }
    }
    _tile_release();
  });
  return out;
}

#endif  // TREE_KERNELS_AMX

Tensor linear(const Tensor& x, const Tensor& packed, const Tensor& weight, const Bias& bias) {
  TORCH_CHECK(x.dim() >= 1, "linear: x must have a last dim");
  // NOTE: no views here: after a product has streamed its weight through L2, every tensor op
  // costs microseconds of cache misses (measured: a reshape and a view added 5 us a call)
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0;
  const auto shape = [&] {
    auto s = x.sizes().vec();
    s.back() = weight.size(0);
    return s;
  };
  if (x.layout() == at::kStrided) {
#ifdef TREE_KERNELS_AMX
    if (own_fits(M, x, weight, bias, AMX_ROWS, at::kBFloat16, 32, 16) && amx_permitted())
      return amx_linear(x, M, weight, bias, shape());
#endif
#ifdef TREE_KERNELS_AVX512
    if (own_fits(M, x, weight, bias, FMA_ROWS, at::kFloat, 16, 1))
      return fma_linear(x, M, weight, bias, shape());
#endif
  }
  return onednn_linear(x, packed, bias);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tree_kernels_cpu, m) {
  m.def("linear(Tensor x, Tensor packed, Tensor weight, Tensor? bias) -> Tensor");
  // the packed weight is a oneDNN tensor (MkldnnCPU), the rest plain CPU tensors
  for (const auto key : {c10::DispatchKey::CPU, c10::DispatchKey::MkldnnCPU}) {
    m.impl("linear", key, &linear);
  }
}
