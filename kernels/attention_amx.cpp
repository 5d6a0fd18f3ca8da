// A plan group's attention on AMX tiles: bf16 queries, keys and values, fp32 sums.
//
// cascade_merge_group runs a group here when its queries and pools are bf16 and the CPU has AMX
// (amx_attention_ready). For every (segment, KV head) item:
//   1. the keys and values any of its queries sees are packed once, by pool slot, into the
//      tiles' right-operand layout: K^T as pairs of the head dim by 16 keys (16 x 16
//      transposes of 32-bit pairs in registers), V as pairs of keys by 16 of the head dim (two
//      rows interleaved);
//   2. its queries' heads (query n's heads of this KV head, rows in order) go 16 at a time
//      (as many as a segment has, if fewer):
//      scores S = Q K^T on the tiles (fp32), scaled, the max over the keys each row sees, the
//      softmax numerators 2^t (exp2_bf16) rounded to bf16 (as torch's CPU flash kernel rounds
//      them in bf16) and summed as rounded, so the output is a convex combination of the
//      values; then O = P V on the tiles (fp32), merged into the accumulators by log-sum-exp
//      (merge_row).
// No sum runs across rows: a row's result depends on its query, its keys and where the packed
// range starts (the first key any query of the segment sees: the sums run in blocks of 16 and
// 32 keys from there), not on the number of rows or the threads.
//
// It replaces torch's flash kernel (plus the gather of stacked queries and the merge around it)
// for bf16 decode groups: one call alone took 86 against 104 us on 2 prompts x 4 queries x 1024
// keys, 498 against 538 with 64 queries, 63 against 110 on 8 segments x 16 queries x 32 keys
// (2-core Xeon with AMX, 8 query / 2 KV heads of 64; cascade_cpu_schedule.py has more).
#include "attention_amx.h"

#include <ATen/Parallel.h>

#include "amx.h"
#include "cpu_vec.h"

#include <cstring>
#include <vector>

