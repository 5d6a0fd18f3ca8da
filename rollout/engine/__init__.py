"""The text engine: block pool, KV nodes, scheduler, attention adapter, sampler, step loop.

`rollout.Engine` / `rollout.sample_tree` (api.py) are the public front; these modules are the
machinery behind them, importable for callers that drive steps themselves (the service).
"""
