"""The flow kind: Flow-GRPO and Dynamic-TreeRPO on a flow-matching pipeline's SDE trees.

The `flow:` config section, pipelines (digits, diffusers SD3 / Flux), image tasks and rewards, the
tree sampler, per-SDE-step losses with LayerTuning-RL, and `FlowTrainer`; run.py builds them for
the run loop.
"""
