"""The engine's linear layers on oneDNN's prepacked weights, held against the model's forward."""

from __future__ import annotations

import pytest
import torch
from test_text_sampler import PROMPTS, assert_exact
from torch import nn

import rollout
from rollout.engine.packed_linear import PackedLinears, available
from rollout.tiny import tiny_model

pytestmark = pytest.mark.skipif(
    not available(torch.float32), reason="this torch build has no oneDNN linear for the CPU"
)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


# bf16 rounds every layer: the same products summed in another order may round an ulp apart
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_packed_forward_equals_the_models_own(dtype, atol):
    if not available(dtype):
        pytest.skip(f"no oneDNN {dtype} linear on this CPU")
    model = tiny_model("llama", seed=1).to(dtype)
    ids = torch.tensor([list(range(3, 40))])
    linears = PackedLinears(model)
    assert len(linears) == len(_linears(model))  # every projection and the LM head
    with torch.inference_mode():
        want = model(ids).logits.float()
        with linears.enabled():
            assert all("forward" in m.__dict__ for m in linears.modules)
            got = model(ids).logits.float()
    assert not any("forward" in m.__dict__ for m in linears.modules), "left installed"
    torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)


def test_weights_changed_between_calls_are_repacked():
    # In place (an optimizer step, load_state_dict) and by replacement: the next call samples
    # from the new weights, as teacher forcing with them says.
    model = tiny_model("llama", seed=1)
    engine = rollout.Engine(model, block_size=4)
    kw = dict(segment_len=3, max_new_tokens=6, eos_token_id=[], seed=2)
    assert_exact(model, engine.sample_tree(PROMPTS, 2, 2, **kw))
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mlp.down_proj.weight.mul_(3.0)
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    mlp.up_proj.weight = nn.Parameter(torch.randn_like(mlp.up_proj.weight))
    assert_exact(model, engine.sample_tree(PROMPTS, 2, 2, **kw))


def test_one_run_sees_changes_between_its_steps():
    # A long-lived run (the service's) keeps one PackedLinears across steps: each step checks.
    model = tiny_model("llama", seed=1)
    linears = PackedLinears(model)
    ids = torch.tensor([list(range(3, 20))])
    q = model.model.layers[1].self_attn.q_proj
    down = model.model.layers[0].mlp.down_proj
    changes = [
        lambda: down.weight.mul_(2.0),  # in place
        lambda: setattr(down, "weight", nn.Parameter(torch.randn_like(down.weight))),
        lambda: setattr(q, "bias", nn.Parameter(torch.randn(q.out_features))),  # bias alone
    ]
    for change in [lambda: None, *changes]:
        with torch.no_grad():
            change()
        with torch.inference_mode():
            want = model(ids).logits
            with linears.enabled():
                got = model(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_modules_it_cannot_pack_or_track_are_left_alone():
    model = tiny_model("llama", seed=1)
    attn = model.model.layers[0].self_attn

    class Scaled(nn.Linear):  # overrides forward: not nn.Linear's product
        def forward(self, x):
            return super().forward(x) * 2

    scaled = Scaled(attn.o_proj.in_features, attn.o_proj.out_features, bias=False)
    scaled.weight = attn.o_proj.weight
    attn.o_proj = scaled
    hooked = attn.q_proj
    hooked.forward = lambda x, _m=hooked: nn.functional.linear(x, _m.weight)  # an offload hook
    with torch.inference_mode():
        frozen = nn.Linear(4, 4)  # made under inference mode: no version to watch
    model.model.layers[0].mlp.extra = frozen
    packed = PackedLinears(model).modules
    assert not any(m is scaled or m is hooked or m is frozen for m in packed)
    assert len(packed) == len(_linears(model)) - 3
    # and the engine is still exact around them
    assert_exact(model, rollout.Engine(model, block_size=4).sample_tree(
        PROMPTS, 1, 2, max_new_tokens=5, eos_token_id=[], seed=1
    ))


def test_off_with_prepack_false_and_with_autograd():
    model = tiny_model("llama", seed=1)
    assert len(rollout.Engine(model, prepack=False).open_run(num_blocks=8).linears) == 0
    linears = PackedLinears(model)
    with torch.enable_grad(), linears.enabled():  # a backward pass needs the plain product
        assert not any("forward" in m.__dict__ for m in linears.modules)
