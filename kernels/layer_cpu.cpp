// A Llama-like decoder layer's two halves around its attention, one native call each (CPU).
//
// On a decode step of a few rows the layer's cost is its number of ops, and each op called from
// Python pays the interpreter too: a layer is about sixty top-level torch ops. These two ops run
// the same ops in the same order from C++ (rollout/engine/fused_layers.py checks the layer's
// code is Llama's and that these give its bits):
//   layer_attn_in:  h = rms_norm(x); q, k, v = h Wq, h Wk, h Wv as [1, heads, T, D];
//                   q, k = rope(q, k); returns (q as [T, H, D], k, v)
//   layer_attn_out: y = x + attn Wo; h = rms_norm(y); returns y + silu_mul(h Wg, h Wu) Wd
// The products run on this library's linear op (linear_cpu.cpp, as the engine's packed linears
// do: oneDNN's prepacked weight, or AMX tiles on the weight as stored for a few bf16 rows), the
// norms, RoPE and the gated activation on its fused ops; each is called through torch's
// dispatcher, so the bits are those ops' bits.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using Bias = std::optional<Tensor>;

template <typename Sig>
c10::TypedOperatorHandle<Sig> find(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

Tensor linear(const Tensor& x, const Tensor& packed, const Tensor& weight, const Bias& bias) {
  static const auto op = find<Tensor(const Tensor&, const Tensor&, const Tensor&, const Bias&)>(
      "tree_kernels_cpu::linear");
  return op.call(x, packed, weight, bias);
}

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  static const auto op = find<Tensor(const Tensor&, const Tensor&, double)>(
      "tree_kernels_cpu::rms_norm");
  return op.call(x, weight, eps);
}

// each product's weights come as (packed, weight): oneDNN's packed copy and the module's own
std::tuple<Tensor, Tensor, Tensor> layer_attn_in(
    const Tensor& x, const Tensor& norm, double eps, const Tensor& pq, const Tensor& wq,
    const Bias& bq, const Tensor& pk, const Tensor& wk, const Bias& bk, const Tensor& pv,
    const Tensor& wv, const Bias& bv, const Tensor& cos, const Tensor& sin, int64_t head_dim) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1, "layer_attn_in: x must be [1, T, hidden]");
  using Rope = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                          const Tensor&);
  static const auto rope = find<Rope>("tree_kernels_cpu::rope");
  const int64_t T = x.size(1);
  const Tensor h = rms_norm(x, norm, eps);
  const Tensor q = linear(h, pq, wq, bq).view({1, T, -1, head_dim}).transpose(1, 2);
  const Tensor k = linear(h, pk, wk, bk).view({1, T, -1, head_dim}).transpose(1, 2);
  const Tensor v = linear(h, pv, wv, bv).view({1, T, -1, head_dim}).transpose(1, 2);
  auto [q_rot, k_rot] = rope.call(q, k, cos.contiguous(), sin.contiguous());
  return {q_rot[0].transpose(0, 1), k_rot, v};
}

Tensor layer_attn_out(const Tensor& x, const Tensor& attn, const Tensor& po, const Tensor& wo,
                      const Bias& bo, const Tensor& norm, double eps, const Tensor& pg,
                      const Tensor& wg, const Bias& bg, const Tensor& pu, const Tensor& wu,
                      const Bias& bu, const Tensor& pd, const Tensor& wd, const Bias& bd) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == 1, "layer_attn_out: x must be [1, T, hidden]");
  static const auto silu_mul = find<Tensor(const Tensor&, const Tensor&)>(
      "tree_kernels_cpu::silu_mul");
  const int64_t T = x.size(1);
  const Tensor y = x + linear(attn.reshape({1, T, -1}), po, wo, bo);
  const Tensor h = rms_norm(y, norm, eps);
  const Tensor gated = silu_mul.call(linear(h, pg, wg, bg), linear(h, pu, wu, bu));
  return y + linear(gated, pd, wd, bd);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tree_kernels_cpu, m) {
  m.def(
      "layer_attn_in(Tensor x, Tensor norm, float eps, Tensor pq, Tensor wq, Tensor? bq, "
      "Tensor pk, Tensor wk, Tensor? bk, Tensor pv, Tensor wv, Tensor? bv, Tensor cos, "
      "Tensor sin, int head_dim) -> (Tensor, Tensor, Tensor)");
  m.def(
      "layer_attn_out(Tensor x, Tensor attn, Tensor po, Tensor wo, Tensor? bo, Tensor norm, "
      "float eps, Tensor pg, Tensor wg, Tensor? bg, Tensor pu, Tensor wu, Tensor? bu, "
      "Tensor pd, Tensor wd, Tensor? bd) -> Tensor");
  // the packed weights are oneDNN tensors (MkldnnCPU), the rest plain CPU tensors
  for (const auto key : {c10::DispatchKey::CPU, c10::DispatchKey::MkldnnCPU}) {
    m.impl("layer_attn_in", key, &layer_attn_in);
    m.impl("layer_attn_out", key, &layer_attn_out);
  }
}
