"""The engine's native linear op (tree_kernels/linear_cpu.cpp) against fp32 arithmetic and oneDNN.

A bf16 product of at most 32 rows runs on AMX tiles where the CPU has them (this CI machine's
does), the rest on oneDNN's packed weight. Either way each output is an fp32 sum rounded once to
bf16, so it lies within one bf16 ulp plus the fp32 sum's error bound (K 2^-24 sum |x w|) of the
exact product of the same inputs; the cases cover the
tile path's edges (1, 16, 17 and 32 rows, leading dims, a bias, a strided x) and the shapes it
hands to oneDNN (33 rows, N or K off the tile grid, fp32)."""

from __future__ import annotations

import pytest
import torch
from tree_kernels.cascade_cpu_native import native_op

from rollout.engine.packed_linear import available

pytestmark = pytest.mark.skipif(native_op() is None, reason="native CPU library not built")


def _onednn(x, packed, bias):
    flat = x.reshape(x.numel() // x.shape[-1], x.shape[-1]).contiguous()
    out = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _rounds_the_sum(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b) -> None:
    """got (bf16) within one bf16 ulp (8 significant bits) of the exact x w^T + b, plus what an
    fp32 sum over K may lose: K 2^-24 sum |x w| (and |b|)."""
    x, w = x.double(), w.double()
    want = torch.nn.functional.linear(x, w, None if b is None else b.double())
    size = torch.nn.functional.linear(x.abs(), w.abs(), None if b is None else b.double().abs())
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().clamp_min(2.0**-100))) - 7)
    bound = ulp + (x.shape[-1] + 1) * 2.0**-24 * size
    err = (got.double() - want).abs()
    assert bool((err <= bound).all()), f"max error / bound {(err / bound).max():.2f}"


@pytest.mark.parametrize("lead", [(1,), (5,), (16,), (1, 17), (32,), (2, 16), (33,), (0,)])
@pytest.mark.parametrize(
    "n,k,bias",
    [(128, 512, False), (1376, 512, True), (512, 1376, False), (100, 512, True), (128, 496, False)],
)
def test_bf16_products_round_the_exact_sum_once(lead, n, k, bias):
    if not available(torch.bfloat16):
        pytest.skip("no oneDNN bf16 linear on this CPU")
    gen = torch.Generator().manual_seed(n * k + len(lead))
    x = torch.randn(*lead, k, generator=gen).bfloat16()
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 128)
    got = torch.ops.tree_kernels_cpu.linear(x, packed, w, b)
    assert got.shape == (*lead, n) and got.dtype == torch.bfloat16
    _rounds_the_sum(got, x, w, b)
    if lead[-1] > 32 or n % 16 or k % 32:  # oneDNN's own product
        assert torch.equal(got, _onednn(x, packed, b))


def test_strided_input_and_fp32_weights():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1024, generator=gen).bfloat16()[:, ::2]  # not contiguous
    w = (torch.randn(256, 512, generator=gen) * 0.05).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 128)
    got = torch.ops.tree_kernels_cpu.linear(x, packed, w, None)
    _rounds_the_sum(got, x, w, None)
    x32, w32 = x.float(), w.float()
    packed32 = torch.ops.mkldnn._reorder_linear_weight(w32, 128)
    got32 = torch.ops.tree_kernels_cpu.linear(x32, packed32, w32, None)
    assert torch.equal(got32, _onednn(x32, packed32, None))  # fp32 is oneDNN's
