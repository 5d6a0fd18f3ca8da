"""Tiny causal LMs built from configs (random weights, seeded) and a tiny tokenizer, for demos,
tests, benchmarks and the README's examples.

Nothing is downloaded: users with weights load their own model and tokenizer with
`from_pretrained`. `tiny_tokenizer()` is a character-level tokenizer (printable ASCII, newline and
tab, one token each; anything else is `<|unk|>`) with a ChatML-style chat template, so string
prompts and chat messages work on the tiny models exactly as they do on a real model. Its special
ids follow Llama's defaults (bos 1, eos 2); the ids past its 103 real tokens, up to the model's
vocabulary, decode as `<|reserved_i|>` (as real tokenizers pad theirs), so whatever a random
model samples decodes to something visible.
"""

from __future__ import annotations

from functools import cache

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# One small config per family; the benchmark's model is `tiny_model("llama", **BENCH_LLAMA)`.
_FAMILIES = {
    "llama": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen2": dict(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2
    ),
    "qwen3": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
    ),
    "mistral": dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=None,
    ),
}
FAMILIES = tuple(_FAMILIES)

BENCH_LLAMA = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    vocab_size=4096,
    max_position_embeddings=2048,
)


def tiny_config(family: str = "llama", **overrides: object) -> PretrainedConfig:
    if family not in _FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
    fields = dict(
        vocab_size=256,
        num_hidden_layers=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        **_FAMILIES[family],
    )
    fields.update(overrides)
    return CONFIG_MAPPING[family](**fields)


def tiny_model(
    family: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: object
) -> PreTrainedModel:
    """A randomly initialized causal LM of `family`, in eval mode, reproducible from `seed`."""
    config = tiny_config(family, **overrides)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


SPECIAL_TOKENS = ("<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>", "<|im_start|>", "<|im_end|>")
CHARS = ("\n", "\t", *(chr(c) for c in range(32, 127)))

# ChatML as Qwen writes it: one block per message; with `tools`, a system block lists them as JSON
# (the form tool-calling harnesses pass through `apply_chat_template(..., tools=...)`).
CHAT_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:\n{% for tool in tools %}{{ tool | tojson }}\n"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@cache
def _tokenizer_object(vocab_size: int) -> Tokenizer:
    real = SPECIAL_TOKENS + CHARS
    reserved = tuple(f"<|reserved_{i}|>" for i in range(vocab_size - len(real)))
    vocab = {t: i for i, t in enumerate(real + reserved)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one char a token
    tk.decoder = decoders.Fuse()  # join without spaces
    return tk


def tiny_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A character-level tokenizer for a tiny model of `vocab_size` ids (see the module doc)."""
    if vocab_size < len(SPECIAL_TOKENS) + len(CHARS):
        raise ValueError(
            f"vocab_size={vocab_size}: the tiny tokenizer needs at least "
            f"{len(SPECIAL_TOKENS) + len(CHARS)} ids"
        )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer_object(vocab_size),
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
