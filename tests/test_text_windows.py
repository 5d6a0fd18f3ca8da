"""Per-layer attention terms in sample_tree, held against the model's own eager forward (fp32):
sliding windows far past the window (Mistral: every layer; Qwen2, Gemma 3: some layers), learned
attention sinks (gpt-oss) and logit soft-capping (Gemma 2)."""

from __future__ import annotations

import pytest
import torch
from test_text_sampler import assert_exact, teacher_forced_logprobs
from transformers import AutoConfig, AutoModelForCausalLM

import rollout
from rollout.engine.layout import layer_windows

SMALL = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False,
)  # fmt: skip
WINDOWED = {
    "mistral": dict(sliding_window=8, num_hidden_layers=2),
    # layer_types derived: layers >= max_window_layers slide
    "qwen2": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1,
                  num_hidden_layers=3),
    "gemma3_text": dict(sliding_window=8, num_hidden_layers=3,
                        layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}  # fmt: skip


def eager_model(model_type: str, seed: int = 0, **fields):
    config = AutoConfig.for_model(model_type, **SMALL, **fields)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def full_attention_logprobs(model, traj):
    """The oracle with every window widened past the sequence: what a missing mask would give."""
    text = model.config.get_text_config()
    window, text.sliding_window = text.sliding_window, 10_000
    try:
        return teacher_forced_logprobs(model, traj.prompt_ids, traj.completion_ids)
    finally:
        text.sliding_window = window


def test_layer_windows_follow_each_config():
    assert layer_windows(eager_model("mistral", **WINDOWED["mistral"]).config) == (8, 8)
    assert layer_windows(eager_model("qwen2", **WINDOWED["qwen2"]).config) == (None, 8, 8)
    assert layer_windows(eager_model("qwen2", num_hidden_layers=2).config) == (None, None)
    assert layer_windows(eager_model("gemma3_text", **WINDOWED["gemma3_text"]).config) == (
        8, None, 8,
    )  # fmt: skip


@pytest.mark.parametrize("model_type", list(WINDOWED))
@pytest.mark.parametrize("max_step_tokens", [4096, 5])
def test_sliding_windows_are_exact_past_the_window(model_type, max_step_tokens):
    # depth-3 trees whose paths (prompt 11-13, then 3 + 3 + 18 new tokens) are 4-5 windows long;
    # max_step_tokens=5 prefills prompts in chunks that straddle window edges.
    model = eager_model(model_type, seed=1, **WINDOWED[model_type])
    engine = rollout.Engine(model, block_size=4, max_step_tokens=max_step_tokens)
    prompts = [list(range(3, 16)), list(range(40, 51))]
    trees = engine.sample_tree(
        prompts, 3, [2, 1, 2], segment_len=3, max_new_tokens=24, eos_token_id=[], seed=2
    )
    assert_exact(model, trees)
    traj = trees[0].trajectories()[0]
    windowed = teacher_forced_logprobs(model, traj.prompt_ids, traj.completion_ids)
    gap = (windowed - full_attention_logprobs(model, traj)).abs().max().item()
    assert gap > 1e-3, f"the oracle must apply its own window (gap {gap:.1e})"
    assert engine.pool.used_blocks == 0


def exact_trajectory_past_the_window(model):
    """A depth-3 tree whose paths reach 33 tokens (4x the window), held exact; one of its
    trajectories, for the caller's check that the oracle applies its term."""
    engine = rollout.Engine(model, block_size=4)
    trees = engine.sample_tree(
        [list(range(3, 16))], 3, [2, 1, 2], segment_len=3, max_new_tokens=20, eos_token_id=[]
    )
    assert_exact(model, trees)
    return trees[0].trajectories()[0]


def test_attention_sinks_are_exact_past_the_window():
    # gpt-oss: a learned sink logit per head in every softmax, sliding windows on alternate
    # layers. Sinks are drawn large so they move the output well past the tolerance.
    model = eager_model("gpt_oss", seed=3, sliding_window=8, num_hidden_layers=2,
                        num_local_experts=4, num_experts_per_tok=2)
    assert layer_windows(model.config) == (8, None)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.randn(layer.self_attn.sinks.shape) * 2)
    traj = exact_trajectory_past_the_window(model)
    with_sinks = teacher_forced_logprobs(model, traj.prompt_ids, traj.completion_ids)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.fill_(-1e4)  # exp(-1e4) = 0: no sink
    no_sinks = teacher_forced_logprobs(model, traj.prompt_ids, traj.completion_ids)
    assert (with_sinks - no_sinks).abs().max() > 1e-3, "the oracle must apply its sinks"


def test_logit_softcapping_is_exact_past_the_window():
    # Gemma 2: scores soft-capped (attn_logit_softcapping) on every layer, windows on alternate
    # ones; a small cap so it bends the tiny model's scores.
    model = eager_model("gemma2", seed=4, sliding_window=8, num_hidden_layers=2,
                        attn_logit_softcapping=0.5)
    assert layer_windows(model.config) == (8, None)
    with torch.no_grad():  # random init gives scores ~1e-3, where tanh is linear: widen them
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(10)
            layer.self_attn.k_proj.weight.mul_(10)
    traj = exact_trajectory_past_the_window(model)
    capped = teacher_forced_logprobs(model, traj.prompt_ids, traj.completion_ids)
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    plain = teacher_forced_logprobs(model, traj.prompt_ids, traj.completion_ids)
    assert (capped - plain).abs().max() > 1e-3, "the oracle must soft-cap its scores"


BF16_CASES = {
    "mistral": WINDOWED["mistral"],
    # every expert active: top-2 of 4 flips at router near-ties (a 1e-3 margin seen), which bf16
    # rounding of the attention in another order decides one way or the other
    "gpt_oss": dict(sliding_window=8, num_hidden_layers=2, num_local_experts=4,
                    num_experts_per_tok=4, layer_types=["sliding_attention", "full_attention"]),
    "gemma2": dict(sliding_window=8, num_hidden_layers=2, attn_logit_softcapping=0.5),
}  # fmt: skip


@pytest.mark.parametrize("model_type", list(BF16_CASES))
def test_bf16_trees_match_bf16_teacher_forcing_past_the_window(model_type):
    """bf16 against the model's own bf16 forward, paths 4x the window: the engine's cascade
    reduces in fp32, the eager oracle in bf16, so they differ by bf16 rounding (up to 4.2e-3
    seen; tolerance 1e-2)."""
    model = eager_model(model_type, seed=6, **BF16_CASES[model_type]).to(torch.bfloat16)
    prompts = [list(range(3, 16)), [5, 6, 7]]
    trees = rollout.sample_tree(prompts, 3, [2, 1, 2], model=model, segment_len=3,
                                max_new_tokens=20, eos_token_id=[9], seed=3)
    assert_exact(model, trees, atol=1e-2)
