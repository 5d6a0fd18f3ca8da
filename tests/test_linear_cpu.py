"""The engine's native linear op (tree_kernels/linear_cpu.cpp) against fp32 arithmetic and oneDNN.

A bf16 product of at most 32 rows runs on AMX tiles where the CPU has them (this CI machine's
does), an fp32 one of at most 16 rows on AVX-512, the rest on oneDNN's packed weight. Either way
each output is an fp32 sum (rounded once to bf16 in bf16), so it lies within the fp32 sum's error
bound (K 2^-24 sum |x w|, plus one bf16 ulp in bf16) of the exact product of the same inputs. The
cases cover each path's edges (1 to 33 rows, leading dims, a bias, a strided x, N and K off the
tile grid) and the shapes handed to oneDNN, which give oneDNN's bits."""

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


@pytest.mark.parametrize("lead", [(1,), (7,), (8,), (1, 9), (16,), (17,)])
@pytest.mark.parametrize(
    "n,k,bias", [(128, 512, False), (1376, 512, True), (511, 1376, True), (64, 500, False)]
)
def test_fp32_products_within_the_sums_error_bound(lead, n, k, bias):
    if not available(torch.float32):
        pytest.skip("no oneDNN fp32 linear on this CPU")
    gen = torch.Generator().manual_seed(n + k + len(lead))
    x = torch.randn(*lead, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * 0.05
    b = torch.randn(n, generator=gen) if bias else None
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 128)
    got = torch.ops.tree_kernels_cpu.linear(x, packed, w, b)
    assert got.shape == (*lead, n) and got.dtype == torch.float32
    want = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    size = torch.nn.functional.linear(
        x.double().abs(), w.double().abs(), None if b is None else b.double().abs()
    )
    err = (got.double() - want).abs()
    assert bool((err <= 2 * (k + 1) * 2.0**-24 * size).all())
    if lead[-1] > 16 or k % 16:  # oneDNN's own product
        assert torch.equal(got, _onednn(x, packed, b))


def test_fp32_sums_do_not_depend_on_the_threads():
    gen = torch.Generator().manual_seed(5)
    x, w = torch.randn(8, 512, generator=gen), torch.randn(2752, 512, generator=gen)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 128)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.tree_kernels_cpu.linear(x, packed, w, None)
        torch.set_num_threads(2)
        two = torch.ops.tree_kernels_cpu.linear(x, packed, w, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_strided_input():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 1024, generator=gen).bfloat16()[:, ::2]  # not contiguous
    w = (torch.randn(256, 512, generator=gen) * 0.05).bfloat16()
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 128)
    got = torch.ops.tree_kernels_cpu.linear(x, packed, w, None)
    _rounds_the_sum(got, x, w, None)
    x32 = torch.randn(40, 1024, generator=gen)[:, ::2]
    w32 = w.float()
    packed32 = torch.ops.mkldnn._reorder_linear_weight(w32, 128)
    for rows in (8, 40):  # on AVX-512, then on oneDNN
        got32 = torch.ops.tree_kernels_cpu.linear(x32[:rows], packed32, w32, None)
        want = torch.nn.functional.linear(x32[:rows].double(), w32.double())
        assert torch.allclose(got32.double(), want, atol=1e-5, rtol=1e-5)
