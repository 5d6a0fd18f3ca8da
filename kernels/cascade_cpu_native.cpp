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
// With `tiles`, a group of bf16 queries and pools runs on AMX tiles instead (attention_amx.cpp:
// the same contract, its softmax numerators rounded to bf16).
//
// The torch path pays a few microseconds of host time per op and a gather plus a dtype copy
// per group and layer; for a decode step's small groups (a few rows over tens of keys) that,
// not arithmetic, is the cost. Vector code is written with GCC/Clang vector extensions, 16
// lanes, and reassociates nothing: sums run in a fixed order, whatever the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "attention_amx.h"
#include "cpu_vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

using namespace tree_kernels_cpu;

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
      // 5. Merge the partial (o / total, lse = top + log total) into the accumulator row.
      float sums[16 * W];
      for (int64_t c = 0; c < C; ++c) store(sums + c * W, o[c]);
      const int64_t row = t * H + h * rep + r;
      merge_row(acc_out + row * D, acc_lse + row, sums, top, total, D);
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
                         at::Tensor q_first, at::Tensor q_limit, double scale, bool tiles) {
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
  check(!tiles || (q16 && kv16 && amx_attention_ready(D)),
        "tiles: AMX tiles take bf16 queries and pools of a head dim that is a multiple of 32, "
        "on a CPU with AMX (amx_attention)");
  if (tiles)
    amx_attend(out, lse, q.data_ptr<at::BFloat16>(), q.stride(0), q.stride(1),
               k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>(),
               k_pool.stride(0), k_pool.stride(1), g, T, H, KVH, D, sc);
  else if (q16 && kv16)
    run(q.data_ptr<at::BFloat16>(), k_pool.data_ptr<at::BFloat16>(),
        v_pool.data_ptr<at::BFloat16>());
  else if (q16)
    run(q.data_ptr<at::BFloat16>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
  else if (kv16)
    run(q.data_ptr<float>(), k_pool.data_ptr<at::BFloat16>(), v_pool.data_ptr<at::BFloat16>());
  else
    run(q.data_ptr<float>(), k_pool.data_ptr<float>(), v_pool.data_ptr<float>());
}

// One group's partials as the step's accumulators, in one pass: row dest[r] gets out[r] (fp32,
// or bf16 widened exactly) and lse[r], every other row 0 and -inf. The torch path's single-part
// merge is a cast, two fills and two index copies.
std::tuple<at::Tensor, at::Tensor> scatter_partials(at::Tensor out, const at::Tensor& lse,
                                                    const at::Tensor& dest, int64_t rows) {
  check(out.dim() == 2 && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kBFloat16),
        "scatter_partials: out must be [R, D] fp32 or bf16");
  const int64_t R = out.size(0), D = out.size(1);
  check(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.dim() == 1 &&
            lse.size(0) == R && dest.scalar_type() == at::kLong && dest.is_contiguous() &&
            dest.dim() == 1 && dest.size(0) == R && rows >= 0,
        "scatter_partials: lse must be contiguous fp32 [R] and dest contiguous int64 [R]");
  const int64_t* to = dest.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    check(to[r] >= 0 && to[r] < rows, "scatter_partials: a destination row is out of range");
  out = out.contiguous();
  at::Tensor acc = at::zeros({rows, D}, out.options().dtype(at::kFloat));
  at::Tensor acc_lse = at::full({rows}, -std::numeric_limits<float>::infinity(), acc.options());
  float* a = acc.data_ptr<float>();
  float* l = acc_lse.data_ptr<float>();
  const float* src_lse = lse.data_ptr<float>();
  const int64_t body = D / W * W;
  auto copy = [&](auto* src) {
    for (int64_t r = 0; r < R; ++r) {
      float* row = a + to[r] * D;
      for (int64_t d = 0; d < body; d += W) store(row + d, load(src + r * D + d));
      for (int64_t d = body; d < D; ++d) row[d] = static_cast<float>(src[r * D + d]);
      l[to[r]] = src_lse[r];
    }
  };
  if (out.scalar_type() == at::kBFloat16)
    copy(out.data_ptr<at::BFloat16>());
  else
    copy(out.data_ptr<float>());
  return {acc, acc_lse};
}

