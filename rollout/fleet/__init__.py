"""A fleet of rollout engines on Ray behind one HTTP front (`python -m rollout.serve --replicas N`).

    fleet.py     start_fleet / Fleet: Ray, the replicas, the front
    replica.py   Replica: one engine (the single server's app) as a Ray actor
    front.py     the front's routes; proxy.py forwards a request to one replica, with failover
    replicas.py  the front's view of its replicas: load, restarts, fleet-wide weight updates
    router.py    which replica a request goes to (prefix affinity, round-robin, random)
    weights.py   how weights travel: once into Ray's object store, read in place

`start_fleet` and `Fleet` are imported on first use, so `rollout.fleet.router` needs no Ray.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Fleet", "start_fleet"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import fleet

        return getattr(fleet, name)
    raise AttributeError(f"module 'rollout.fleet' has no attribute {name!r}")
