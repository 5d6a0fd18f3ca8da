"""`python -m rollout.serve`: start the rollout service (see rollout/service/app.py)."""

from __future__ import annotations

from .service.cli import main

if __name__ == "__main__":
    main()
