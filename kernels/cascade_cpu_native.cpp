// Cascade attention's small groups on the CPU, read in place from the pool and merged in place.
//
// One call attends one plan group. For every (segment, KV head) it widens the segment's keys
// and values to fp32 once (from an fp32 or bf16 pool, by slot: no gather into a buffer of the
// pool's layout), then, for each of the segment's queries and each query head of that KV head,
// computes scores and values in registers with an exact fp32 softmax and merges the partial into
// the step's accumulators by log-sum-exp (METHODS.md). A group holds each query at most once,
// so (segment, KV head) items write disjoint accumulator rows and run in parallel on torch's own
// OpenMP threads (compiled with -fopenmp; the GOMP symbols resolve to torch's runtime).
//
// The torch path pays a few microseconds of host time per op and a gather plus a dtype copy
// per group and layer; for a decode step's small groups (a few rows over tens of keys) that,
// not arithmetic, is the cost. Vector code is written with GCC/Clang vector extensions, 16
// lanes, and reassociates nothing: sums run in a fixed order, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

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

// exp(x) for x <= 0 or -inf (Cephes' expf: ln 2 split in two, degree-6 polynomial, ~1 ulp);
// 0 below -87.3 (hidden scores are -inf).
inline vf exp_nonpositive(vf x) {
  const vi hidden = x < splat(-87.3f);
  vf c = hidden ? splat(-87.3f) : x;
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
  return hidden ? splat(0.f) : y * two_k;
}

struct Group {
  const int64_t *slots, *q_index, *q_first, *q_limit;
  int64_t S, L, N;
};

// One (segment, KV head) item: its keys and values widened to fp32 once (kb, vb: [L, C]
// vectors), then each of its queries' heads in turn, scores and values in registers, its
// partial merged into its accumulator row. CC: vectors per head dim when known at compile time
// (0: C at run time).
template <int CC, typename QT, typename KT>
void attend_item(float* acc_out, float* acc_lse, const QT* q, int64_t q_t, int64_t q_h,
                 const KT* k, const KT* v, int64_t kv_slot, int64_t kv_head, const Group& g,
                 int64_t s, int64_t h, int64_t T, int64_t H, int64_t KVH, int64_t C_run,
                 float scale, vf* kb, vf* vb, float* scores) {
  const int64_t C = CC ? CC : C_run, D = C * W, rep = H / KVH;
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t* slots = g.slots + s * g.L;
  const int64_t* qi = g.q_index + s * g.N;
  const int64_t* qf = g.q_first + s * g.N;
  const int64_t* ql = g.q_limit + s * g.N;
  // 1. The keys and values any query of the segment sees, widened once.
  int64_t first = g.L, last = 0;
  for (int64_t n = 0; n < g.N; ++n)
    if (qi[n] < T && qf[n] < ql[n]) first = std::min(first, qf[n]), last = std::max(last, ql[n]);
  for (int64_t l = first; l < last; ++l) {
    const KT* key = k + slots[l] * kv_slot + h * kv_head;
    const KT* val = v + slots[l] * kv_slot + h * kv_head;
    for (int64_t c = 0; c < C; ++c)
      kb[l * C + c] = load(key + c * W), vb[l * C + c] = load(val + c * W);
  }
  for (int64_t n = 0; n < g.N; ++n) {
    const int64_t t = qi[n], a = qf[n], b = ql[n];
    if (t >= T || b <= a) continue;  // padding, or nothing visible
    const int64_t f0 = a / W * W, l1 = (b + W - 1) / W * W;
    for (int64_t r = 0; r < rep; ++r) {
      // 2. Scaled scores over keys [a, b); -inf in the padding to whole vectors.
      const QT* src = q + t * q_t + (h * rep + r) * q_h;
      vf qr[CC ? CC : 16];
      for (int64_t c = 0; c < C; ++c) qr[c] = load(src + c * W) * scale;
      float* sc = scores;
      for (int64_t l = f0; l < a; ++l) sc[l] = ninf;
      for (int64_t l = b; l < l1; ++l) sc[l] = ninf;
      for (int64_t l = a; l < b; ++l) {
        const vf* key = kb + l * C;
        vf acc = qr[0] * key[0];
        for (int64_t c = 1; c < C; ++c) acc += qr[c] * key[c];
        sc[l] = hsum(acc);
      }
      // 3. Softmax numerators in place, the max and the total.
      vf mx = splat(ninf);
      for (int64_t l = f0; l < l1; l += W) {
        vf x = load(sc + l);
        mx = x > mx ? x : mx;
      }
      float top = ninf;
      for (int64_t j = 0; j < W; ++j) top = std::max(top, mx[j]);
      vf sum = splat(0.f);
      for (int64_t l = f0; l < l1; l += W) {
        vf e = exp_nonpositive(load(sc + l) - top);
        std::memcpy(sc + l, &e, sizeof e);
        sum += e;
      }
      const float total = hsum(sum);
      // 4. Values: o = sum_l p_l v_l, in registers.
      vf o[CC ? CC : 16];
      for (int64_t c = 0; c < C; ++c) o[c] = splat(0.f);
      for (int64_t l = a; l < b; ++l) {
        const vf p = splat(sc[l]);
        const vf* val = vb + l * C;
        for (int64_t c = 0; c < C; ++c) o[c] += p * val[c];
      }
      // 5. Merge the partial (o / total, lse = top + log total) into the accumulator row:
      //    lse' = logaddexp(lse_acc, lse), each side weighted exactly.
      const int64_t row = t * H + h * rep + r;
      const float lse = top + std::log(total), prev = acc_lse[row];
      float wa = 0.f, wb = 1.f / total, merged = lse;
      if (prev != ninf) {
        const float m = std::max(prev, lse);
        const float ea = std::exp(prev - m), eb = std::exp(lse - m), both = ea + eb;
        wa = ea / both, wb = eb / (both * total), merged = m + std::log(both);
      }
      float* acc = acc_out + row * D;
      for (int64_t c = 0; c < C; ++c) {
        vf x = o[c] * wb;
        if (prev != ninf) x += load(acc + c * W) * wa;
        std::memcpy(acc + c * W, &x, sizeof x);
      }
      acc_lse[row] = merged;
    }
  }
}

