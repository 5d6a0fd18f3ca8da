"""sample_tree on tiny transformers models, held against the model's own forward pass."""

from __future__ import annotations

import itertools

import pytest
import torch

import rollout
from rollout.tiny import FAMILIES, tiny_model


def teacher_forced_logprobs(model, prompt_ids, completion_ids, temperature=1.0):
    """log_softmax(logits / T) of the completion under the model's own (eager) forward pass."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]
    return logp.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def assert_exact(model, trees, temperature=1.0, atol=1e-4):
    """Every leaf's log-probs equal teacher forcing to `atol` (fp32: 1e-4; bf16 names its own)."""
    for tree in trees:
        for traj in tree.trajectories():
            expected = teacher_forced_logprobs(
                model, traj.prompt_ids, traj.completion_ids, temperature
            )
            torch.testing.assert_close(torch.tensor(traj.logprobs), expected, atol=atol, rtol=0)


PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 8], [3, 4, 5], list(range(20, 57))]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "depth,width,segment_len", [(1, 3, 4), (2, [2, 3], 5), (3, [2, 1, 2], [3, 2])]
)
def test_logprobs_equal_the_models_forward(family, depth, width, segment_len):
    model = tiny_model(family, seed=1)
    engine = rollout.Engine(model, block_size=4)
    trees = engine.sample_tree(
        PROMPTS, depth, width, segment_len=segment_len, max_new_tokens=12, eos_token_id=[], seed=3
    )
    assert len(trees) == len(PROMPTS)
    assert_exact(model, trees)
    assert engine.pool.used_blocks == 0, "blocks leaked after the run"
    for tree, prompt in zip(trees, PROMPTS, strict=True):
        assert tree.prompt_ids == prompt
        assert tree.stats.tokens_forwarded == tree.stats.kv_tokens


def test_plain_reference_attention_is_exact_in_the_engine():
    # attn_impl="reference" (the plain torch spec; the text-tree benchmark's before row) samples
    # the same tree as the default fused CPU path, and both equal the model's forward.
    model = tiny_model("llama", seed=1)
    kw = dict(segment_len=3, max_new_tokens=8, eos_token_id=[], seed=5)
    fast = rollout.Engine(model, block_size=4).sample_tree(PROMPTS, 2, [2, 3], **kw)
    ref = rollout.Engine(model, block_size=4, attn_impl="reference").sample_tree(
        PROMPTS, 2, [2, 3], **kw
    )
    assert_exact(model, ref)
    for a, b in zip(fast, ref, strict=True):
        for ta, tb in zip(a.trajectories(), b.trajectories(), strict=True):
            assert ta.completion_ids == tb.completion_ids
            torch.testing.assert_close(
                torch.tensor(ta.logprobs), torch.tensor(tb.logprobs), atol=1e-5, rtol=0
            )


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 0, 1.0), (1.3, 5, 1.0), (1.0, 0, 0.8)])
def test_tempered_logprobs_are_of_logits_over_temperature(temperature, top_k, top_p):
    model = tiny_model("llama", seed=2)
    trees = rollout.sample_tree(
        PROMPTS[:2],
        2,
        3,
        model=model,
        segment_len=3,
        max_new_tokens=8,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=[],
    )
    assert_exact(model, trees, temperature)


def test_greedy_branches_agree():
    model = tiny_model("qwen2", seed=0)
    (tree,) = rollout.sample_tree(
        [PROMPTS[0]],
        2,
        3,
        model=model,
        segment_len=3,
        max_new_tokens=7,
        temperature=0.0,
        eos_token_id=[],
    )
    completions = {tuple(t.completion_ids) for t in tree.trajectories()}
    assert len(completions) == 1
    ids = torch.tensor([PROMPTS[0]])
    greedy = model.generate(
        ids, max_new_tokens=7, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(PROMPTS[0]) :].tolist()
    assert list(completions.pop()) == greedy


