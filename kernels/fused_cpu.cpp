// Three of a decoder layer's elementwise forwards as one native op each (CPU, fp32 or bf16).
//
// Llama's RMSNorm runs eight torch ops (a cast, pow, mean, add, rsqrt, two products, a cast), its
// gated MLP's `act_fn(gate) * up` two and its RoPE sixteen; on a decode step of a few rows each
// op costs more host time than arithmetic, so the step pays for the number of ops. These give the
// torch ops' bits (fused_cpu.py holds the torch specs; tests/test_fused_cpu.py checks equality):
// where the rounding is a reduction's sum order or an exp's last bit, they call torch's own
// kernels from C++ (the sum of the norm's squares, the silu), and fuse the rest in one pass that
// rounds where the torch ops round:
//   rms_norm:  y = w * dtype(x * 1 / sqrt(mean(x^2) + eps)), x widened to fp32; torch's mean of
//              fp32 on the CPU is its sum divided by n, and x^2 is x * x;
//   silu_mul:  y = dtype(silu(g) * u);
//   rope:      y = dtype(dtype(x * cos) + dtype(rotate_half(x) * sin)), for q and k at once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu_vec.h"

// Products and sums round separately, as the torch ops do (no fused multiply-adds).
#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>

namespace {

using namespace tree_kernels_cpu;

inline float widen(float x) { return x; }
inline float widen(at::BFloat16 x) { return static_cast<float>(x); }
template <typename T>
inline float round_to(float x) {  // what a torch op of dtype T stores for x
  return widen(static_cast<T>(x));
}
template <typename T>
inline vf round_to(vf x) {
  if constexpr (std::is_same_v<T, float>)
    return x;
  else
    return round_bf16(x);
}

// x^2 in fp32 over [a, b) (torch's pow(2) of a float is x * x).
template <typename T>
void square_span(const T* x, float* sq, int64_t a, int64_t b) {
  int64_t i = a;
  for (; i + W <= b; i += W) {
    const vf v = load(x + i);
    const vf s = v * v;
    std::memcpy(sq + i, &s, sizeof s);
  }
  for (; i < b; ++i) sq[i] = widen(x[i]) * widen(x[i]);
}

// Rows [r0, r1) of x [rows, n] into y [rows, n], given each row's sum of squares (fp32, torch's
// sum: its mean is that sum divided by n).
template <typename T>
void rms_rows(const T* x, const T* w, const float* sum, T* y, int64_t r0, int64_t r1, int64_t n,
              float eps) {
  const int64_t body = n / W * W;
  const float count = static_cast<float>(n);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * n;
    T* yr = y + r * n;
    const float var = sum[r] / count;
    const float inv = 1.f / std::sqrt(var + eps);  // torch's rsqrt: a rounded sqrt, divided
    for (int64_t i = 0; i < body; i += W)
      store(yr + i, load(w + i) * round_to<T>(load(xr + i) * inv));
    for (int64_t i = body; i < n; ++i)
      yr[i] = static_cast<T>(widen(w[i]) * round_to<T>(widen(xr[i]) * inv));
  }
}

// y = s * u over [a, b), rounded as torch's mul rounds it.
template <typename T>
void mul_span(const T* s, const T* u, T* y, int64_t a, int64_t b) {
  int64_t i = a;
  for (; i + W <= b; i += W) store(y + i, load(s + i) * load(u + i));
  for (; i < b; ++i) y[i] = static_cast<T>(widen(s[i]) * widen(u[i]));
}

constexpr int64_t kGrain = 16384;  // elements per thread below which one thread runs it all

void check(bool ok, const char* op, const char* what) { TORCH_CHECK(ok, op, ": ", what); }

bool supported(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check(supported(x) && weight.scalar_type() == x.scalar_type(), "rms_norm",
        "x and weight must share a dtype, fp32 or bf16");
  check(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm",
        "weight must be [n] for x [..., n]");
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  // The squares here, their sum by torch's own kernel (its order: torch's mean is that sum
  // divided by n), the rest in one pass.
  const int64_t n = x.size(-1), rows = n ? xc.numel() / n : 0;
  at::Tensor sq = at::empty(xc.sizes(), xc.options().dtype(at::kFloat));
  auto square = [&](auto* xp) {
    float* sp = sq.data_ptr<float>();
    at::parallel_for(0, xc.numel(), kGrain,
                     [&](int64_t a, int64_t b) { square_span(xp, sp, a, b); });
  };
  if (x.scalar_type() == at::kBFloat16)
    square(xc.data_ptr<at::BFloat16>());
  else
    square(xc.data_ptr<float>());
  const at::Tensor sum = sq.sum(-1).contiguous();
  at::Tensor y = at::empty_like(xc);
  const float e = static_cast<float>(eps);
  const float* vp = sum.data_ptr<float>();
  auto run = [&](auto* xp, auto* wp, auto* yp) {
    at::parallel_for(0, rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(n, 1)),
                     [&](int64_t r0, int64_t r1) { rms_rows(xp, wp, vp, yp, r0, r1, n, e); });
  };
  if (x.scalar_type() == at::kBFloat16)
    run(xc.data_ptr<at::BFloat16>(), wc.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>());
  else
    run(xc.data_ptr<float>(), wc.data_ptr<float>(), y.data_ptr<float>());
  return y;
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check(supported(gate) && up.scalar_type() == gate.scalar_type(), "silu_mul",
        "gate and up must share a dtype, fp32 or bf16");
  check(gate.sizes() == up.sizes(), "silu_mul", "gate and up must have one shape");
  // torch's own silu (its exp), then the product in place.
  at::Tensor s = at::silu(gate.contiguous());
  const at::Tensor uc = up.contiguous();
  auto run = [&](auto* sp, auto* up_) {
    at::parallel_for(0, s.numel(), kGrain,
                     [&](int64_t a, int64_t b) { mul_span(sp, up_, sp, a, b); });
  };
  if (gate.scalar_type() == at::kBFloat16)
    run(s.data_ptr<at::BFloat16>(), uc.data_ptr<at::BFloat16>());
  else
    run(s.data_ptr<float>(), uc.data_ptr<float>());
  return s;
}

