"""The tiny tokenizer: offline text and chat prompts for the tiny models."""

from __future__ import annotations

import pytest

import rollout
from rollout.tiny import tiny_model, tiny_tokenizer


def test_text_round_trips_one_token_per_character():
    tok = tiny_tokenizer()
    text = "Q: 17 + 25 = ?\nA:\t42 {ok}"
    ids = tok(text)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert len(tok) == 256 and tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok.decode(tok("é")["input_ids"]) == "<|unk|>"


def test_every_model_id_decodes_to_something():
    tok = tiny_tokenizer(300)
    assert len(tok) == 300
    assert all(tok.decode([i]) for i in range(3, 300))  # specials from 3 on are visible too
    with pytest.raises(ValueError, match="vocab_size=50"):
        tiny_tokenizer(50)


def test_chat_template_renders_chatml_with_tools():
    tok = tiny_tokenizer()
    messages = [{"role": "user", "content": "2+2?"}]
    tools = [{"type": "function", "function": {"name": "add"}}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False,
                                   add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nTools:\n") and '"name": "add"' in text
    assert text.endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3


def test_string_prompts_sample_on_a_tiny_model():
    tok = tiny_tokenizer()
    (tree,) = rollout.sample_tree(["hello"], 1, 2, model=tiny_model("qwen2"), tokenizer=tok,
                                  max_new_tokens=4)
    assert tree.prompt_ids == tok("hello")["input_ids"]
    assert all(leaf.finish_reason in ("eos", "length") for leaf in tree.leaves())