@pytest.mark.parametrize("depth,width", [(1, 4), (2, [3, 2]), (3, 2), (4, [1, 2, 1, 3])])
def test_tree_shape_and_shared_prefixes(depth, width):
    model = tiny_model("llama", seed=4)
    seg = 2
    (tree,) = rollout.sample_tree(
        [PROMPTS[1]],
        depth,
        width,
        model=model,
        segment_len=seg,
        max_new_tokens=2 * depth + 3,
        eos_token_id=[],
    )
    widths = [width] * depth if isinstance(width, int) else width
    assert len(tree.leaves()) == int(torch.tensor(widths).prod())
    for node in tree.nodes():
        if node.depth == 0:
            continue
        expected_len = seg if node.depth < depth else 5
        assert len(node.tokens) == len(node.logprobs) == expected_len
        assert len(node.children) == (widths[node.depth] if node.depth < depth else 0)
    trajs = tree.trajectories()
    for a, b in itertools.combinations(trajs, 2):
        shared = 0
        for na, nb in zip(a.nodes[1:], b.nodes[1:], strict=False):
            if na is not nb:
                break
            shared += len(na.tokens)
        assert a.completion_ids[:shared] == b.completion_ids[:shared]
        assert a.logprobs[:shared] == b.logprobs[:shared]


def test_seeded_sampling_is_reproducible_and_independent_of_batching():
    model = tiny_model("llama", seed=5)
    kw = dict(segment_len=3, max_new_tokens=9, eos_token_id=[], seed=11)
    a = rollout.sample_tree([PROMPTS[0], PROMPTS[1]], 2, 3, model=model, **kw)
    b = rollout.sample_tree([PROMPTS[0], PROMPTS[1]], 2, 3, model=model, **kw)
    c = rollout.sample_tree([PROMPTS[0], PROMPTS[2]], 2, 3, model=model, **kw)
    tight = rollout.sample_tree(
        [PROMPTS[0], PROMPTS[1]], 2, 3, model=model, kv_budget=120_000, **kw
    )  # one tree at a time
    other = rollout.sample_tree([PROMPTS[0], PROMPTS[1]], 2, 3, model=model, **{**kw, "seed": 12})

    def comps(tree):
        return [t.completion_ids for t in tree.trajectories()]

    assert comps(a[0]) == comps(b[0]) == comps(c[0]) == comps(tight[0])
    assert comps(a[1]) == comps(tight[1])
    assert comps(a[0]) != comps(other[0])


def test_eos_makes_a_leaf():
    model = tiny_model("llama", seed=6)
    eos = list(range(0, 256, 3))  # about a third of the vocabulary ends a branch
    engine = rollout.Engine(model, block_size=2)
    trees = engine.sample_tree(PROMPTS, 3, 3, segment_len=3, max_new_tokens=10, eos_token_id=eos)
    stopped = 0
    for tree in trees:
        for node in list(tree.nodes())[1:]:
            eos_at = [i for i, t in enumerate(node.tokens) if t in eos]
            if eos_at:
                stopped += 1
                assert eos_at == [len(node.tokens) - 1]
                assert node.finish_reason == "eos" and node.is_leaf
            else:
                assert node.finish_reason in ("branch", "length")
        assert tree.stats.tokens_forwarded == tree.stats.kv_tokens
    assert stopped > 0
    assert_exact(model, trees)
    assert engine.pool.used_blocks == 0


def test_chunked_prefill_is_exact():
    model = tiny_model("qwen3", seed=7)
    engine = rollout.Engine(model, block_size=4, max_step_tokens=5)
    trees = engine.sample_tree(PROMPTS, 2, 2, segment_len=3, max_new_tokens=6, eos_token_id=[])
    assert_exact(model, trees)
    assert all(t.stats.tokens_forwarded == t.stats.kv_tokens for t in trees)


def test_string_prompts_with_a_tokenizer():
    class CharTokenizer:
        eos_token_id = None

        def __call__(self, text):
            return {"input_ids": [ord(c) % 256 for c in text]}

    model = tiny_model("llama", seed=8)
    (tree,) = rollout.sample_tree(
        ["hello tree"], 1, 2, model=model, tokenizer=CharTokenizer(), max_new_tokens=4
    )
    assert tree.prompt == "hello tree"
    assert tree.prompt_ids == [ord(c) for c in "hello tree"]
    assert len(tree.leaves()) == 2


