"""Llama-like decoder layers as two native calls around their attention (fused_layers.py), held
to the bits of the layers' own forwards in the same engine."""

from __future__ import annotations

import pytest
import torch
from test_text_sampler import PROMPTS, assert_exact
from tree_kernels.fused_cpu import fused_available

import rollout
from rollout.engine import fused_layers
from rollout.engine.packed_linear import available
from rollout.tiny import tiny_model

pytestmark = pytest.mark.skipif(
    not (fused_available() and available(torch.float32)),
    reason="needs the native CPU ops and oneDNN's packed linear layers",
)
KW = dict(segment_len=4, max_new_tokens=9, eos_token_id=[], seed=5)


def _counted(monkeypatch) -> list[int]:
    """Count the fused layers' calls (probes included)."""
    calls = [0]
    made = fused_layers._fused

    def counting(layer, weights):
        forward = made(layer, weights)

        def counted(*args, **kwargs):
            calls[0] += 1
            return forward(*args, **kwargs)

        return counted

    monkeypatch.setattr(fused_layers, "_fused", counting)
    return calls


def _sample(model, **kw) -> list:
    return rollout.Engine(model, block_size=4, **kw).sample_tree(PROMPTS, 2, [3, 2], **KW)


def _nodes(trees) -> list[tuple[list[int], list[float]]]:
    return [(n.tokens, n.logprobs) for t in trees for n in t.nodes()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_fused_layers_give_the_layers_own_trees(monkeypatch, dtype, family):
    # The same trees, token for token and log-prob for log-prob, as the layers' own forwards
    # in the same engine (prefill, decode and fork steps), and exact against teacher forcing.
    # Mistral's and Qwen2's attention pass their window to the call (Qwen2's q/k/v have
    # biases); Qwen3's has q/k norms: its layers keep their own forwards.
    if not available(dtype):
        pytest.skip(f"no oneDNN {dtype} linear on this CPU")
    model = tiny_model(family, seed=2).to(dtype).eval()
    monkeypatch.setattr(fused_layers, "_PROBED", {})
    calls = _counted(monkeypatch)
    got = _sample(model)
    layers = model.config.num_hidden_layers
    if family == "qwen3":
        assert calls[0] == 0
    else:
        assert calls[0] >= 3 * layers  # every layer, on every step
    monkeypatch.setattr(fused_layers, "candidates", lambda model: [])
    want = _sample(model)
    assert _nodes(got) == _nodes(want)
    assert not any("forward" in m.__dict__ for m in model.modules()), "left installed"
    if dtype == torch.float32:
        assert_exact(model, got)


def test_which_layers_are_candidates():
    llama = tiny_model("llama", seed=0)
    assert fused_layers.candidates(llama) == list(llama.model.layers)
    for family in ("qwen2", "mistral"):  # Llama's attention up to the window they pass
        model = tiny_model(family, seed=0)
        assert fused_layers.candidates(model) == list(model.model.layers), family
    assert fused_layers.candidates(tiny_model("qwen3", seed=0)) == []  # q/k norms
    layer = llama.model.layers[0]
    layer.forward = lambda *a, **k: None  # replaced on the instance: a wrapper's, not ours
    assert layer not in fused_layers.candidates(llama)


def test_off_without_packed_linears(monkeypatch):
    model = tiny_model("llama", seed=2).eval()
    calls = _counted(monkeypatch)
    trees = _sample(model, prepack=False)
    assert calls[0] == 0
    assert_exact(model, trees)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_that_does_not_give_its_bits_keeps_its_own_forward(monkeypatch, dtype):
    # The probe asks for the layer's own bits: an attention one ulp off is caught on the first
    # call, warned, and the run's trees are the layers' own.
    if not available(dtype):
        pytest.skip(f"no oneDNN {dtype} linear on this CPU")
    model = tiny_model("llama", seed=2).to(dtype).eval()
    monkeypatch.setattr(fused_layers, "_PROBED", {})
    monkeypatch.setattr(fused_layers, "candidates", lambda model: [])
    want = _sample(model)
    monkeypatch.undo()
    monkeypatch.setattr(fused_layers, "_PROBED", {})
    own = fused_layers.cascade_attention

    def nudged(*args, **kwargs):
        out = own(*args, **kwargs)
        return torch.nextafter(out, out + 1)

    monkeypatch.setattr(fused_layers, "cascade_attention", nudged)
    with pytest.warns(RuntimeWarning, match="does not give its bits"):
        got = _sample(model)
    assert fused_layers._PROBED == {(type(model.model.layers[0]), dtype): False}
    assert _nodes(got) == _nodes(want)
