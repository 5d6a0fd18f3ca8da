// The engine's linear products on the CPU: x W^T (+ bias) for a packed nn.Linear.
//
//   linear(x [..., K], packed, weight [N, K], bias [N]?) -> [..., N]
//
// Most products run on oneDNN's prepacked weight (mkldnn::_linear_pointwise). A bf16 product of
// few rows (at most AMX_ROWS) runs here instead, on the CPU's AMX tiles, reading the model's own
// weight as stored: oneDNN pays about 20 us of host work per call on top of its kernel (its
// primitive lookup), a decode step of a small model makes 57 such calls, and at these row counts
// its kernel streams the weights at about a third of what the cache delivers (on a 2-core Xeon
// with AMX: a step's 57 products at 8 rows took 4.2 ms on oneDNN and 2.6 here).
//
// The kernel: W is the tiles' left operand as stored (16 rows of W by 32 of K per tile, one
// row-major block of 16 rows being 16 contiguous rows), x is the right one, packed per call as
// AMX wants it (pairs of K by 16 rows of x: x viewed as 32-bit pairs, transposed). Each 16 x 16
// fp32 accumulator holds out[m, n] transposed; it is written out with the bias added in fp32 and
// rounded to bf16 once, to nearest even, as oneDNN does. The sum over K runs in chunks of 32 in
// the tiles' own order, which is oneDNN's AMX order at these row counts (its outputs and these
// were equal bit for bit in every shape tested); the engine calls this op on both of its paths
// (rollout/engine/packed_linear.py and the fused layers of layer_cpu.cpp), so they agree
// whatever the backend.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define TREE_KERNELS_AMX 1
#endif

namespace {

using at::Tensor;
using Bias = std::optional<Tensor>;

constexpr int64_t AMX_ROWS = 32;  // above this oneDNN's kernel is as fast or faster

Tensor onednn_linear(const Tensor& x, const Tensor& packed, const Bias& bias) {
  using Sig = Tensor(const Tensor&, const Tensor&, const Bias&, std::string_view,
                     c10::List<std::optional<c10::Scalar>>, std::optional<std::string_view>);
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "").typed<Sig>();
  return op.call(x.contiguous(), packed, bias, "none", c10::List<std::optional<c10::Scalar>>(),
                 "");
}

#ifdef TREE_KERNELS_AMX

// Linux hands out the tile registers' state only on request, once per process.
bool amx_permitted() {
  static const bool ok = [] {
    constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
  }();
  return ok;
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// tile 0: 16 rows of W x 32 of K; 2, 3: 16 pairs of K x 16 rows of x (two chunks of x's rows);
// 4, 5: the 16 x 16 fp32 sums of each chunk
void configure_tiles() {
  TileConfig c{};
  c.palette = 1;
  for (int t = 0; t < 6; ++t) {
    c.rows[t] = 16;
    c.colsb[t] = 64;
  }
  _tile_loadconfig(&c);
}

bool amx_fits(const Tensor& x2, const Tensor& weight, const Bias& bias) {
  const int64_t M = x2.size(0), K = x2.size(1);
  return M >= 1 && M <= AMX_ROWS && x2.scalar_type() == at::kBFloat16 &&
         weight.scalar_type() == at::kBFloat16 && weight.layout() == at::kStrided &&
         weight.dim() == 2 && weight.size(1) == K && weight.is_contiguous() && K % 32 == 0 &&
         weight.size(0) % 16 == 0 &&
         (!bias || (bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 &&
                    bias->size(0) == weight.size(0) && bias->layout() == at::kStrided)) &&
         amx_permitted();
}

// x [M, K] (M <= 32) -> [M, N] bf16
Tensor amx_linear(const Tensor& x2, const Tensor& weight, const Bias& bias_in) {
  const Tensor x = x2.contiguous();
  const Tensor bias = bias_in ? bias_in->contiguous() : Tensor();
  const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
  const int64_t chunks = (M + 15) / 16, pairs = K / 2;
  // x as AMX's right operand: chunk c, pair p, row j -> the pair (x[16c + j, 2p], ..2p + 1)
  std::vector<uint32_t> xp(chunks * pairs * 16, 0u);
  const auto* x32 = reinterpret_cast<const uint32_t*>(x.data_ptr());
  for (int64_t m = 0; m < M; ++m) {
    uint32_t* dst = xp.data() + (m / 16) * pairs * 16 + m % 16;
    const uint32_t* src = x32 + m * pairs;
    for (int64_t p = 0; p < pairs; ++p) dst[p * 16] = src[p];
  }
  Tensor out = at::empty({M, N}, x.options());
  const auto* w = reinterpret_cast<const uint16_t*>(weight.data_ptr());
  const auto* b = bias.defined() ? reinterpret_cast<const uint16_t*>(bias.data_ptr()) : nullptr;
  auto* y = reinterpret_cast<uint16_t*>(out.data_ptr());
  at::parallel_for(0, N / 16, 1, [&](int64_t first, int64_t last) {
    configure_tiles();
    alignas(64) float sums[2][16 * 16];  // per chunk: [n][m]
    const __m512i column = _mm512_mullo_epi32(
        _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
        _mm512_set1_epi32(16));
    for (int64_t block = first; block < last; ++block) {
      const uint16_t* a = w + block * 16 * K;
      __m512 bias16 = _mm512_setzero_ps();
      if (b) {
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + block * 16));
        bias16 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      }
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
        const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(column, sums[m / 16] + m % 16, 4),
                                       bias16);
        const __m256bh r = _mm512_cvtneps_pbh(v);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * N + block * 16),
                            reinterpret_cast<const __m256i&>(r));
      }
    }
    _tile_release();
  });
  return out;
}

#endif  // TREE_KERNELS_AMX

Tensor linear(const Tensor& x, const Tensor& packed, const Tensor& weight, const Bias& bias) {
  TORCH_CHECK(x.dim() >= 1, "linear: x must have a last dim");
#ifdef TREE_KERNELS_AMX
  const int64_t K = x.size(-1);
  const Tensor x2 = x.reshape({-1, K});
  if (x.layout() == at::kStrided && amx_fits(x2, weight, bias)) {
    auto shape = x.sizes().vec();
    shape.back() = weight.size(0);
    return amx_linear(x2, weight, bias).view(shape);
  }
#endif
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
