"""Run configuration: frozen dataclasses per section, loaded from YAML with dotted overrides.

`load_config("configs/toy_tree_grpo.yaml", ["rollout.width=[4,2]", "train.steps=5"])` reads the
preset, applies each override (values parsed as YAML, so lists and numbers work), and checks
everything before any work starts: an unknown section or key, a value of the wrong type or a
missing model is a `ValueError` that names the key, the value and what is allowed. Section
dataclasses validate their own ranges in `__post_init__`. `kind` selects what the run trains:
"text" (a causal LM; `rollout:` holds the token tree shape), "agent" (the same, with multi-turn
episodes against the task's environment; `agent:` of trainers/agent/config.py holds the turns) or
"flow" (a flow-matching pipeline; `rollout:` holds depth and width, the `flow:` section of
trainers/flow/config.py the rest).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trees.advantages import ESTIMATORS
from trees.spec import TreeSpec

from .agent.config import AgentConfig
from .flow.config import FlowConfig
from .policy_losses import POLICY_LOSSES
from .text.losses import AGGREGATIONS

# what a run trains: a causal LM on token trees, the same on agent episodes, or a flow model
KINDS = ("text", "agent", "flow")


def _need(cond: bool, key: str, value: Any, fix: str) -> None:
    if not cond:
        raise ValueError(f"{key}={value!r}: {fix}")


@dataclass(frozen=True)
class ModelConfig:
    name: str = ""  # "toy" (built and pretrained here) or a transformers model id / local path
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    pretrain_steps: int = 300  # toy model only
    prompt_strength: float = 1.0  # digits model only: < 1 weakens its prompt conditioning

    def __post_init__(self) -> None:
        _need(
            self.dtype in ("float32", "bfloat16"),
            "model.dtype",
            self.dtype,
            "use float32 or bfloat16 (fp16 is unusably slow on CPUs)",
        )
        _need(
            self.attn_implementation in ("eager", "sdpa"),
            "model.attn_implementation",
            self.attn_implementation,
            "use eager or sdpa (the tree mask is a 4D float tensor)",
        )
        _need(self.pretrain_steps >= 0, "model.pretrain_steps", self.pretrain_steps, "use >= 0")
        _need(
            0 <= self.prompt_strength <= 1,
            "model.prompt_strength",
            self.prompt_strength,
            "use a value in [0, 1] (1 = the shipped digits model)",
        )


@dataclass(frozen=True)
class TaskConfig:
    # a key of trainers.text.tasks.TASKS (text), AGENT_TASKS (agent) or FLOW_TASKS (flow)
    name: str = "toy_sort"
    data_path: str = ""  # JSONL with "question"/"answer" for gsm8k
    num_digits: int = 6  # toy_sort prompt length
    reward: str = "positions"  # toy_sort: "positions" (fraction right) or "exact" (binary)
    system_prompt: str = ""
    reward_model: str = ""  # clip_preference: a CLIP-style scorer id or path (PickScore)
    reward_processor: str = ""  # its tokenizer / image processor (default: reward_model)


@dataclass(frozen=True)
class RolloutConfig:
    depth: int = 1
    width: int | list[int] = 8
    segment_len: int | list[int] = 32
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kv_budget: int | None = None
    branch_entropy: float | None = None  # nats: fork where the policy is uncertain (trees/spec.py)
    min_segment_len: int | list[int] | None = None
    # a rollout service or fleet (`python -m rollout.serve`) to sample from instead of an
    # in-process engine: every process of a run points at it; the weights go there each update
    server: str | None = None

    def __post_init__(self) -> None:
        _need(
            self.server is None or self.server.startswith(("http://", "https://")),
            "rollout.server",
            self.server,
            "use the service's URL, e.g. http://127.0.0.1:8000",
        )
        _need(self.depth >= 1, "rollout.depth", self.depth, "use >= 1 (1 = flat GRPO group)")
        _need(
            self.temperature > 0,
            "rollout.temperature",
            self.temperature,
            "use > 0: training needs sampling log-probs",
        )
        _need(self.max_new_tokens >= 1, "rollout.max_new_tokens", self.max_new_tokens, "use >= 1")

    @property
    def entropy_branching(self) -> bool:
        return self.branch_entropy is not None or self.min_segment_len is not None


@dataclass(frozen=True)
class LossConfig:
    estimator: str = "grpo"
    policy_loss: str = "clipped"
    aggregation: str = "sequence"
    clip_low: float = 0.2
    clip_high: float = 0.2
    kl_beta: float = 0.0
    adv_eps: float = 1e-6

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("loss.estimator", self.estimator, ESTIMATORS),
            ("loss.policy_loss", self.policy_loss, POLICY_LOSSES),
            ("loss.aggregation", self.aggregation, AGGREGATIONS),
        ):
            _need(value in allowed, key, value, f"choose one of {sorted(allowed)}")
        _need(self.kl_beta >= 0, "loss.kl_beta", self.kl_beta, "use >= 0 (0 = no reference)")
        _need(
            self.clip_low >= 0 and self.clip_high >= 0,
            "loss.clip_low/clip_high",
            (self.clip_low, self.clip_high),
            "use >= 0",
        )


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _need(self.lr > 0, "optim.lr", self.lr, "use > 0")
        _need(self.warmup_steps >= 0, "optim.warmup_steps", self.warmup_steps, "use >= 0")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 8  # over all processes; each samples whole trees for its share
    updates_per_batch: int = 1  # optimizer steps on each batch of trees (mu in GRPO)
    micro_batch_trees: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for key, value in (
            ("train.steps", self.steps),
            ("train.prompts_per_step", self.prompts_per_step),
            ("train.updates_per_batch", self.updates_per_batch),
            ("train.micro_batch_trees", self.micro_batch_trees),
        ):
            _need(value >= 1, key, value, "use an int >= 1")


@dataclass(frozen=True)
class LogConfig:
    wandb: bool = True
    project: str = "tree-rollouts"
    run_name: str = ""
    tree_every: int = 10  # steps between tree diagrams (0 = never)
    progress: bool = True


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None  # None: <output_dir>/checkpoints; "": no checkpoints
    every: int = 10
    resume: bool = True  # continue from the latest checkpoint of the same config (preflight.py)

    def __post_init__(self) -> None:
        _need(self.every >= 1, "checkpoint.every", self.every, "use an int >= 1 (steps)")


@dataclass(frozen=True)
class RunConfig:
    kind: str = "text"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    output_dir: str = "results/run"

    def __post_init__(self) -> None:
        _need(self.kind in KINDS, "kind", self.kind, f"choose one of {list(KINDS)}")
        _need(
            bool(self.model.name),
            "model.name",
            self.model.name,
            "missing model: set model.name to 'toy', a transformers model id or a local path",
        )
        looks_local = self.model.name.startswith((".", "/", "~"))
        _need(
            not looks_local or Path(self.model.name).expanduser().exists(),
            "model.name",
            self.model.name,
            "no such local model directory",
        )
        r = self.rollout
        _need(
            self.kind != "agent" or self.agent.max_turns >= r.depth,
            "agent.max_turns",
            self.agent.max_turns,
            f"use >= rollout.depth={r.depth}: every level of an agent tree is at least one turn",
        )
        if r.entropy_branching:  # text only: check the whole tree shape before any work
            _need(
                self.kind in ("text", "agent"),
                "rollout.branch_entropy",
                r.branch_entropy,
                "entropy-guided branching is for text trees; flow trees branch on the SDE window",
            )
            try:
                TreeSpec.make(r.depth, r.width, r.segment_len, r.max_new_tokens,
                              r.branch_entropy, r.min_segment_len)
            except (TypeError, ValueError) as err:
                raise ValueError(f"rollout: {err}") from None

    @property
    def checkpoint_dir(self) -> str:
        """Where checkpoints go: `checkpoint.dir`, else `<output_dir>/checkpoints` ("" = none)."""
        d = self.checkpoint.dir
        return str(Path(self.output_dir) / "checkpoints") if d is None else d

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """`value` converted to `hint` (int -> float allowed), else a ValueError naming the key."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for option in options:
        origin = typing.get_origin(option)
        if option is type(None) and value is None:
            return None
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(option)
            if item is float and all(_is_number(v) for v in value):
                return [float(v) for v in value]
            if all(isinstance(v, item) and not isinstance(v, bool) for v in value):
                return list(value)
        if option is float and _is_number(value):
            return float(value)
        if option in (int, str, bool) and type(value) is option:
            return value
    names = " | ".join(getattr(o, "__name__", str(o)) for o in options)
    raise ValueError(f"{key}={value!r}: expected {names}, got {type(value).__name__}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(hints))
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ValueError(
            f"unknown config key {prefix + unknown[0]!r} in {where}; allowed: {sorted(hints)}"
        )
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{key}: expected a mapping of keys, got {value!r}")
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(f"{prefix}{key}", value, hint)
    return cls(**kwargs)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b=value` in nested `data`; the value is parsed as YAML."""
    if "=" not in override:
        raise ValueError(f"override {override!r}: expected key=value, e.g. train.steps=10")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {override!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML preset (or start empty), apply dotted overrides, validate everything."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ValueError(f"--config {str(path)!r}: no such file; presets live in configs/")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"--config {str(path)!r}: expected a mapping at the top level")
    for override in overrides:
        apply_override(data, override)
    return _build(RunConfig, data, "")