// One rotated row: out = R(R(x * cos) + R(rotate_half(x) * sin)), rotate_half(x) = [-x2, x1].
template <typename T>
void rope_row(const T* x, const T* c, const T* s, T* out, int64_t D) {
  const int64_t half = D / 2;
  if (half % W == 0) {
    for (int64_t d = 0; d < half; d += W) {
      const vf lo = load(x + d), hi = load(x + half + d);
      store(out + d, round_to<T>(lo * load(c + d)) + round_to<T>(-hi * load(s + d)));
      store(out + half + d,
            round_to<T>(hi * load(c + half + d)) + round_to<T>(lo * load(s + half + d)));
    }
    return;
  }
  for (int64_t d = 0; d < D; ++d) {
    const float rot = d < half ? -widen(x[d + half]) : widen(x[d - half]);
    out[d] = static_cast<T>(round_to<T>(widen(x[d]) * widen(c[d])) +
                            round_to<T>(rot * widen(s[d])));
  }
}

// x [B, H, T, D] (unit stride in D), cos and sin [B, T, D] broadcast over the heads.
template <typename T>
void rope_one(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out) {
  const int64_t B = x.size(0), H = x.size(1), T_ = x.size(2), D = x.size(3);
  const T *xp = x.data_ptr<T>(), *cp = cos.data_ptr<T>(), *sp = sin.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const auto xs = x.strides(), os = out.strides(), cs = cos.strides(), ss = sin.strides();
  at::parallel_for(0, B * H * T_, std::max<int64_t>(1, kGrain / D), [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) {
      const int64_t bi = i / (H * T_), h = i / T_ % H, t = i % T_;
      rope_row(xp + bi * xs[0] + h * xs[1] + t * xs[2], cp + bi * cs[0] + t * cs[1],
               sp + bi * ss[0] + t * ss[1], op + bi * os[0] + h * os[1] + t * os[2], D);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k,
                                        const at::Tensor& cos, const at::Tensor& sin) {
  check(supported(q) && k.scalar_type() == q.scalar_type() &&
            cos.scalar_type() == q.scalar_type() && sin.scalar_type() == q.scalar_type(),
        "rope", "q, k, cos and sin must share a dtype, fp32 or bf16");
  check(q.dim() == 4 && k.dim() == 4 && cos.dim() == 3 && cos.sizes() == sin.sizes() &&
            q.size(0) == k.size(0) && q.size(2) == k.size(2) && q.size(3) == k.size(3) &&
            cos.size(0) == q.size(0) && cos.size(1) == q.size(2) && cos.size(2) == q.size(3) &&
            q.size(3) % 2 == 0,
        "rope", "q [B, H, T, D], k [B, KVH, T, D], cos and sin [B, T, D], D even");
  check(q.stride(3) == 1 && k.stride(3) == 1 && cos.stride(2) == 1 && sin.stride(2) == 1, "rope",
        "unit stride in D");
  at::Tensor q_out = at::empty_like(q), k_out = at::empty_like(k);
  check(q_out.stride(3) == 1 && k_out.stride(3) == 1, "rope", "unit stride in D");
  if (q.scalar_type() == at::kBFloat16) {
    rope_one<at::BFloat16>(q, cos, sin, q_out);
    rope_one<at::BFloat16>(k, cos, sin, k_out);
  } else {
    rope_one<float>(q, cos, sin, q_out);
    rope_one<float>(k, cos, sin, k_out);
  }
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tree_kernels_cpu, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.impl("rms_norm", c10::DispatchKey::CPU, &rms_norm);
  m.impl("silu_mul", c10::DispatchKey::CPU, &silu_mul);
  m.def("rope(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
  m.impl("rope", c10::DispatchKey::CPU, &rope);
}