// A step's new keys and values [T, KVH, D] (any strides; fp32 or bf16) stored at their pool
// slots of one layer, rounded to the pool's dtype as a torch copy rounds: one op where the torch
// path needs two casts and two index copies per layer.
template <typename S, typename P>
void write_rows(P* pool, const S* src, const int64_t* slots, int64_t T, int64_t KVH, int64_t D,
                const int64_t* pool_strides, const int64_t* src_strides) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < KVH; ++h) {
      const S* from = src + t * src_strides[0] + h * src_strides[1];
      P* to = pool + slots[t] * pool_strides[0] + h * pool_strides[1];
      if constexpr (std::is_same_v<S, P>)
        std::memcpy(to, from, D * sizeof(P));
      else
        for (int64_t d = 0; d < D; ++d) to[d] = static_cast<P>(static_cast<float>(from[d]));
    }
}

void write_one(at::Tensor pool, const at::Tensor& src, const at::Tensor& slots) {
  const int64_t T = src.size(0), KVH = src.size(1), D = src.size(2);
  const int64_t* idx = slots.data_ptr<int64_t>();
  auto go = [&](auto* p, auto* s) {
    write_rows(p, s, idx, T, KVH, D, pool.strides().data(), src.strides().data());
  };
  const bool p16 = pool.scalar_type() == at::kBFloat16, s16 = src.scalar_type() == at::kBFloat16;
  if (p16 && s16) go(pool.data_ptr<at::BFloat16>(), src.data_ptr<at::BFloat16>());
  else if (p16) go(pool.data_ptr<at::BFloat16>(), src.data_ptr<float>());
  else if (s16) go(pool.data_ptr<float>(), src.data_ptr<at::BFloat16>());
  else go(pool.data_ptr<float>(), src.data_ptr<float>());
}

// k and v: [T, KVH, D], or a model's own [1, KVH, T, D] (read as the same rows: views here,
// none made per layer in Python).
void write_kv(at::Tensor k_pools, at::Tensor v_pools, int64_t layer, at::Tensor slots,
              at::Tensor k, at::Tensor v) {
  auto fail = [](const char* what) { TORCH_CHECK(false, "write_kv: ", what); };
  if (k.dim() == 4 && v.dim() == 4) {
    if (k.size(0) != 1 || v.size(0) != 1) fail("4-D k and v must be [1, KVH, T, D]");
    k = k.select(0, 0).transpose(0, 1);
    v = v.select(0, 0).transpose(0, 1);
  }
  if (k_pools.dim() != 4 || k_pools.sizes() != v_pools.sizes() || k_pools.stride(3) != 1 ||
      v_pools.stride(3) != 1)
    fail("pools must be [layers, slots, KVH, D] alike, unit stride in D");
  if (layer < 0 || layer >= k_pools.size(0)) fail("layer outside the pools");
  if (k.dim() != 3 || k.sizes() != v.sizes() || k.size(1) != k_pools.size(2) ||
      k.size(2) != k_pools.size(3) || k.stride(2) != 1 || v.stride(2) != 1)
    fail("k and v must be [T, KVH, D] (or [1, KVH, T, D]) of the pools' KVH and D, unit stride "
         "in D");
  if (slots.scalar_type() != at::kLong || !slots.is_contiguous() || slots.dim() != 1 ||
      slots.size(0) != k.size(0))
    fail("slots must be contiguous int64 [T]");
  for (const at::Tensor* t : {&k_pools, &v_pools, &k, &v})
    if (t->scalar_type() != at::kFloat && t->scalar_type() != at::kBFloat16)
      fail("pools, k and v must be fp32 or bf16");
  const int64_t* idx = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.size(0); ++t)
    if (idx[t] < 0 || idx[t] >= k_pools.size(1)) fail("a slot is outside the pools");
  write_one(k_pools.select(0, layer), k, slots);
  write_one(v_pools.select(0, layer), v, slots);
}

}  // namespace

TORCH_LIBRARY(tree_kernels_cpu, m) {
  m.def(
      "cascade_merge_group(Tensor(a!) acc_out, Tensor(b!) acc_lse, Tensor q, Tensor k_pool, "
      "Tensor v_pool, Tensor slots, Tensor q_index, Tensor q_first, Tensor q_limit, "
      "float scale, bool tiles=False) -> ()");
  m.impl("cascade_merge_group", c10::DispatchKey::CPU, &cascade_merge_group);
  m.def(
      "write_kv(Tensor(a!) k_pools, Tensor(b!) v_pools, int layer, Tensor slots, Tensor k, "
      "Tensor v) -> ()");
  m.impl("write_kv", c10::DispatchKey::CPU, &write_kv);
  m.def("amx_attention(int head_dim) -> bool");
  m.impl("amx_attention", [](int64_t D) { return amx_attention_ready(D); });
  m.def("scatter_partials(Tensor out, Tensor lse, Tensor dest, int rows) -> (Tensor, Tensor)");
  m.impl("scatter_partials", c10::DispatchKey::CPU, &scatter_partials);
}
