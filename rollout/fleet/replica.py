"""One engine of a fleet: a Ray actor that serves the single server's app on a port of its node.

    env = {"env_vars": REPLICA_ENV}  # fleet.py: not niced, as Ray starts workers
    actor = Replica.options(num_cpus=threads, runtime_env=env).remote(settings, serving, index=0)
    url = ray.get(actor.start.remote())     # model loaded, worker started, HTTP up

Design decisions:
- The replica is the single server, in its own process: the same `WorkerSettings` build the same
  engine (prefix cache, KV budget, dtype, block size) and `create_app` serves the same routes,
  so everything the front proxies behaves as it does on one server. The front only forwards.
- `__init__` stores its arguments and `start()` does the work, so a bad model spec comes back
  from `start()` as the original exception (a `ValueError` naming the flag), not as an actor
  that died in its constructor.
- Restarts are the front's (front.py starts a new actor; `max_restarts=0` here): Ray's own
  restart would bring the actor back on its startup weights at version 0 on a new port, and
  `ray.kill` does not restart anyway. The front hands a new replica the fleet's weights before
  it routes anything to it.
- Replicas listen on their node's address, so a front on another node can reach them, and
  always with a bearer token (the fleet's own, random per start; the front adds it), so the
  policy is never open to the network. Every replica answers with the fleet's `server_id`: the
  fleet, not one of its engines, is what a client pushed weights to.
- Threaded (`max_concurrency`): `ping`, `health` and `stats` answer while `update_weights` waits
  for the requests queued before it to finish.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NamedTuple

import ray
import torch

from ..service.app import create_app
from ..service.cli import BackgroundServer
from ..service.settings import WorkerSettings
from ..service.worker import ServiceWorker
from .weights import Shipment, unpack


@dataclass(frozen=True)
class Serving:
    """How every replica of one fleet serves (the same for all of them)."""

    token: str  # the fleet's internal bearer token
    server_id: str  # the fleet's id, answered by every replica
    request_timeout: float = 600.0
    served_model_name: str | None = None
    threads: int = 1


class Loaded(NamedTuple):
    """A weight update as one replica saw it: its version and where the time went."""

    policy_version: int
    tensors: int
    get_s: float  # reading the shipment from the object store
    load_s: float  # waiting for the queued requests, loading, flushing the prefix cache


@ray.remote(max_restarts=0, max_concurrency=4)
class Replica:
    def __init__(self, settings: WorkerSettings, serving: Serving, index: int) -> None:
        self.settings, self.serving, self.index = settings, serving, index
        self.worker: ServiceWorker | None = None
        self.server: BackgroundServer | None = None

    def start(self) -> str:
        """Load the model, start the engine thread and the HTTP server; the server's URL."""
        torch.set_num_threads(self.serving.threads)
        worker = self.settings.build_worker()
        worker.server_id = self.serving.server_id
        app = create_app(
            worker.start(),
            token=self.serving.token,
            request_timeout=self.serving.request_timeout,
            served_model_name=self.serving.served_model_name or self.settings.model,
        )
        server = BackgroundServer(app, host=ray.util.get_node_ip_address())
        try:
            server.__enter__()
        except Exception:
            worker.close()
            raise
        self.worker, self.server = worker, server
        return server.url

    def url(self) -> str:
        return self._started().url

    def ping(self) -> int:
        """The replica's index, once it serves."""
        self._started()
        return self.index

    def health(self) -> dict[str, Any]:
        worker = self._worker()
        model = worker.engine.model
        return {
            "status": "ok" if worker.failing is None else "failing",
            "model": getattr(model.config, "_name_or_path", "") or type(model).__name__,
            "policy_version": worker.engine.policy_version,
            "error": worker.failing,
        }

    def stats(self) -> dict[str, Any]:
        return self._worker().snapshot()

    def update_weights(self, state: Shipment | dict[str, torch.Tensor], version: int) -> Loaded:
        """Load a state dict (or a shipment of one) and take the fleet's policy `version`, once
        the requests queued before it finish on the old weights (`ServiceWorker`)."""
        began = time.perf_counter()
        if isinstance(state, Shipment):
            state_dict = state.get()
        elif state and all(isinstance(v, tuple) for v in state.values()):
            state_dict = unpack(state)  # a `ray.put(pack(...))` Ray resolved for us
        else:
            state_dict = state
        got = time.perf_counter()
        loaded = self._worker().update_weights(state_dict, version=version).result()
        return Loaded(loaded, len(state_dict), got - began, time.perf_counter() - got)

    def stop(self) -> None:
        if self.server is not None:
            self.server.__exit__(None, None, None)
        if self.worker is not None:
            self.worker.close()

    def _worker(self) -> ServiceWorker:
        self._started()
        assert self.worker is not None
        return self.worker

    def _started(self) -> BackgroundServer:
        if self.server is None:
            raise RuntimeError(f"replica {self.index} has not started (call start() first)")
        return self.server
