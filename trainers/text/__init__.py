"""The text kind: GRPO and tree-GRPO on a causal LM's token trees.

Tasks and the toy sort policy, model loading, the samplers (in-process engine or a rollout
service), tree packing and the packed forward, the per-token losses and `TreeTrainer`; run.py
builds them for the run loop.
"""
