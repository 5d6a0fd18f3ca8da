"""The real-model path on tiny configs: a diffusers SD3 pipeline and a CLIP preference reward, both
written with save_pretrained and read back by the run loop's own from_pretrained loaders."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

from rollout.flow.tiny_pipelines import (
    TINY_SD3_TRANSFORMER,
    HashPromptEncoder,
    build_tiny_sd3_pipeline,
)
from trainers import train as train_mod
from trainers.config import load_config
from trainers.flow.tasks import ClipPreferenceReward

WORDS = ["[PAD]", "[UNK]", "a", "red", "blue", "cube", "sphere", "photo", "of"]


def save_tiny_clip(path) -> None:
    """A 1-layer CLIP, a word-level tokenizer and a 32px image processor in one directory."""
    torch.manual_seed(0)
    text = dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=16, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)  # 2: the pooled token is the argmax id
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=32, patch_size=8)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)) \
        .save_pretrained(path)
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]") \
        .save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}) \
        .save_pretrained(path)


def save_tiny_sd3(path) -> None:
    build_tiny_sd3_pipeline(seed=0).save_pretrained(path)
    index = json.loads((path / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]


@pytest.fixture
def no_text_encoders(monkeypatch):
    """The tiny pipeline has no CLIP/T5 text encoders (they need hub files): load it with them set
    to None and give it the hash stand-in, as rollout/flow/tiny_pipelines.py does."""
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    real = DiffusionPipeline.from_pretrained.__func__
    missing = ["text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
               "tokenizer_3"]

    def from_pretrained(cls, name, **kwargs):
        return real(cls, name, **{m: None for m in missing}, **kwargs)

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", classmethod(from_pretrained))
    encoder = HashPromptEncoder(TINY_SD3_TRANSFORMER["joint_attention_dim"],
                                TINY_SD3_TRANSFORMER["pooled_projection_dim"])
    monkeypatch.setattr(StableDiffusion3Pipeline, "encode_prompt", encoder, raising=False)


def test_clip_preference_reward_scores_matching_prompts(tmp_path):
    save_tiny_clip(tmp_path)
    reward = ClipPreferenceReward.from_pretrained(str(tmp_path))
    images = torch.rand(3, 3, 40, 48)  # resized and centre-cropped to 32 x 32
    scores = reward(list(images), ["a red cube", "a blue sphere", "a photo of a cube"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    grey = reward(torch.rand(2, 1, 8, 8), ["a red cube", "a cube"])
    assert grey.shape == (2,)


def test_sd3_tree_training_runs_from_pretrained(tmp_path, no_text_encoders):
    save_tiny_sd3(tmp_path / "sd3")
    save_tiny_clip(tmp_path / "clip")
    (tmp_path / "prompts.txt").write_text("a red cube\na blue sphere\n")
    cfg = load_config("configs/sd3_medium_pickscore_tree.yaml", [
        f"model.name={tmp_path / 'sd3'}", "model.dtype=float32", "task.reward_processor=",
        f"task.reward_model={tmp_path / 'clip'}", f"task.data_path={tmp_path / 'prompts.txt'}",
        "rollout.width=[2,1,2]", "flow.num_inference_steps=4", "flow.sde_window=[0,3]",
        "flow.image_size=[32,32]", "train.steps=2", "train.prompts_per_step=2",
        "checkpoint.dir=", f"output_dir={tmp_path / 'run'}", "log.progress=false",
        "log.wandb=false"])
    state = train_mod.train(cfg, use_wandb=False)
    assert len(state.history) == 2
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in state.history)
    assert state.history[0]["train_nfe"] == 2 * (2 + 2 + 4)  # one step per level per node
    assert state.history[0]["kl"] < 1e-9  # reference = the weights before any update
    assert state.sampler.policy_version == 2