namespace tree_kernels_cpu {

#ifdef TREE_KERNELS_AMX

bool amx_attention_ready(int64_t D) { return D % 32 == 0 && D <= 256 && amx_permitted(); }

namespace {

// Tiles: 0-3 accumulators (16 x 16 fp32), 4 and 7 left operands, 5 and 6 right ones.
constexpr int KEY_BLOCKS = 4;  // 16-key blocks of scores per pass (64 keys)
// Rows of scores and numerators are Lp + ROW_PAD apart: a tile's 16 rows at a power-of-two
// stride (Lp = 1024: 4 KiB) all map to one set of the L1 cache and evict each other (the
// scores' products and stores took 115 cycles a product, 73 with the padding).
constexpr int64_t ROW_PAD = 32;

struct Scratch {
  std::vector<uint32_t> kt, vb;  // packed K^T, packed V
  std::vector<uint16_t> qb, p;   // 16 query rows, their bf16 numerators
  std::vector<float> s, o;       // their scores, their output sums
  std::vector<int64_t> row_t, row_h, row_a, row_b;
};

// GCC's tile intrinsics take their tile numbers as literals (they are pasted into the
// assembly), hence the spelled-out tiles below.
// tiles 0 .. n - 1 zeroed (out null) or stored at out + j * 16 floats, rows `stride` bytes apart
inline void tiles(int n, float* out, int64_t stride) {
  if (out == nullptr) {
    _tile_zero(0);
    if (n > 1) _tile_zero(1);
    if (n > 2) _tile_zero(2);
    if (n > 3) _tile_zero(3);
    return;
  }
  _tile_stored(0, out, stride);
  if (n > 1) _tile_stored(1, out + 16, stride);
  if (n > 2) _tile_stored(2, out + 32, stride);
  if (n > 3) _tile_stored(3, out + 48, stride);
}

// accumulators 0 .. n - 1 += tile A x the right operands at b + j * step bytes (loaded into
// tiles 5 and 6 in turn); A is 4 or 7
#define TREE_KERNELS_DOTS(A)                                \
  inline void dots##A(int n, const char* b, int64_t step) { \
    _tile_loadd(5, b, 64);                   \
    _tile_dpbf16ps(0, A, 5);                 \
    if (n > 1) {                             \
      _tile_loadd(6, b + step, 64);          \
      _tile_dpbf16ps(1, A, 6);               \
    }                                        \
    if (n > 2) {                             \
      _tile_loadd(5, b + 2 * step, 64);      \
      _tile_dpbf16ps(2, A, 5);               \
    }                                        \
    if (n > 3) {                             \
      _tile_loadd(6, b + 3 * step, 64);      \
      _tile_dpbf16ps(3, A, 6);               \
    }                                        \
  }
TREE_KERNELS_DOTS(4)
TREE_KERNELS_DOTS(7)
#undef TREE_KERNELS_DOTS

// out row i (64 bytes, unaligned) = column i of the 16 x 16 matrix of 32-bit words whose rows
// are r[0..15]
inline void transpose16(const __m512i* r, uint32_t* out_rows) {
  __m512i out[16];
  __m512i t[16], u[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_epi32(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_epi32(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {  // u[4k + j]: in 128-bit lane L, column 4L + j of rows 4k..
    u[4 * k] = _mm512_unpacklo_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_unpackhi_epi64(t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_unpacklo_epi64(t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_unpackhi_epi64(t[4 * k + 1], t[4 * k + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i p0 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x44);
    const __m512i p1 = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xEE);
    const __m512i p2 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x44);
    const __m512i p3 = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xEE);
    out[j] = _mm512_shuffle_i32x4(p0, p2, 0x88);
    out[4 + j] = _mm512_shuffle_i32x4(p0, p2, 0xDD);
    out[8 + j] = _mm512_shuffle_i32x4(p1, p3, 0x88);
    out[12 + j] = _mm512_shuffle_i32x4(p1, p3, 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out_rows + i * 16, out[i]);
}

// Keys [first, first + Lp) of segment s, KV head h (zeros past `last`), packed:
//   kt: per block of 16 keys and chunk of 32 of D, 16 pair rows x 16 keys (32-bit pairs)
//   vb: per block of 32 keys and chunk of 16 of D, 16 key-pair rows x 16 x 2 (bf16)
void pack_kv(Scratch& w, const at::BFloat16* k, const at::BFloat16* v, int64_t kv_slot,
             int64_t kv_head, const int64_t* slots, int64_t h, int64_t first, int64_t last,
             int64_t Lp, int64_t D) {
  const int64_t DP = D / 2, DC = D / 32, DV = D / 16;
  w.kt.resize(Lp * DP);
  w.vb.resize(Lp * DP);
  auto row = [&](const at::BFloat16* pool, int64_t l) {
    return pool + slots[l] * kv_slot + h * kv_head;
  };
  for (int64_t blk = 0; blk < Lp / 16; ++blk)
    for (int64_t c = 0; c < DC; ++c) {
      __m512i r[16];
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t l = first + blk * 16 + j;
        r[j] = l < last ? _mm512_loadu_si512(row(k, l) + c * 32) : _mm512_setzero_si512();
      }
      transpose16(r, w.kt.data() + (blk * DC + c) * 256);
    }
  alignas(64) static const uint16_t interleave[32] = {0, 16, 1, 17, 2,  18, 3,  19, 4,  20, 5,
                                                      21, 6, 22, 7, 23, 8,  24, 9,  25, 10, 26,
                                                      11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(interleave);
  auto half = [&](int64_t l, int64_t dc) {
    return l < last ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row(v, l) + dc * 16))
                    : _mm256_setzero_si256();
  };
  for (int64_t kc = 0; kc < Lp / 32; ++kc)
    for (int64_t p = 0; p < 16; ++p) {
      const int64_t l = first + kc * 32 + 2 * p;
      for (int64_t dc = 0; dc < DV; ++dc) {
        const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(half(l, dc)),
                                                half(l + 1, dc), 1);
        _mm512_storeu_si512(w.vb.data() + ((kc * DV + dc) * 16 + p) * 16,
                            _mm512_permutexvar_epi16(order, both));
      }
    }
}

// 2^t for t <= 0 to about bf16's precision: 2^k 2^f, k = round(t), f in [-1/2, 1/2], 2^f by
// its degree-4 Taylor polynomial (relative error under 5e-5, an eightieth of a bf16 step; the
// numerators are rounded to bf16 next). Underflows to 0 below 2^-149.
inline __m512 exp2_bf16(__m512 t) {
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, k);
  __m512 y = _mm512_set1_ps(9.618129e-3f);  // ln2^4 / 24
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550411e-2f));  // ln2^3 / 6
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.402265e-1f));  // ln2^2 / 2
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931472e-1f));  // ln2
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, k);
}