template <int CC, typename QT, typename KT>
void merge_group(float* acc_out, float* acc_lse, const QT* q, int64_t q_t, int64_t q_h,
                 const KT* k, const KT* v, int64_t kv_slot, int64_t kv_head, const Group& g,
                 int64_t T, int64_t H, int64_t KVH, int64_t C, float scale) {
  const int64_t Lp = (g.L + W - 1) / W * W;
  at::parallel_for(0, g.S * KVH, 1, [&](int64_t begin, int64_t end) {
    std::vector<vf> kb(g.L * C), vb(g.L * C);
    std::vector<float> scores(Lp);
    for (int64_t item = begin; item < end; ++item)
      attend_item<CC>(acc_out, acc_lse, q, q_t, q_h, k, v, kv_slot, kv_head, g, item / KVH,
                      item % KVH, T, H, KVH, C, scale, kb.data(), vb.data(), scores.data());
  });
}

void check(bool ok, const char* what) { TORCH_CHECK(ok, "cascade_merge_group: ", what); }

void cascade_merge_group(at::Tensor acc_out, at::Tensor acc_lse, at::Tensor q, at::Tensor k_pool,
                         at::Tensor v_pool, at::Tensor slots, at::Tensor q_index,
                         at::Tensor q_first, at::Tensor q_limit, double scale) {
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = k_pool.size(1);
  check(acc_out.scalar_type() == at::kFloat && acc_out.is_contiguous() && acc_out.dim() == 2 &&
            acc_out.size(0) >= (T + 1) * H && acc_out.size(1) == D,
        "acc_out must be contiguous fp32 [(T + 1) * H, D]");
  check(acc_lse.scalar_type() == at::kFloat && acc_lse.is_contiguous() &&
            acc_lse.numel() >= (T + 1) * H,
        "acc_lse must be contiguous fp32 [(T + 1) * H]");
  check(q.dim() == 3 && q.stride(2) == 1 && D % W == 0 && D <= 16 * W,
        "q must be [T, H, D] with unit stride in D and D a multiple of 16, at most 256");
  check(k_pool.dim() == 3 && k_pool.sizes() == v_pool.sizes() &&
            k_pool.strides() == v_pool.strides() && k_pool.stride(2) == 1 &&
            k_pool.size(2) == D && H % KVH == 0,
        "pools must be [slots, KVH, D] alike, unit stride in D, KVH dividing H");
  check(k_pool.scalar_type() == v_pool.scalar_type(), "pools must share a dtype");
  for (const at::Tensor* t : {&slots, &q_index, &q_first, &q_limit})
    check(t->scalar_type() == at::kLong && t->is_contiguous() && t->dim() == 2,
          "index tensors must be contiguous int64 [S, *]");
  check(q_index.sizes() == q_first.sizes() && q_index.sizes() == q_limit.sizes() &&
            slots.size(0) == q_index.size(0),
        "q_index, q_first, q_limit must be [S, N] and slots [S, L]");
  Group g{slots.data_ptr<int64_t>(), q_index.data_ptr<int64_t>(), q_first.data_ptr<int64_t>(),
          q_limit.data_ptr<int64_t>(), slots.size(0), slots.size(1), q_index.size(1)};
  // Every index in range (one pass over the small index tensors): the loops read unchecked.
  for (int64_t i = 0; i < g.S * g.L; ++i)
    check(g.slots[i] >= 0 && g.slots[i] < k_pool.size(0), "a slot is outside the pools");
  for (int64_t i = 0; i < g.S * g.N; ++i)
    check(g.q_index[i] >= 0 && g.q_index[i] <= T && g.q_first[i] >= 0 &&
              g.q_limit[i] <= g.L,
          "q_index must lie in [0, T] (T: padding) and q_first, q_limit in [0, L]");
  float* out = acc_out.data_ptr<float>();
  float* lse = acc_lse.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  const int64_t C = D / W;
  auto run = [&](auto q_ptr, auto k_ptr, auto v_ptr) {
    auto go = [&](auto cc) {
      merge_group<decltype(cc)::value>(out, lse, q_ptr, q.stride(0), q.stride(1), k_ptr, v_ptr,
                                       k_pool.stride(0), k_pool.stride(1), g, T, H, KVH, C, sc);
    };
    if (C == 2) go(std::integral_constant<int, 2>{});
    else if (C == 4) go(std::integral_constant<int, 4>{});
    else if (C == 8) go(std::integral_constant<int, 8>{});
    else go(std::integral_constant<int, 0>{});
  };
  const bool q16 = q.scalar_type() == at::kBFloat16, kv16 = k_pool.scalar_type() == at::kBFloat16;
  check((q16 || q.scalar_type() == at::kFloat) && (kv16 || k_pool.scalar_type() == at::kFloat),
        "q and the pools must be fp32 or bf16");
  if (q16 && kv16)
    run(q.data_ptr<at::BFloat16>(), k_pool.data_ptr<at::BFloat16>(),
        v_pool.data_ptr<at::BFloat16>());
  else if (q16)
    run(q.data_ptr<at::BFloat16>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
  else if (kv16)
    run(q.data_ptr<float>(), k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>());
  else
    run(q.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
}

}  // namespace

TORCH_LIBRARY(tree_kernels_cpu, m) {
  m.def(
      "cascade_merge_group(Tensor(a!) acc_out, Tensor(b!) acc_lse, Tensor q, Tensor k_pool, "
      "Tensor v_pool, Tensor slots, Tensor q_index, Tensor q_first, Tensor q_limit, "
      "float scale) -> ()");
  m.impl("cascade_merge_group", c10::DispatchKey::CPU, &cascade_merge_group);
}
