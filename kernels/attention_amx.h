// One plan group's attention on the CPU (cascade_cpu_native.cpp's op), and the exact log-sum-exp
// merge of a partial into the step's accumulators that each of its kernels ends with.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace tree_kernels_cpu {

// A plan group's index tensors, read in place: segment s's key l is at pool slot
// slots[s * L + l]; its query n is q_index[s * N + n] (T: padding) and sees keys
// [q_first, q_limit) of the segment.
struct Group {
  const int64_t *slots, *q_index, *q_first, *q_limit;
  int64_t S, L, N;
};

// Merge one partial (o: D unnormalized fp32 sums, their softmax's max `top` and total) into an
// accumulator row: lse' = logaddexp(lse_acc, lse), each side weighted exactly (METHODS.md).
inline void merge_row(float* acc, float* acc_lse, const float* o, float top, float total,
                      int64_t D) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const float lse = top + std::log(total), prev = *acc_lse;
  float wa = 0.f, wb = 1.f / total, merged = lse;
  if (prev != ninf) {
    const float m = std::max(prev, lse);
    const float ea = std::exp(prev - m), eb = std::exp(lse - m), both = ea + eb;
    wa = ea / both, wb = eb / (both * total), merged = m + std::log(both);
  }
  for (int64_t d = 0; d < D; ++d) acc[d] = prev != ninf ? o[d] * wb + acc[d] * wa : o[d] * wb;
  *acc_lse = merged;
}

// Whether amx_attend runs here: this build and process have AMX tiles and the head dim is a
// whole number of tile rows (D % 32 == 0, D <= 256).
bool amx_attention_ready(int64_t D);

// The group on AMX tiles, bf16 queries and pools, merged into acc_out / acc_lse like
// cascade_merge_group's vector path (attention_amx.cpp).
void amx_attend(float* acc_out, float* acc_lse, const at::BFloat16* q, int64_t q_t, int64_t q_h,
                const at::BFloat16* k, const at::BFloat16* v, int64_t kv_slot, int64_t kv_head,
                const Group& g, int64_t T, int64_t H, int64_t KVH, int64_t D, float scale);

}  // namespace tree_kernels_cpu