// Scores of w.s's rows [0, rows) (row i sees keys [a_i, b_i) of the packed range) turned into
// bf16 softmax numerators in w.p (zeros where hidden, and in rows past `rows`); the rows' max
// scaled score and total of the rounded numerators.
void softmax_rows(Scratch& w, int64_t rows, int64_t tr, const int64_t* a, const int64_t* b,
                  int64_t Lp, float scale, float* top, float* total) {
  const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  // lanes [lo, hi) of the 16 keys from l on
  auto lanes = [](int64_t l, int64_t lo, int64_t hi) -> __mmask16 {
    const int64_t from = std::clamp<int64_t>(lo - l, 0, 16);
    const int64_t to = std::clamp<int64_t>(hi - l, 0, 16);
    return static_cast<__mmask16>(((1u << to) - 1u) & ~((1u << from) - 1u));
  };
  for (int64_t i = 0; i < tr; ++i) {
    uint16_t* p = w.p.data() + i * (Lp + ROW_PAD);
    if (i >= rows) {
      std::memset(p, 0, Lp * 2);
      continue;
    }
    const float* s = w.s.data() + i * (Lp + ROW_PAD);
    const int64_t lo = a[i], hi = b[i];
    const int64_t body_lo = (lo + 15) / 16 * 16, body_hi = hi / 16 * 16;  // whole vectors seen
    __m512 mx = ninf;
    for (int64_t l = lo / 16 * 16; l < hi; l += 16)
      mx = l >= body_lo && l < body_hi ? _mm512_max_ps(mx, _mm512_loadu_ps(s + l))
                                       : _mm512_mask_max_ps(mx, lanes(l, lo, hi), mx,
                                                            _mm512_loadu_ps(s + l));
    const float m = _mm512_reduce_max_ps(mx);
    // numerator = exp(scale (s - m)) = 2^(s c - m c), c = scale log2(e)
    const __m512 c = _mm512_set1_ps(scale * 1.44269504088896341f);
    const __m512 mc = _mm512_set1_ps(m * scale * 1.44269504088896341f);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t l = 0; l < Lp; l += 16) {
      __m512 e = _mm512_setzero_ps();
      if (l >= body_lo && l < body_hi) {
        e = exp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(s + l), c, mc));
      } else if (const __mmask16 seen = lanes(l, lo, hi)) {
        e = _mm512_maskz_mov_ps(seen,
                                exp2_bf16(_mm512_fmsub_ps(_mm512_loadu_ps(s + l), c, mc)));
      }
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(e);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + l), h);
      const __m512i widened = _mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
      sum = _mm512_add_ps(sum, _mm512_castsi512_ps(widened));
    }
    top[i] = m * scale;
    total[i] = _mm512_reduce_add_ps(sum);
  }
}

