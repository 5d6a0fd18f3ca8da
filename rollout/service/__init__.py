"""The rollout service: one `Engine` behind HTTP (app.py, worker.py) and `rollout.Client`."""
