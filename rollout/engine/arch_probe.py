"""Every causal-LM family transformers knows, built tiny and held against its own forward pass.

"Any causal LM" is a claim about ~200 families, so it is checked over all of them: each family in
`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` is built from its config class with small sizes (random
weights, fp32, eager attention for the oracle), a small tree is sampled, and every trajectory's
log-probs are compared with the model's own teacher-forced forward, on the path that `Engine`'s
path="auto" picks (the cascade engine, or the native path for what it refuses). The outcome is
  exact         every log-prob within ATOL of the model's forward (`path` says which path)
  refused       the engine said, by name, which feature it does not implement
  WRONG         a log-prob off by more than ATOL: the one outcome that must never happen
  error         any other exception: a robustness gap, to fix or refuse by name
  not buildable the family cannot be built tiny here (remote code, multimodal-only, build error)
`scripts/arch_coverage.py` prints the table; `tests/test_arch_coverage.py` asserts exact or
refused for every buildable family.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from .features import UnsupportedModelError

FAMILIES: tuple[str, ...] = tuple(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
ATOL = 1e-4
MAX_PARAMS = 10_000_000
OUTCOMES = ("exact", "refused", "WRONG", "error", "not buildable")

# Small sizes under their canonical names (each config's attribute_map finds its own aliases:
# GPT-2's n_embd, ...); a field is set only where the family's config has it.
_TINY: dict[str, Any] = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    # mixtures of experts
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    n_shared_experts=1,
    n_group=1,  # DeepSeek-style grouped routing: one group of the 4 experts
    topk_group=1,
    # GPT-2 / OPT / BERT style names the attribute_map does not cover
    n_inner=128,
    ffn_dim=128,
    d_ff=128,
    word_embed_proj_dim=64,
    embedding_size=64,
    decoder_attention_heads=4,  # BART-style decoders used as causal LMs
    decoder_layers=2,
    decoder_ffn_dim=128,
    rotary_dim=8,  # partial rotary (GPT-J, CodeGen): at most head_dim
    # multi-head latent attention (DeepSeek V2/V3): a small latent; the RoPE key as wide as
    # head_dim, which these configs' rotary embeddings are sized by
    kv_lora_rank=32,
    q_lora_rank=24,
    qk_rope_head_dim=16,
    qk_nope_head_dim=16,
    v_head_dim=24,
    # windows shorter than the probe's paths (up to 12 tokens), so sliding layers are held
    # against their own masks past the window
    sliding_window=4,
    pad_token_id=0,
    # dropout off (eval mode already disables it; some configs draw at init)
    attention_dropout=0.0,
    hidden_dropout=0.0,
)
_PROMPTS = [[1, 5, 7, 9, 11, 13, 2, 8], [3, 4, 5]]


@dataclass(frozen=True)
class ProbeResult:
    family: str
    outcome: str  # one of OUTCOMES
    detail: str = ""  # the refusal or error message, the largest |d logp|, or why not buildable
    path: str = ""  # where the tree was sampled: "cascade" or "native"; "" if it was not


def tiny_family_config(model_type: str) -> PretrainedConfig:
    """The family's config with the small sizes of `_TINY` (only fields the config has)."""
    default = AutoConfig.for_model(model_type)
    fields = {k: v for k, v in _TINY.items() if hasattr(default, k)}
    if getattr(default, "head_dim", None) is None or isinstance(
        getattr(type(default), "head_dim", None), property
    ):
        fields.pop("head_dim", None)  # derived from hidden_size / heads by the model
    if "kv_lora_rank" in fields:  # MLA expands keys/values per query head: no KV grouping
        fields["num_key_value_heads"] = fields["num_attention_heads"]
    config = AutoConfig.for_model(model_type, **fields)
    return _with_attention_layer(model_type, config, fields)


def _has_attention(kinds: Any) -> bool:
    """Whether a `layer_types` list holds an attention layer (not linear attention)."""
    return any(
        ("attention" in k and not k.startswith("linear")) or k.startswith("hybrid")
        for k in kinds or ()
    )