def test_children_read_their_parents_kv_in_place():
    """Peak KV is the tree's unique tokens in blocks, far below one copy of the prompt per leaf."""
    model = tiny_model("llama", seed=9)
    engine = rollout.Engine(model, block_size=4)
    (tree,) = engine.sample_tree(
        [list(range(40))], 2, 4, segment_len=4, max_new_tokens=8, eos_token_id=[]
    )
    block_bytes = engine.pool.bytes_per_block
    unique_blocks = 40 // 4 + 4 * 1 + 16 * 1
    assert tree.stats.peak_kv_bytes <= unique_blocks * block_bytes
    assert tree.stats.peak_kv_bytes < 16 * (40 // 4) * block_bytes


def test_peak_kv_is_each_trees_own_whatever_else_runs():
    """A depth-1 tree keeps every node alive to the end, so its peak is all its KV in blocks:
    the prompt's plus each leaf's stored tokens (all but its last). Trees that share its system
    prompt, or unrelated big trees in the same call, change nothing."""
    model = tiny_model("llama", seed=9)
    engine = rollout.Engine(model, block_size=4)
    system = list(range(100, 132))  # 8 whole blocks, so sharing it does not move a block edge
    mine = system + [7, 8, 9]
    (alone,) = engine.sample_tree([mine], 1, 3, max_new_tokens=6, eos_token_id=[])
    crowd = [system + [i, 9] for i in range(3)] + [list(range(60))]
    together = engine.sample_tree([mine, *crowd], 1, 3, max_new_tokens=6, eos_token_id=[])
    reused = [t.stats.prefix_tokens_reused for t in together[:4]]
    assert sum(reused) == 3 * len(system)  # one of them paid for the shared system prompt
    block = engine.pool.bytes_per_block
    expected = (-(-len(mine) // 4) + 3 * -(-(6 - 1) // 4)) * block
    assert alone.stats.peak_kv_bytes == together[0].stats.peak_kv_bytes == expected
    assert together[-1].stats.peak_kv_bytes == (60 // 4 + 3 * 2) * block


def test_unique_tokens_count_every_token_and_kv_tokens_all_but_each_leafs_last():
    model = tiny_model("llama", seed=9)
    (tree,) = rollout.sample_tree(
        [list(range(10))], 2, [2, 3], model=model, segment_len=4, max_new_tokens=7, eos_token_id=[]
    )
    held = 10 + 2 * 4 + 6 * 3  # prompt, two 4-token trunks, six 3-token leaves
    assert tree.stats.unique_tokens == tree.unique_tokens() == held
    assert tree.stats.kv_tokens == tree.stats.tokens_forwarded == held - 6


def test_json_round_trip():
    model = tiny_model("llama", seed=10)
    (tree,) = rollout.sample_tree([PROMPTS[0]], 2, 2, model=model, segment_len=2, max_new_tokens=5)
    again = rollout.Tree.from_json(tree.to_json())
    assert again.to_dict() == tree.to_dict()
    assert [t.completion_ids for t in again.trajectories()] == [
        t.completion_ids for t in tree.trajectories()
    ]


def test_calls_keep_their_pool_and_results_do_not_depend_on_it():
    """A fresh pool's first touch is slow on a VM, so a pool big enough is kept across calls (by
    an Engine without a budget, and by the one-line sample_tree per model); trees are the same
    as from a fresh engine."""
    from rollout.api import _POOLS

    model = tiny_model("llama", seed=12)
    kw = dict(segment_len=3, max_new_tokens=6, seed=5)
    big = rollout.sample_tree([list(range(60))], 2, 3, model=model, **kw)
    pool = _POOLS[model]
    small = rollout.sample_tree([[4, 5, 6]], 2, 2, model=model, **kw)
    assert _POOLS[model] is pool and pool.used_blocks == 0
    fresh = rollout.Engine(model).sample_tree([[4, 5, 6]], 2, 2, **kw)
    assert [n.tokens for n in small[0].nodes()] == [n.tokens for n in fresh[0].nodes()]
    assert big[0].stats.kv_tokens > small[0].stats.kv_tokens
    engine = rollout.Engine(model)
    engine.sample_tree([list(range(60))], 2, 3, **kw)
    kept = engine.pool
    engine.sample_tree([[4, 5, 6]], 2, 2, **kw)
    assert engine.pool is kept


def test_bf16_trees_match_bf16_teacher_forcing():
    # bf16 pools run the CPU kernel in bf16 (fp32 accumulation and merge); the oracle is the
    # model's own bf16 forward (sdpa), which rounds its layers the same way but not its
    # attention partials: up to 1.2e-2 seen on h512 Llamas, tolerance 2e-2.
    model = tiny_model("llama", seed=2, hidden_size=128, intermediate_size=256).to(torch.bfloat16)
    engine = rollout.Engine(model, block_size=4)
    trees = engine.sample_tree(
        PROMPTS, 3, [2, 1, 2], segment_len=[5, 3], max_new_tokens=16, eos_token_id=[9], seed=4
    )
    assert_exact(model, trees, atol=2e-2)
