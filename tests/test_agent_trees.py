"""Agent trees: `sample_tree(..., env=...)` held against the model's own forward pass over the
whole multi-turn sequence, and against environments whose answers depend on their history."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

import rollout
from rollout.agent import Env, EnvProtocolError, Observation
from rollout.tiny import tiny_model, tiny_tokenizer
from trees import Tree

PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 8], [3, 4, 5], list(range(20, 45))]
STOP_IDS = list(range(40, 52))  # turn_stop ids: ragged turns on a random model


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=3)


def history_obs(turns: list[tuple[int, ...]]) -> list[int]:
    """What `History` answers after `turns`: depends on every turn so far, in order."""
    h = 17
    for turn in turns:
        for t in turn:
            h = (h * 31 + t) % 1_000_003
        h = (h * 7 + 1) % 1_000_003
    return [60 + h % 30, 60 + (h // 30) % 30, 90 + len(turns)]


class History(Env):
    """Keeps the turns in its state; the observation is a hash of all of them."""

    def __init__(self, done_after: int = 99) -> None:
        self.done_after, self.calls, self.lock = done_after, 0, threading.Lock()

    def start(self, prompt):
        return {"prompt": list(prompt), "turns": []}

    def step(self, state, turn):
        with self.lock:
            self.calls += 1
        state["turns"].append(turn.tokens)
        reward = float(sum(turn.tokens) % 7)
        return Observation(
            tokens=history_obs(state["turns"]), done=len(state["turns"]) >= self.done_after,
            reward=reward,
        )


class AsyncHistory(History):
    async def step(self, state, turn):
        await asyncio.sleep(0.001)
        return History.step(self, state, turn)


def runs(traj) -> list[tuple[bool, list[int]]]:
    """The completion split into runs of sampled tokens (turns) and observation tokens."""
    out: list[tuple[bool, list[int]]] = []
    for tok, s in zip(traj.completion_ids, traj.loss_mask, strict=True):
        if out and out[-1][0] == s:
            out[-1][1].append(tok)
        else:
            out.append((s, [tok]))
    return out


def assert_sampled_logprobs_exact(model, trees: list[Tree]) -> None:
    """Sampled tokens: log-probs equal teacher forcing over prompt + every turn and observation
    (fp32, 1e-4); observation tokens: no log-prob."""
    for tree in trees:
        for traj in tree.trajectories():
            ids = torch.tensor([traj.prompt_ids + traj.completion_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            logp = logp[len(traj.prompt_ids) - 1 : -1]
            want = logp.gather(-1, torch.tensor(traj.completion_ids)[:, None])[:, 0]
            mask = torch.tensor(traj.loss_mask)
            pairs = zip(traj.logprobs, traj.loss_mask, strict=True)
            assert all((lp is None) == (not s) for lp, s in pairs)
            got = torch.tensor([lp for lp in traj.logprobs if lp is not None])
            torch.testing.assert_close(got, want[mask], atol=1e-4, rtol=0)


def sample(model, env, **kw):
    args = dict(
        depth=3, width=[2, 2, 1], model=model, env=env, max_turns=4, max_turn_tokens=6,
        turn_stop=STOP_IDS, max_new_tokens=60, seed=11,
    )
    args.update(kw)
    return rollout.sample_tree(PROMPTS, args.pop("depth"), args.pop("width"), **args)


def test_per_turn_trees_are_exact_and_each_child_has_its_own_episode(model):
    env = History()
    trees = sample(model, env)
    assert_sampled_logprobs_exact(model, trees)
    for tree in trees:
        # every inner node is one turn and its observation, forked where the observation ends
        for node in tree.nodes():
            if node.depth and node.children:
                assert node.finish_reason == "branch"
                flips = sum(a != b for a, b in zip(node.sampled, node.sampled[1:], strict=False))
                assert node.sampled[0] and not node.sampled[-1] and flips == 1
        for traj in tree.trajectories():
            parts = runs(traj)
            turns = [tuple(t) for s, t in parts if s]
            observed = [t for s, t in parts if not s]
            # each observation answers exactly its own path's turns (forks copied the state)
            assert observed == [history_obs(turns[: k + 1]) for k in range(len(observed))]
            assert traj.leaf.finish_reason in ("max_turns", "length", "stop", "done", "eos")
            if traj.leaf.finish_reason == "max_turns":
                assert len(turns) == 4
    # stats: calls counted by the environment itself, and what a flat run would add
    calls = sum(t.stats.env_calls for t in trees)
    assert calls == env.calls
    flat = sum(sum(1 for s, _ in runs(tr) if s) for t in trees for tr in t.trajectories())
    assert sum(t.stats.env_calls + t.stats.env_calls_saved for t in trees) == flat > calls
    for t in trees:  # shared turns are forwarded once
        assert t.stats.tokens_forwarded + t.stats.prefix_tokens_reused == t.stats.kv_tokens
        flat_tokens = sum(len(tr.prompt_ids) + len(tr.completion_ids) for tr in t.trajectories())
        assert t.stats.tokens_saved == flat_tokens - t.stats.unique_tokens > 0


def test_rewards_and_done(model):
    trees = sample(model, History(done_after=2), width=[2, 1], depth=2, max_turns=5)
    for tree in trees:
        for traj in tree.trajectories():
            leaf = traj.leaf
            assert sum(1 for s, _ in runs(traj) if s) <= 2
            if leaf.finish_reason == "done":
                rewards = [r for n in leaf.path() for r in n.meta.get("turn_rewards", [])]
                assert leaf.reward == rewards[-1] and len(rewards) == 2


def test_async_environment_gives_the_same_trees(model):
    """Draws are keyed by the tree path, so the answers' timing (which changes the batches and the
    node numbering) changes no token."""
    sync = sample(model, History())
    other = sample(model, AsyncHistory())
    for a, b in zip(sync, other, strict=True):
        for ta, tb in zip(a.trajectories(), b.trajectories(), strict=True):
            assert ta.completion_ids == tb.completion_ids and ta.loss_mask == tb.loss_mask
            assert [n.key for n in ta.nodes] == [n.key for n in tb.nodes]


def test_json_round_trip_keeps_masks_and_missing_logprobs(model):
    tree = sample(model, History())[0]
    back = Tree.from_json(tree.to_json())
    for a, b in zip(tree.trajectories(), back.trajectories(), strict=True):
        assert a.loss_mask == b.loss_mask and a.logprobs == b.logprobs
        assert False in a.loss_mask


@pytest.mark.parametrize("threshold,after", [(0.0, 0), (100.0, 3)])
def test_entropy_forks_come_after_an_observation(model, threshold, after):
    trees = sample(
        model, History(), branch_entropy=threshold, segment_len=3, turn_stop=None,
        max_turn_tokens=5, eos_token_id=[0],
    )
    assert_sampled_logprobs_exact(model, trees)
    for tree in trees:
        for node in tree.nodes():
            if node.depth and node.children:
                # the rest of a turn of 5 (a parent forked `after` tokens into it), the
                # observation (3 ids), then `after` sampled tokens
                rest = 5 if node.depth == 1 else 5 - after
                assert node.sampled == [True] * rest + [False] * 3 + [True] * after, node.sampled


class Gate(History):
    """The first call for one prompt blocks until the engine has stepped `steps` more times."""

    def __init__(self, slow_prompt, steps: int) -> None:
        super().__init__()
        self.slow_prompt, self.steps = slow_prompt, steps
        self.engine_steps, self.blocked_at, self.released = 0, None, threading.Event()

    def on_step(self, run) -> None:
        self.engine_steps += 1
        if self.blocked_at is not None and self.engine_steps >= self.blocked_at + self.steps:
            self.released.set()

    def step(self, state, turn):
        if state["prompt"] == self.slow_prompt and self.blocked_at is None:
            self.blocked_at = self.engine_steps
            assert self.released.wait(timeout=60), "the engine stopped stepping"
        return super().step(state, turn)


def test_a_slow_environment_does_not_stall_other_branches(model):
    env = Gate(PROMPTS[1], steps=8)
    engine = rollout.Engine(model)
    trees = engine.sample_tree(
        PROMPTS, 1, 2, env=env, max_turns=3, max_turn_tokens=6, max_new_tokens=60,
        on_step=env.on_step, eos_token_id=[0],
    )
    assert env.released.is_set()  # 8 engine steps ran while that call was out
    slow = trees[1]
    assert all(leaf.finish_reason == "max_turns" for leaf in slow.leaves())
    assert_sampled_logprobs_exact(model, trees)


class Failing(History):
    """The first call of one prompt raises, and one other branch's call never answers in time."""

    def __init__(self, hang: float) -> None:
        super().__init__()
        self.hang, self.failed, self.hung = hang, set(), set()

    def step(self, state, turn):
        key = tuple(state["prompt"])
        with self.lock:
            fail = key == tuple(PROMPTS[0]) and key not in self.failed
            hang = key == tuple(PROMPTS[2]) and not fail and key not in self.hung
            self.failed.add(key) if fail else None
            self.hung.add(key) if hang else None
        if fail:
            raise RuntimeError("tool crashed")
        if hang:
            time.sleep(self.hang)
        return super().step(state, turn)


