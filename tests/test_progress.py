"""Long calls show progress: a bar on stderr when asked (or when stderr is a terminal), none
when not."""

from __future__ import annotations

from flow_cases import digits_pipe

import rollout
from rollout.flow import sample_flow_tree
from rollout.tiny import tiny_model


def test_text_trees_show_a_token_bar_only_when_asked(capsys):
    model = tiny_model("llama", seed=3)
    kw = dict(model=model, max_new_tokens=12, eos_token_id=[])
    rollout.sample_tree([[5] * 8], 1, 2, progress=False, **kw)
    assert capsys.readouterr().err == ""
    rollout.sample_tree([[5] * 8], 1, 2, progress=True, **kw)
    err = capsys.readouterr().err
    assert "sample_tree" in err and "tok" in err


def test_flow_trees_show_a_step_bar_only_when_asked(capsys):
    pipe = digits_pipe()
    kw = dict(num_inference_steps=4, sde_window=(0, 2), noise_levels=[1.0])
    sample_flow_tree(["a handwritten 1"], 1, 2, pipe, progress=False, **kw)
    assert capsys.readouterr().err == ""
    sample_flow_tree(["a handwritten 1"], 1, 2, pipe, progress=True, **kw)
    assert "flow steps" in capsys.readouterr().err
