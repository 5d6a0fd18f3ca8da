"""Training on sampled trees: one run loop (`python -m trainers.train`) for every kind of policy.

Shared here: the run loop, config, checkpoints, logging, run records, preflight checks, the
contract a run kind hands the loop (policy.py) and the pieces every trainer's update uses. Each
kind lives in its own wing: text/ (causal LMs on token trees), flow/ (flow-matching models on SDE
trees), agent/ (multi-turn agent runs).
"""