def test_failing_and_slow_calls_end_only_their_branch(model):
    trees = rollout.sample_tree(
        PROMPTS, 1, 2, model=model, env=Failing(hang=3.0), max_turns=3, max_turn_tokens=4,
        max_new_tokens=40, env_timeout=0.5, eos_token_id=[0],
    )
    reasons = [[leaf.finish_reason for leaf in t.leaves()] for t in trees]
    assert sorted(reasons[0]) == ["env_error", "max_turns"]
    assert sorted(reasons[1]) == ["max_turns", "max_turns"]
    assert sorted(reasons[2]) == ["env_timeout", "max_turns"]
    err = next(leaf for leaf in trees[0].leaves() if leaf.finish_reason == "env_error")
    assert "RuntimeError: tool crashed" in err.meta["env_error"]


class Wrong(Env):
    def step(self, state, turn):
        return {"text": "not an Observation"}


class OutOfVocab(Env):
    def step(self, state, turn):
        return Observation(tokens=[10**6])


@pytest.mark.parametrize("env", [Wrong(), OutOfVocab()])
def test_an_environment_that_breaks_the_protocol_stops_the_run(model, env):
    engine = rollout.Engine(model)
    with pytest.raises(EnvProtocolError, match=type(env).__name__):
        engine.sample_tree(PROMPTS, 1, 2, env=env, max_turns=2, max_new_tokens=20)
    assert engine.pool.used_blocks == 0


