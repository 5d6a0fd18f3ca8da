"""`start_fleet`: N rollout engines on Ray behind one HTTP front with the single server's routes.

    with start_fleet("tiny:llama", replicas=2) as fleet:
        trees = rollout.Client(fleet.url).sample_tree(prompts, depth=2, width=4)

Design decisions:
- Ray is the process manager: each replica is an actor (replica.py) placed by Ray, on this
  machine (a local Ray instance, started here and stopped by `close()`) or on a cluster
  (`ray_address`, e.g. "auto" after `ray start --head`); one already initialised is used as is.
  Each replica asks Ray for `threads` CPUs and sets torch to that many threads.
- The front runs in this process, on a thread (`BackgroundServer`), like a single server does
  in tests; `python -m rollout.serve --replicas N` runs the same thing until interrupted.
- Starting is all or nothing: the replicas start concurrently, and the first that fails (a bad
  model spec, a dtype the model refuses, a cluster without the CPUs) stops the start with an
  error naming the replica and the cause; everything started so far is shut down.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
from typing import Any

import ray

from ..service.app import check_host
from ..service.cli import BackgroundServer, fail
from ..service.settings import WorkerSettings, parse_bytes
from .front import create_front
from .proxy import Proxy
from .replica import Replica, Serving
from .replicas import ReplicaSet, start_all
from .router import POLICIES, Router

# Ray starts its workers niced (RAY_worker_niceness): right for background tasks, wrong for a
# replica, which is the node's engine; a niced one starves behind any busy process (on a loaded
# 2-core machine two tiny replicas took 158 s to start, and 15 s at normal priority).
REPLICA_ENV = {"RAY_worker_niceness": "0"}


class Fleet:
    """A started fleet: `url` (the front), `actors` (the replicas' current actors), `close()`."""

    def __init__(
        self,
        settings: WorkerSettings,
        replicas: int,
        *,
        ray_address: str | None = None,
        threads: int = 1,
        policy: str = "prefix",
        request_timeout: float = 600.0,
        served_model_name: str | None = None,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        seed: int = 0,
        num_cpus: int | None = None,
        start_timeout: float = 300.0,
        health_interval: float = 1.0,
        ping_timeout: float = 10.0,
    ) -> None:
        server_id = secrets.token_hex(8)  # the fleet's: every replica answers with it
        serving = Serving(
            secrets.token_hex(16), server_id, request_timeout, served_model_name, threads
        )
        # 1. Ray: a cluster, the one this process already joined, or a local instance
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            local = {"num_cpus": num_cpus or replicas * threads, "include_dashboard": False}
            ray.init(**({"address": ray_address} if ray_address else local))

        def spawn(index: int) -> Any:
            options = {
                "num_cpus": threads,
                "scheduling_strategy": "SPREAD",
                "runtime_env": {"env_vars": dict(REPLICA_ENV)},
            }
            return Replica.options(**options).remote(settings, serving, index)

        self.server: BackgroundServer | None = None
        self.replicas: ReplicaSet | None = None
        try:
            # 2. the replicas, all started or none
            members = start_all(spawn, replicas, start_timeout)
            self.replicas = ReplicaSet(
                members,
                spawn,
                Router(replicas, policy, seed=seed),
                start_timeout=start_timeout,
                ping_timeout=ping_timeout,
                route_timeout=request_timeout,
            )
            model = ray.get(members[0].actor.health.remote())["model"]
            # 3. the front
            app = create_front(
                self.replicas,
                Proxy(self.replicas, serving.token, request_timeout),
                model=served_model_name or model,
                server_id=server_id,
                routing=policy,
                token=token,
                health_interval=health_interval,
            )
            server = BackgroundServer(app, host=host, port=port)
            # NOTE: an open stream must not hold close() (and so ray.shutdown()) for ever
            server.server.config.timeout_graceful_shutdown = 5.0
            self.server = server.__enter__()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        assert self.server is not None, "the fleet is closed"
        return self.server.url

    @property
    def actors(self) -> list[Any]:
        """Each replica's current actor handle (a restarted replica has a new one)."""
        assert self.replicas is not None, "the fleet is closed"
        return [m.actor for m in self.replicas.members]

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the front, then every replica; stop Ray if this fleet started it."""
        if self.replicas is not None:
            self.replicas.closing = True
        if self.server is not None:
            self.server.__exit__(None, None, None)
            self.server = None
        if self.replicas is not None:
            self.replicas.kill_all()
            self.replicas = None
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()
        self._owns_ray = False


def start_fleet(
    model_spec: str,
    replicas: int,
    *,
    ray_address: str | None = None,
    threads: int = 1,
    kv_budget: int | str = "256M",
    policy: str = "prefix",
    scheduler: str = "global",
    prefix_cache: bool | None = None,
    dtype: str = "float32",
    block_size: int = 16,
    max_step_tokens: int = 4096,
    max_queue: int = 256,
    gather_window: float = 0.1,
    **front: Any,
) -> Fleet:
    """Start `replicas` engines of `model_spec` (as `--model`) and their front; a context manager.

    policy: routing, one of POLICIES ("prefix": requests sharing a prompt prefix go where it was
        sent before, balanced by load; "round-robin"; "random").
    threads: torch threads (and Ray CPUs) per replica.
    kv_budget, scheduler (the engine's --policy), prefix_cache, dtype, block_size,
        max_step_tokens, max_queue, gather_window: each replica's, as the single server's flags.
    front: `Fleet`'s keywords: request_timeout, served_model_name, token, host, port, seed,
        num_cpus (of a local Ray; default replicas * threads), start_timeout, health_interval,
        ping_timeout (seconds a live replica may take to answer a ping before it counts as lost).
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise ValueError(f"replicas={replicas!r}: expected an int >= 1 (engines)")
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads={threads!r}: expected an int >= 1 (torch threads per replica)")
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r}: expected one of {POLICIES} (routing)")
    check_host(front.get("host", "127.0.0.1"), front.get("token"))
    settings = WorkerSettings(
        model=model_spec,
        kv_budget=parse_bytes(kv_budget) if isinstance(kv_budget, str) else kv_budget,
        dtype=dtype,
        block_size=block_size,
        max_step_tokens=max_step_tokens,
        policy=scheduler,
        prefix_cache=prefix_cache,
        max_queue=max_queue,
        gather_window=gather_window,
    )
    return Fleet(
        settings, replicas, ray_address=ray_address, threads=threads, policy=policy, **front
    )


def serve_fleet(args: argparse.Namespace, settings: WorkerSettings, prog: str) -> None:
    """`python -m rollout.serve --replicas N ...` with its checked `settings`: serve until
    interrupted (Ctrl-C, SIGTERM)."""
    try:
        fleet = Fleet(
            settings,
            args.replicas,
            ray_address=args.ray_address,
            threads=args.threads_per_replica or 1,
            policy=args.routing or "prefix",
            request_timeout=args.request_timeout,
            served_model_name=args.served_model_name or args.model,
            token=args.token,
            host=args.host,
            port=args.port,
        )
    except ValueError as exc:
        fail(prog, exc)
    except RuntimeError as exc:
        fail(prog, exc, status=1)
    print(f"{prog}: a fleet of {args.replicas} at {fleet.url}", file=sys.stderr)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops it as Ctrl-C does
    try:
        assert fleet.server is not None
        while fleet.server.thread.is_alive():
            fleet.server.thread.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        fleet.close()