def _with_attention_layer(
    model_type: str, config: PretrainedConfig, fields: dict[str, Any]
) -> PretrainedConfig:
    """A hybrid whose first layers are all recurrent gets an attention layer, as every released
    hybrid has (transformers' cache cannot count the tokens of a cache of recurrent layers only,
    so neither the model's own generate nor the native path could run the tiny one): the last
    of its two layers made attention, else more layers until its own pattern reaches one."""
    kinds = getattr(config, "layer_types", None)
    if not kinds or _has_attention(kinds):
        return config
    tries = [
        {"layer_types": [kinds[0], "full_attention"]},
        {"layer_types": [kinds[0], "attention"]},
        {"attn_layer_indices": [1]},
        *({"num_hidden_layers": n} for n in (3, 4, 5)),
    ]
    for extra in tries:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tried = AutoConfig.for_model(model_type, **{**fields, **extra})
        except Exception:  # noqa: BLE001, S112 - a knob this family does not take
            continue
        if _has_attention(getattr(tried, "layer_types", None)):
            return tried
    return config


def build_tiny(model_type: str, seed: int = 0) -> PreTrainedModel | str:
    """A tiny fp32 model in eval mode with eager attention, or why it cannot be built."""
    try:
        config = tiny_family_config(model_type)
    except Exception as e:  # noqa: BLE001 - any failure is a reason to report
        return f"config: {type(e).__name__}: {_first_line(e)}"
    if config.sub_configs:
        subs = ", ".join(config.sub_configs)
        return f"composite config ({subs}): multimodal or multi-model, not shrunk by the probe"
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            size = AutoModelForCausalLM.from_config(config).num_parameters()
    except Exception as e:  # noqa: BLE001
        return f"build: {type(e).__name__}: {_first_line(e)}"
    if size > MAX_PARAMS:
        return f"{size / 1e6:.0f}M parameters with the tiny sizes: its config has other size fields"
    try:
        with torch.random.fork_rng(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32, attn_implementation="eager"
            )
    except Exception as e:  # noqa: BLE001
        return f"build: {type(e).__name__}: {_first_line(e)}"
    return model.eval()


def teacher_forced_logprobs(
    model: PreTrainedModel, prompt_ids: list[int], completion_ids: list[int]
) -> torch.Tensor:
    """log_softmax of the completion's tokens under the model's own forward (no cache)."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)[len(prompt_ids) - 1 : -1]
    return logp.gather(-1, torch.tensor(completion_ids)[:, None])[:, 0]


def probe_family(model_type: str) -> ProbeResult:
    """Sample a small tree (depth 2, width 2) and compare every log-prob with the oracle."""
    import rollout  # noqa: PLC0415 - rollout imports this package

    model = build_tiny(model_type)
    if isinstance(model, str):
        return ProbeResult(model_type, "not buildable", model)
    vocab = model.get_output_embeddings()
    if vocab is None:
        return ProbeResult(model_type, "refused", "no output embeddings")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = rollout.Engine(model)
            trees = engine.sample_tree(
                _PROMPTS,
                2,
                2,
                segment_len=2,
                max_new_tokens=4,
                eos_token_id=[],
                seed=1,
                progress=False,
            )
            worst = 0.0
            for tree in trees:
                for traj in tree.trajectories():
                    want = teacher_forced_logprobs(model, traj.prompt_ids, traj.completion_ids)
                    got = torch.tensor(traj.logprobs)
                    worst = max(worst, (got - want).abs().max().item())
    except UnsupportedModelError as e:
        return ProbeResult(model_type, "refused", str(e))
    except Exception as e:  # noqa: BLE001
        return ProbeResult(model_type, "error", f"{type(e).__name__}: {_first_line(e)}")
    if not worst <= ATOL:  # NaN counts as wrong
        return ProbeResult(model_type, "WRONG", f"max |d logp| = {worst:.2e}", engine.path)
    return ProbeResult(model_type, "exact", f"max |d logp| = {worst:.1e}", engine.path)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else ""