class AsyncFork(Env):
    async def fork(self, state):
        return state


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(env=object(), max_turns=2), TypeError, "step"),
        (dict(env=AsyncFork(), max_turns=2), TypeError, "fork must be a plain"),
        (dict(env=History(), max_turns=-1), ValueError, "max_turns=-1"),
        (dict(env=History()), ValueError, "needs max_turns"),
        (dict(env=History(), max_turns=1, depth=2), ValueError, "max_turns=1 < depth=2"),
        (dict(max_turns=3), ValueError, "without env"),
        (dict(env=History(), max_turns=2, turn_stop=[""]), ValueError, "turn_stop"),
        (dict(env=History(), max_turns=2, turn_stop="</tool>"), ValueError, "tokenizer"),
        (dict(env=History(), max_turns=2, segment_len=4), ValueError, "segment_len"),
        (dict(env=History(), max_turns=2, env_timeout=0), ValueError, "env_timeout"),
    ],
)
def test_bad_agent_arguments_are_refused_before_any_work(model, kwargs, error, match):
    depth = kwargs.pop("depth", 1)
    steps = []
    with pytest.raises(error, match=match):
        rollout.Engine(model).sample_tree(
            PROMPTS, depth, 2, on_step=steps.append, max_new_tokens=20, **kwargs
        )
    assert not steps


def test_text_observations_and_turn_stop_strings(model):
    tok = tiny_tokenizer()

    class Calc(Env):
        def step(self, state, turn):
            assert isinstance(turn.text, str)
            return Observation(text=f"\n<result>{len(turn.text)}</result>\n")

    trees = rollout.sample_tree(
        ["2+2=", "what is 3*4?"], 2, [2, 2], model=model, tokenizer=tok, env=Calc(),
        max_turns=3, max_turn_tokens=8, turn_stop=["a", "e"], max_new_tokens=80,
    )
    assert_sampled_logprobs_exact(model, trees)
    for tree in trees:
        for traj in tree.trajectories():
            for s, ids in runs(traj):
                if not s:
                    assert tok.decode(ids).startswith("\n<result>")


def test_packed_training_forward_reads_only_sampled_tokens(model):
    """The trainers' packed tree forward over agent trees: one target per sampled token, equal to
    the sampler's log-prob (on-policy), observation tokens forwarded but never targets; GRPO's
    per-sequence weights average over each leaf's sampled tokens only."""
    from trainers.text.forward import packed_logprobs
    from trainers.text.packing import pack_trees

    trees = sample(model, History())
    batch = pack_trees(trees, use_advantages=False)
    sampled = [lp for t in trees for n in t.nodes() for lp in n.logprobs if lp is not None]
    assert batch.target_ids.numel() == len(sampled)
    torch.testing.assert_close(batch.old_logprobs, torch.tensor(sampled))
    with torch.no_grad():
        got = packed_logprobs(model, batch, temperature=1.0)
    torch.testing.assert_close(got, batch.old_logprobs, atol=1e-4, rtol=0)
    for row in range(len(trees)):  # weights sum to 1 per tree
        w = batch.seq_weights[batch.target_row == row].sum()
        torch.testing.assert_close(w, torch.tensor(1.0))


class AsyncSlow(History):
    """An async environment whose first call for one prompt sleeps past the timeout."""

    def __init__(self) -> None:
        super().__init__()
        self.cancelled = threading.Event()

    async def step(self, state, turn):
        if tuple(state["prompt"]) == tuple(PROMPTS[2]) and turn.index == 0:
            try:
                await asyncio.sleep(300)
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return History.step(self, state, turn)


def test_an_async_call_past_its_timeout_is_cancelled_and_ends_only_its_branch(model):
    env = AsyncSlow()
    trees = rollout.sample_tree(
        PROMPTS, 1, 1, model=model, env=env, max_turns=2, max_turn_tokens=4,
        max_new_tokens=40, env_timeout=0.5, eos_token_id=[0],
    )
    assert [t.leaves()[0].finish_reason for t in trees] == ["max_turns", "max_turns", "env_timeout"]
    # a timed-out coroutine is cancelled (on the environment's loop), not left sleeping 300 s
    assert env.cancelled.wait(timeout=60)
