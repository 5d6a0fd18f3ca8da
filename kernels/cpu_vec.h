// Vector helpers of the native CPU ops (cascade_cpu_native.cpp, fused_cpu.cpp).
//
// GCC/Clang vector extensions: 16 floats as one AVX-512 register, or two AVX2 ones, whatever
// -march=native offers. bf16 loads widen exactly; bf16 stores round to nearest even as
// c10::BFloat16 does, so a native op writes the bits a torch op writes for the same fp32 value.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstring>

namespace tree_kernels_cpu {

// 16 floats as one vector (GCC/Clang vector extensions: one AVX-512 register, or two AVX2 ones,
// whatever -march=native offers). Head dims are whole vectors (the caller checks D % 16 == 0).
constexpr int64_t W = 16;
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));
typedef uint32_t vu __attribute__((vector_size(64)));

inline vf splat(float x) { return vf{} + x; }
inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf load(const at::BFloat16* p) {  // bf16 is the high half of an fp32
  vh h;
  std::memcpy(&h, p, sizeof h);
  vu u = __builtin_convertvector(h, vu) << 16;
  vf v;
  std::memcpy(&v, &u, sizeof v);
  return v;
}
inline float hsum(vf v) {  // a fixed tree of halves: results do not depend on threads or batches
  v += __builtin_shuffle(v, vi{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, vi{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, vi{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  return v[0] + v[1];
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// v rounded to bf16 (to nearest even) and widened back, in registers; a NaN stays a NaN.
inline vf round_bf16(vf v) {
  vu u;
  std::memcpy(&u, &v, sizeof u);
  const vi nan = v != v;
  const vu rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const vu bits = nan ? (u | 0x00400000u) & 0xffff0000u : rounded;  // a quiet NaN
  vf out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

inline void store(at::BFloat16* p, vf v) {  // round to nearest even, as c10::BFloat16 does
  vf r = round_bf16(v);
  vu u;
  std::memcpy(&u, &r, sizeof u);
  vh h = __builtin_convertvector(u >> 16, vh);
  std::memcpy(p, &h, sizeof h);
}

// exp(x) for x in [-87.3, 88.3] (Cephes' expf: ln 2 split in two, degree-6 polynomial, ~1 ulp).
inline vf exp_core(vf c) {
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf k = (c * 1.44269504088896341f + magic) - magic;
  vf r = c - k * 0.693359375f + k * 2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  vi e = (__builtin_convertvector(k, vi) + 127) << 23;
  vf two_k;
  std::memcpy(&two_k, &e, sizeof two_k);
  return y * two_k;
}

// exp(x) for x <= 0 or -inf: 0 below -87.3 (hidden scores are -inf).
inline vf exp_nonpositive(vf x) {
  const vi hidden = x < splat(-87.3f);
  return hidden ? splat(0.f) : exp_core(hidden ? splat(-87.3f) : x);
}

}  // namespace tree_kernels_cpu
