"""Command line and embedding helpers of the rollout service (`python -m rollout.serve`).

`load_model` reads `--model`: a local Hugging Face model folder (`from_pretrained`, with its
tokenizer when the folder has one) or `tiny:<family>` for a seeded random tiny model from
`rollout.tiny` with its character-level `tiny_tokenizer()`, so string prompts work
(`tiny:bench` is the benchmarks' larger Llama). `BackgroundServer` runs uvicorn on a thread, for
tests, benchmarks and notebooks and for the CLI, whose main thread runs the engine loop. With
`--replicas N` (N >= 2) or `--ray-address` the command serves a fleet instead (rollout/fleet/): N
engines on Ray behind one HTTP front with the same routes; the other flags mean what they mean
for one engine.

A mistake on the command line (a model that is not there, a bad --kv-budget, a public host
without --token, a port in use, a fleet flag without a fleet) is one line on stderr and exit
status 2, as argparse's own errors are: it is checked before the model loads, so it comes at
once, not after a traceback.
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import socket
import sys
import threading
import time

import uvicorn
from fastapi import FastAPI

from ..fleet.router import POLICIES as ROUTING
from .app import check_host, create_app
from .settings import WorkerSettings, load_model, parse_bytes
from .worker import ServiceWorker

# re-exported: the service's embedding helpers, as they were before settings.py held them
__all__ = ["BackgroundServer", "build_parser", "build_worker", "free_port", "load_model"]
__all__ += ["main", "parse_bytes"]


def check_port(host: str, port: int) -> None:
    """Refuse a port outside 1..65535 or one another process listens on, before loading."""
    if not 0 < port < 65536:
        raise ValueError(f"--port {port}: expected a port in 1..65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(
                f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); stop the "
                "server using it or pick another --port"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class BackgroundServer:
    """uvicorn serving `app` on a thread: `with BackgroundServer(app) as srv: srv.url`."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None,
                 log_level: str = "warning") -> None:
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level=log_level)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="rollout-http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the service did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m rollout.serve", description=__doc__)
    ap.add_argument("--model", required=True, help="a local HF model folder, or tiny:<family>")
    ap.add_argument(
        "--served-model-name",
        default=None,
        help="the `model` the OpenAI routes answer to and /v1/models lists (default: --model)",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--kv-budget", default="256M", help="KV memory in bytes (256M, 8G, ...)")
    ap.add_argument("--max-queue", type=int, default=256, help="unfinished trees before 503")
    ap.add_argument("--request-timeout", type=float, default=600.0, help="seconds, and the cap")
    ap.add_argument(
        "--gather-window",
        type=float,
        default=0.1,
        help="idle engine's wait (s) after a request, so requests sent together share prefixes",
    )
    ap.add_argument(
        "--token",
        default=os.environ.get("ROLLOUT_TOKEN"),
        help="bearer token callers must send (default: $ROLLOUT_TOKEN)",
    )
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-step-tokens", type=int, default=4096)
    ap.add_argument("--policy", default="global", choices=["global", "fcfs-lru"])
    ap.add_argument(
        "--prefix-cache",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep finished requests' KV (radix cache) so the next turn of a conversation "
        "computes only its new tokens; default on with --policy global",
    )
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    fleet = ap.add_argument_group("fleet", "several engines behind one front (rollout/fleet/)")
    fleet.add_argument(
        "--replicas", type=int, default=1, help="engines (Ray actors) behind one HTTP front"
    )
    fleet.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster ('auto' after `ray start --head`); default: a local Ray",
    )
    fleet.add_argument(
        "--routing", default=None, choices=ROUTING, help="how the front picks (default prefix)"
    )
    fleet.add_argument(
        "--threads-per-replica", type=int, default=None, help="torch threads (CPUs) per engine"
    )
    return ap


def is_fleet(args: argparse.Namespace) -> bool:
    """Whether the arguments ask for a fleet; the fleet flags without one are refused."""
    if args.replicas < 1:
        raise ValueError(f"--replicas {args.replicas}: expected an int >= 1 (engines)")
    if args.threads_per_replica is not None and args.threads_per_replica < 1:
        raise ValueError(f"--threads-per-replica {args.threads_per_replica}: expected an int >= 1")
    fleet = args.replicas > 1 or args.ray_address is not None
    for flag, value in (("--routing", args.routing), ("--threads-per-replica",
                        args.threads_per_replica)):
        if value is not None and not fleet:
            raise ValueError(
                f"{flag} is a fleet flag: pass --replicas N (N >= 2) or --ray-address, or drop it"
            )
    return fleet


def build_worker(args: argparse.Namespace) -> ServiceWorker:
    """The (not yet started) worker for parsed arguments; ValueError for any bad argument.
    The cheap checks come first, so a typo is reported before the model loads."""
    return check_args(args).build_worker()


def check_args(args: argparse.Namespace) -> WorkerSettings:
    """The cheap checks of the command line (host, budget, port, timeout), then the settings."""
    check_host(args.host, args.token)
    settings = WorkerSettings.from_args(args)
    check_port(args.host, args.port)
    if args.request_timeout <= 0:
        raise ValueError(f"--request-timeout {args.request_timeout}: expected seconds > 0")
    return settings


def fail(prog: str, exc: Exception, status: int = 2) -> None:
    """One line on stderr, then exit (2: a mistake on the command line)."""
    print(f"{prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
    raise SystemExit(status) from None


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if is_fleet(args):
            from ..fleet.fleet import serve_fleet  # NOTE: imports ray, only for a fleet

            return serve_fleet(args, check_args(args), parser.prog)
        worker = build_worker(args)
    except ValueError as exc:
        fail(parser.prog, exc)
    app = create_app(
        worker,
        token=args.token,
        request_timeout=args.request_timeout,
        served_model_name=args.served_model_name or args.model,
    )
    # The startup heap (the model, torch, transformers) is static: frozen for Python's cycle
    # collector, as vLLM's engine core freezes its own, a full collection scans only what came
    # after (unfrozen: about 170 ms every few requests with transformers loaded).
    gc.collect()
    gc.freeze()
    # HTTP on a thread, the engine loop on this (main) thread, which loaded the model: see
    # ServiceWorker.run_here. SIGINT / SIGTERM end the loop after its step, then the server.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: worker.stop())
    try:
        with BackgroundServer(app, host=args.host, port=args.port, log_level="info"):
            worker.run_here()
    finally:
        worker.close()
        gc.unfreeze()