void attend_item(Scratch& w, float* acc_out, float* acc_lse, const at::BFloat16* q, int64_t q_t,
                 int64_t q_h, const at::BFloat16* k, const at::BFloat16* v, int64_t kv_slot,
                 int64_t kv_head, const Group& g, int64_t s, int64_t h, int64_t T, int64_t H,
                 int64_t rep, int64_t D, int64_t tr, float scale) {
  const int64_t* qi = g.q_index + s * g.N;
  const int64_t* qf = g.q_first + s * g.N;
  const int64_t* ql = g.q_limit + s * g.N;
  // 1. The rows: each real query's heads of this KV head, and the keys they see.
  w.row_t.clear(), w.row_h.clear(), w.row_a.clear(), w.row_b.clear();
  int64_t first = g.L, last = 0;
  for (int64_t n = 0; n < g.N; ++n) {
    if (qi[n] >= T || qf[n] >= ql[n]) continue;  // padding, or nothing visible
    first = std::min(first, qf[n]), last = std::max(last, ql[n]);
    for (int64_t r = 0; r < rep; ++r)
      w.row_t.push_back(qi[n]), w.row_h.push_back(h * rep + r), w.row_a.push_back(qf[n]),
          w.row_b.push_back(ql[n]);
  }
  const int64_t M = static_cast<int64_t>(w.row_t.size());
  if (M == 0) return;
  const int64_t Lp = (last - first + 31) / 32 * 32, DC = D / 32, DV = D / 16;
  pack_kv(w, k, v, kv_slot, kv_head, g.slots + s * g.L, h, first, last, Lp, D);
  for (auto* x : {&w.row_a, &w.row_b})
    for (auto& e : *x) e -= first;  // relative to the packed keys
  w.qb.resize(16 * D);
  w.s.resize(16 * (Lp + ROW_PAD));
  w.p.resize(16 * (Lp + ROW_PAD));
  w.o.resize(16 * D);
  float top[16], total[16];
  // 2. tr rows at a time: scores, softmax, values, merge.
  for (int64_t m0 = 0; m0 < M; m0 += tr) {
    const int64_t rows = std::min<int64_t>(tr, M - m0);
    for (int64_t i = 0; i < tr; ++i) {
      uint16_t* dst = w.qb.data() + i * D;
      if (i < rows) std::memcpy(dst, q + w.row_t[m0 + i] * q_t + w.row_h[m0 + i] * q_h, D * 2);
      else std::memset(dst, 0, D * 2);
    }
    // the queries' tiles stay loaded where they fit (D = 64: tiles 4 and 7), so that no load
    // waits on the products still reading its tile
    const bool held = DC == 2;
    if (held) {
      _tile_loadd(4, w.qb.data(), D * 2);
      _tile_loadd(7, w.qb.data() + 32, D * 2);
    }
    const int64_t blocks = Lp / 16;
    for (int64_t b0 = 0; b0 < blocks; b0 += KEY_BLOCKS) {
      const int n = static_cast<int>(std::min<int64_t>(KEY_BLOCKS, blocks - b0));
      const char* kt = reinterpret_cast<const char*>(w.kt.data() + b0 * DC * 256);
      tiles(n, nullptr, 0);
      if (held) {
        dots4(n, kt, DC * 1024);
        dots7(n, kt + 1024, DC * 1024);
      } else {
        for (int64_t c = 0; c < DC; ++c) {
          _tile_loadd(4, w.qb.data() + c * 32, D * 2);
          dots4(n, kt + c * 1024, DC * 1024);
        }
      }
      tiles(n, w.s.data() + b0 * 16, (Lp + ROW_PAD) * 4);
    }
    softmax_rows(w, rows, tr, w.row_a.data() + m0, w.row_b.data() + m0, Lp, scale, top, total);
    for (int64_t d0 = 0; d0 < DV; d0 += 4) {
      const int n = static_cast<int>(std::min<int64_t>(4, DV - d0));
      tiles(n, nullptr, 0);
      for (int64_t kc = 0; kc < Lp / 32; ++kc) {  // numerators in tiles 4 and 7 in turn
        const char* vb = reinterpret_cast<const char*>(w.vb.data() + (kc * DV + d0) * 256);
        if (kc % 2 == 0) {
          _tile_loadd(4, w.p.data() + kc * 32, (Lp + ROW_PAD) * 2);
          dots4(n, vb, 1024);
        } else {
          _tile_loadd(7, w.p.data() + kc * 32, (Lp + ROW_PAD) * 2);
          dots7(n, vb, 1024);
        }
      }
      tiles(n, w.o.data() + d0 * 16, D * 4);
    }
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t row = w.row_t[m0 + i] * H + w.row_h[m0 + i];
      merge_row(acc_out + row * D, acc_lse + row, w.o.data() + i * D, top[i], total[i], D);
    }
  }
}

}  // namespace

void amx_attend(float* acc_out, float* acc_lse, const at::BFloat16* q, int64_t q_t, int64_t q_h,
                const at::BFloat16* k, const at::BFloat16* v, int64_t kv_slot, int64_t kv_head,
                const Group& g, int64_t T, int64_t H, int64_t KVH, int64_t D, float scale) {
  // Rows per pass: 16, or a segment's rows if fewer (a branch's own keys: its query's heads of
  // one KV head), so that the tiles' products and stores take no more rows than there are.
  const int64_t tr = std::min<int64_t>(16, H / KVH * g.N);
  at::parallel_for(0, g.S * KVH, 1, [&](int64_t begin, int64_t end) {
    thread_local Scratch w;  // kept across calls: fresh pages fault slowly on a VM
    const auto r = static_cast<uint8_t>(tr);
    configure_tile_rows({r, r, r, r, r, 16, 16, r});  // the queries' and sums' tiles: tr rows
    for (int64_t item = begin; item < end; ++item)
      attend_item(w, acc_out, acc_lse, q, q_t, q_h, k, v, kv_slot, kv_head, g, item / KVH,
                  item % KVH, T, H, H / KVH, D, tr, scale);
    _tile_release();
  });
}

#else

bool amx_attention_ready(int64_t) { return false; }

void amx_attend(float*, float*, const at::BFloat16*, int64_t, int64_t, const at::BFloat16*,
                const at::BFloat16*, int64_t, int64_t, const Group&, int64_t, int64_t, int64_t,
                int64_t, float) {
  TORCH_CHECK(false, "amx_attend: this build has no AMX tiles (amx_attention_ready)");
}

#endif

}  // namespace tree_kernels_cpu
