"""The fused CPU forwards (kernels/fused_cpu.cpp, rollout/engine/fused_forwards.py) against the
forwards they replace: transformers' own modules, and the model's logits."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from tree_kernels.fused_cpu import (
    fused_available,
    rms_norm,
    rms_norm_torch,
    rope,
    rope_torch,
    silu_mul,
    silu_mul_torch,
)

from rollout.engine import fused_forwards
from rollout.engine.fused_forwards import FusedForwards, kind_of
from rollout.tiny import tiny_model

EXACT = dict(rtol=0, atol=0)  # the native ops give the torch ops' bits


def test_the_ops_are_built_here():
    assert fused_available()  # CI builds them: the tests below run the native ops


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [512, 40, 7, 896])
def test_rms_norm_matches_llamas_module(dtype, width):
    # Widths of whole vectors and with a scalar tail; rows split over threads (3 x 37 x 896).
    gen = torch.Generator().manual_seed(width)
    norm = LlamaRMSNorm(width, eps=1e-5).to(dtype)
    norm.weight.data = torch.randn(width, generator=gen).to(dtype)
    x = (torch.randn(3, 37, width, generator=gen) * 3).to(dtype)
    with torch.no_grad():
        want = norm(x)
        got = rms_norm(x, norm.weight, norm.variance_epsilon)
        torch.testing.assert_close(got, want, **EXACT)
        torch.testing.assert_close(rms_norm_torch(x, norm.weight, 1e-5), want, rtol=0, atol=0)
        strided = torch.randn(37, 2 * width, generator=gen).to(dtype)[:, ::2]
        got_strided = rms_norm(strided, norm.weight, 1e-5)
        torch.testing.assert_close(got_strided, norm(strided), **EXACT)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 8, 1376), (3, 5, 7), (40000,)])
def test_silu_mul_matches_the_torch_ops(dtype, shape):
    gen = torch.Generator().manual_seed(len(shape))
    gate = (torch.randn(shape, generator=gen) * 10).to(dtype)
    up = torch.randn(shape, generator=gen).to(dtype)
    flat = gate.view(-1)
    flat[:5] = torch.tensor([-100.0, 100.0, 0.0, float("inf"), float("-inf")])
    want = nn.functional.silu(gate) * up
    got = silu_mul(gate, up)
    torch.testing.assert_close(got, want, **EXACT, equal_nan=True)
    torch.testing.assert_close(silu_mul_torch(gate, up), want, rtol=0, atol=0, equal_nan=True)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(4, 8), torch.ones(7), 1e-6)
    with pytest.raises(ValueError, match="one shape"):
        silu_mul(torch.randn(4, 8), torch.randn(4, 9))


def test_autograd_runs_the_torch_spec():
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.ones(16, requires_grad=True)
    rms_norm(x, w, 1e-6).sum().backward()  # the native op has no backward: the spec runs
    assert x.grad is not None and w.grad is not None


class _Config:
    hidden_size, intermediate_size, mlp_bias = 16, 32, False

    def __init__(self, act: str) -> None:
        self.hidden_act = act


def test_which_modules_are_recognised():
    assert kind_of(LlamaRMSNorm(16)) == "rms_norm"
    assert kind_of(Qwen2RMSNorm(16)) == "rms_norm"  # copied from Llama word for word
    assert kind_of(GemmaRMSNorm(16)) is None  # 1 + weight, in fp32: not Llama's
    assert kind_of(LlamaMLP(_Config("silu"))) == "mlp"
    assert kind_of(LlamaMLP(_Config("gelu"))) is None  # another activation
    wrapped = LlamaRMSNorm(16)
    wrapped.forward = lambda x: x  # an offload hook or other wrapper on the instance
    assert kind_of(wrapped) is None
    assert kind_of(nn.Linear(4, 4)) is None


@pytest.mark.parametrize("change", ["doubles", "one ulp"])
def test_a_forward_that_reads_as_llamas_but_differs_is_probed_out(monkeypatch, change):
    # A changed transformers release could ship either; the probe asks for the module's bits,
    # so even a last-bit change keeps the module's own forward.
    def llama_norm(x, weight, eps):
        h = x.float()
        return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    class Doubled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(16))
            self.variance_epsilon = 1e-6

        def forward(self, hidden_states):
            out = llama_norm(hidden_states, self.weight, self.variance_epsilon)
            return 2 * out if change == "doubles" else torch.nextafter(out, out + 1)

    shape = fused_forwards.statements(Doubled.forward)
    monkeypatch.setattr(fused_forwards, "_llama", lambda: {"rms_norm": shape, "mlp": None})
    fused_forwards._kind_of_class.cache_clear()
    monkeypatch.setattr(fused_forwards, "_PROBED", {})
    model = nn.Sequential(Doubled())
    forwards = FusedForwards(model)
    assert len(forwards) == 1
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="does not give its bits"):
        with forwards.enabled():
            assert "forward" not in model[0].__dict__  # left as it is
    fused_forwards._kind_of_class.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_model_gives_its_own_logits_with_the_forwards_fused(dtype):
    # fp16, which the native ops do not take, runs the modules' own code.
    model = tiny_model("llama", seed=0).to(dtype).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    forwards = FusedForwards(model)
    kinds = sorted({k for _, k in forwards.modules})
    layers = model.config.num_hidden_layers
    assert kinds == ["mlp", "rms_norm"] and len(forwards.modules) == 3 * layers + 1
    assert [m.__name__.rsplit(".", 1)[-1] for m in forwards.rope] == ["modeling_llama"]
    with torch.no_grad():
        want = model(ids).logits
        with forwards.enabled():
            assert all("forward" in m.__dict__ for m, _ in forwards.modules)
            got = model(ids).logits
        assert not any("forward" in m.__dict__ for m, _ in forwards.modules)  # restored
    torch.testing.assert_close(got, want, **EXACT)  # the model's own bits
    with forwards.enabled():  # autograd on: the model's own forwards
        assert not any("forward" in m.__dict__ for m, _ in forwards.modules)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 16, 6])
def test_rope_matches_llamas_function(dtype, dim):
    # q and k as the model hands them over: [1, H, T, D] views of [1, T, H, D] projections;
    # whole vectors per half (64), a scalar path (16, 6). Each op rounds where torch's does.
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(dim)
    q = torch.randn(1, 7, 8, dim, generator=gen).to(dtype).transpose(1, 2)
    k = torch.randn(1, 7, 2, dim, generator=gen).to(dtype).transpose(1, 2)
    angle = (torch.randn(1, 7, dim // 2, generator=gen) * 5).repeat(1, 1, 2)
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = rope(q, k, cos, sin)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, **EXACT)
        assert g.stride() == w.stride()  # the layout the attention call reads next
    for w, s in zip(want, rope_torch(q, k, cos, sin), strict=True):
        torch.testing.assert_close(s, w, rtol=0, atol=0)
    with pytest.raises(ValueError, match="D even"):
        rope(q[..., :5], k[..., :5], cos[..., :5], sin[..., :5])


def test_rope_is_swapped_for_the_steps_only_and_restored_by_the_last():
    from transformers.models.llama import modeling_llama

    own = modeling_llama.apply_rotary_pos_emb
    a, b = (FusedForwards(tiny_model("llama", seed=s).eval()) for s in (0, 1))
    assert modeling_llama in a.rope
    with torch.no_grad():
        outer = a.enabled()
        outer.__enter__()
        swapped = modeling_llama.apply_rotary_pos_emb
        assert swapped is not own and swapped.own is own
        with b.enabled():  # a second run of the same family: one swap, counted
            assert modeling_llama.apply_rotary_pos_emb is swapped
        assert modeling_llama.apply_rotary_pos_emb is swapped  # a's step is still running
        outer.__exit__(None, None, None)
    assert modeling_llama.apply_rotary_pos_emb is own
    q = torch.randn(1, 2, 3, 8)
    cos, sin = torch.randn(1, 3, 8), torch.randn(1, 3, 8)
    outside = swapped(q, q, cos, sin)  # a call outside a fused step runs the original
    for w, g in zip(own(q, q, cos, sin), outside, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
