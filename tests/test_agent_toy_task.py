"""The toy agent task: the calculator environment on hand-written turns, the tokenizer, and a
pretrained policy that has learned the protocol (it calls the tool, copies its answers, and is
sometimes right), held against the untrained one on the same prompts."""

from __future__ import annotations

import random

import pytest
import torch

import rollout
from rollout.agent import Turn
from trainers.agent.toy_task import (
    MAX_NEW_TOKENS,
    MAX_TURN_TOKENS,
    MAX_TURNS,
    PRETRAIN_STEPS,
    SHORTCUT_RATE,
    TURN_STOP,
    VOCAB,
    CalcTokenizer,
    CalculatorEnv,
    answer,
    build_toy_agent_policy,
    ideal_trace,
    ideal_turns,
    make_prompts,
    toy_agent_model,
)

TOK = CalcTokenizer()
PROMPTS = make_prompts(random.Random(7), 16)
PROTOCOL = set(TOK.encode("c*+]a")) | {TOK.eos_token_id}  # the tokens that are not copied digits


@pytest.fixture(scope="module")
def pretrained():
    model, _ = build_toy_agent_policy(PRETRAIN_STEPS, seed=0)
    return model


def turn(text: str, index: int = 0, finish_reason: str = "turn_stop") -> Turn:
    return Turn(tokens=tuple(TOK.encode(text)), text=text, index=index, finish_reason=finish_reason)


def episode_rewards(model, prompts, width: int, temperature: float) -> list[float]:
    trees = rollout.sample_tree(
        prompts,
        1,
        width,
        model=model,
        tokenizer=TOK,
        env=CalculatorEnv(),
        max_turns=MAX_TURNS,
        turn_stop=[TURN_STOP],
        max_turn_tokens=MAX_TURN_TOKENS,
        max_new_tokens=MAX_NEW_TOKENS,
        temperature=temperature,
        seed=0,
    )
    return [leaf.reward or 0.0 for tree in trees for leaf in tree.leaves()]


# the environment ------------------------------------------------------------------------------
def test_env_answers_calls_and_scores_the_final_answer():
    env = CalculatorEnv()
    state = env.start("12*34+5?")
    assert env.step(state, turn("c12*34]")).text == "=408|"
    assert env.step(state, turn("c408+5]", 1)).text == "=413|"
    assert state["calls"] == 2
    right = env.step(env.fork(state), turn("a413", 2, "eos"))
    assert (right.done, right.reward, right.info) == (True, 1.0, {"calls": 2})
    wrong = env.step(state, turn("a414", 2, "eos"))
    assert (wrong.done, wrong.reward) == (True, 0.0)


@pytest.mark.parametrize(
    "text", ["c12*]", "c1*2*3]", "c12*34", "12*34]", "c+3]", "a", "a12]", "", "c12*34]c"]
)
def test_env_answers_malformed_turns_with_an_error(text):
    env = CalculatorEnv()
    state = env.start("12*34+5?")
    obs = env.step(state, turn(text, finish_reason="length"))
    assert (obs.text, obs.done, obs.reward) == ("e|", False, None)
    assert (state["calls"], state["errors"]) == (0, 1)


def test_env_reads_a_prompt_given_as_token_ids():
    assert CalculatorEnv().start(TOK.encode("9*9+1?"))["answer"] == 82 == answer("9*9+1?")


def test_ideal_trace_is_the_protocol_with_only_the_models_turns_sampled():
    trace = ideal_trace("12*34+5?", TOK)
    assert TOK.decode(trace.ids, skip_special_tokens=False) == (
        "12*34+5?c12*34]=408|c408+5]=413|a413<eos>"
    )
    pairs = zip(trace.ids, trace.sampled, strict=True)
    sampled = "".join(TOK.decode([t], skip_special_tokens=False) for t, s in pairs if s)
    assert sampled == "".join(ideal_turns("12*34+5?")) + "<eos>"


# the tokenizer --------------------------------------------------------------------------------
def test_tokenizer_round_trips_every_character_and_refuses_unknown_ones():
    chars = "".join(VOCAB[2:])
    ids = TOK(chars, add_special_tokens=False)["input_ids"]
    assert ids == list(range(2, TOK.vocab_size)) == TOK.encode(chars, add_special_tokens=False)
    assert TOK.decode([TOK.pad_token_id, *ids, TOK.eos_token_id], skip_special_tokens=True) == chars
    assert TOK.decode([TOK.eos_token_id], skip_special_tokens=False) == "<eos>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        TOK.encode("12x")


# the policy -----------------------------------------------------------------------------------
def test_pretrained_policy_predicts_the_ideal_trace(pretrained):
    """Teacher-forced on ideal episodes, the pretrained policy's argmax is nearly every token of
    its own turns, protocol tokens ("c", "*", "+", "]", "a", EOS) and copied digits alike, except
    the decision after the first tool result, where its SFT mix answers too early most of the
    time: there it calls again with probability near 1 - SHORTCUT_RATE. The untrained policy's
    argmax is mostly wrong."""

    def accuracy(model) -> tuple[float, float, float]:
        hits, protocol_hits, n, n_protocol, p_call = 0, 0, 0, 0, []
        for prompt in PROMPTS:
            trace = ideal_trace(prompt, TOK)
            decision = trace.ids.index(TOK.encode("|")[0]) + 1  # turn 2's first token
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([trace.ids])).logits[0]
            p_call.append(logits[decision - 1].softmax(-1)[trace.ids[decision]].item())
            for pos in range(1, len(trace.ids)):
                if trace.sampled[pos] and pos != decision:
                    hit = int(logits[pos - 1].argmax()) == trace.ids[pos]
                    hits, n = hits + hit, n + 1
                    if trace.ids[pos] in PROTOCOL:
                        protocol_hits, n_protocol = protocol_hits + hit, n_protocol + 1
        return hits / n, protocol_hits / n_protocol, sum(p_call) / len(p_call)

    acc, protocol_acc, p_call = accuracy(pretrained)
    assert protocol_acc > 0.95 and acc > 0.9, (acc, protocol_acc)
    assert abs(p_call - (1 - SHORTCUT_RATE)) < 0.2, p_call
    assert accuracy(toy_agent_model(seed=0))[0] < 0.3


def test_pretrained_policy_solves_some_episodes_and_beats_the_untrained_one(pretrained):
    # greedy follows the SFT mix's majority (answer early, reward 0): sample at temperature 1
    trained = episode_rewards(pretrained, PROMPTS[:8], 4, temperature=1.0)
    assert sum(trained) > 0, trained
    untrained = episode_rewards(toy_agent_model(seed=0), PROMPTS[:8], 4, temperature=1.0)
    assert sum(untrained) < sum(trained), (untrained, trained)


def test_same_seed_same_weights():
    a, _ = build_toy_agent_policy(3, seed=5)
    b, _ = build_toy_agent_policy(3, seed=5)
    c, _ = build_toy_agent_policy(3, seed=6)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=name)
    assert any(
        not torch.equal(pa, pc)
        for pa, pc in zip(a.state_dict().values(), c.state_dict().values(), strict=True)
    )
