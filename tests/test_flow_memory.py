"""What a flow tree keeps alive and writes to disk: its own rows, never the batch it was sampled in.

An 8-prompt call on the digits model steps all trees as one batch; every tensor a tree's nodes
hold must own just its elements, so one tree holds (and saves to) about an eighth of the call.
The expected sizes come from the tensors themselves: their elements, and `torch.save` of copies.
"""

from __future__ import annotations

import os

import pytest
import torch
from flow_cases import digits_pipe
from torch import Tensor

from rollout.flow import PromptEmbeds, load_flow_trees, sample_flow_tree, save_flow_trees
from rollout.flow.digits import digit_prompts
from rollout.flow.serialize import flow_tree_to_dict
from trees import Tree

PROMPTS = digit_prompts(range(8))


@pytest.fixture(scope="module")
def trees() -> list[Tree]:
    return sample_flow_tree(PROMPTS, 2, 3, digits_pipe(), num_inference_steps=6,
                            sde_window=(0, 4), guidance_scale=2.0, seed=0)


def _step_tensors(tree: Tree) -> list[Tensor]:
    return [t for node in tree.nodes() for s in node.steps for t in (s.latents, s.next_latents)]


def _tensors(tree: Tree) -> list[Tensor]:
    """Every tensor the tree's nodes hold: meta (the root's embeddings too) and the steps'."""
    out = _step_tensors(tree)
    for node in tree.nodes():
        for value in node.meta.values():
            if isinstance(value, Tensor):
                out.append(value)
            elif isinstance(value, PromptEmbeds):
                out.extend(value.tensors.values())
        for s in node.steps:
            out += list(s.cond.tensors.values())
            out += list(s.uncond.tensors.values()) if s.uncond is not None else []
    return out


def _distinct(tensors: list[Tensor]) -> list[Tensor]:
    """One tensor per storage kept alive."""
    return list({t.untyped_storage().data_ptr(): t for t in tensors}.values())


def _held_bytes(trees: list[Tree]) -> int:
    tensors = [t for tree in trees for t in _tensors(tree)]
    return sum(t.untyped_storage().nbytes() for t in _distinct(tensors))


def _own_bytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def test_every_tensor_owns_just_its_rows(trees):
    for tree in trees:
        for t in _tensors(tree):
            assert t.untyped_storage().nbytes() == _own_bytes(t), tuple(t.shape)


def test_one_tree_holds_an_eighth_of_the_call(trees):
    held = [_held_bytes([tree]) for tree in trees]
    assert held[0] == sum(_own_bytes(t) for t in _distinct(_tensors(trees[0])))
    assert held[0] * len(PROMPTS) == sum(held) == _held_bytes(trees)  # nothing shared across trees
    # Each recorded step adds its x' and at most a copy of its x (x is the x' before it).
    num_steps = sum(len(node.steps) for node in trees[0].nodes())
    latent = _own_bytes(trees[0].leaves()[0].steps[0].latents)
    step_bytes = sum(_own_bytes(t) for t in _distinct(_step_tensors(trees[0])))
    assert num_steps * latent < step_bytes <= 2 * num_steps * latent


def test_a_saved_tree_is_an_eighth_of_the_call(trees, tmp_path):
    save_flow_trees(trees[:1], tmp_path / "one.pt")
    save_flow_trees(trees, tmp_path / "all.pt")
    one, everything = os.path.getsize(tmp_path / "one.pt"), os.path.getsize(tmp_path / "all.pt")
    assert one * len(PROMPTS) == pytest.approx(everything, rel=0.1)
    # The file is the tree's own rows (saved as fresh copies) plus its tensor-free structure.
    torch.save([t.clone() for t in _distinct(_tensors(trees[0]))], tmp_path / "rows.pt")
    torch.save(_without_tensors(flow_tree_to_dict(trees[0])), tmp_path / "structure.pt")
    rows = os.path.getsize(tmp_path / "rows.pt")
    assert _held_bytes(trees[:1]) < rows <= one <= rows + os.path.getsize(tmp_path / "structure.pt")


def _without_tensors(value):
    if isinstance(value, Tensor):
        return None
    if isinstance(value, dict):
        return {k: _without_tensors(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_tensors(v) for v in value]
    return value


def test_saving_copies_a_view_put_in_meta(tmp_path):
    tree = sample_flow_tree(PROMPTS[:1], 1, 2, digits_pipe(), num_inference_steps=3, seed=1)[0]
    save_flow_trees([tree], tmp_path / "plain.pt")
    batch = torch.randn(1000, 64)
    tree.leaves()[0].meta["feature"] = batch[3]  # a row of someone else's batch
    save_flow_trees([tree], tmp_path / "view.pt")
    grown = os.path.getsize(tmp_path / "view.pt") - os.path.getsize(tmp_path / "plain.pt")
    assert grown < batch[3].numel() * batch.element_size() + 1024  # the row, not the batch
    loaded = load_flow_trees(tmp_path / "view.pt")[0]
    torch.testing.assert_close(loaded.leaves()[0].meta["feature"], batch[3])
