"""Command line and embedding helpers of the rollout service (`python -m rollout.serve`).

`load_model` reads `--model`: a local Hugging Face model folder (`from_pretrained`, with its
tokenizer when the folder has one) or `tiny:<family>` for a seeded random tiny model from
`rollout.tiny` with its character-level `tiny_tokenizer()`, so string prompts work
(`tiny:bench` is the benchmarks' larger Llama). `BackgroundServer` runs uvicorn on a thread for
tests, benchmarks and notebooks; the CLI runs it in the foreground.

A mistake on the command line (a model that is not there, a bad --kv-budget, a public host
without --token, a port in use) is one line on stderr and exit status 2, as argparse's own
errors are: it is checked before the model loads, so it comes at once, not after a traceback.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from ..api import Engine
from ..tiny import BENCH_LLAMA, FAMILIES, tiny_model, tiny_tokenizer
from .app import check_host, create_app
from .worker import ServiceWorker

_SUFFIX = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_bytes(text: str) -> int:
    """'512M', '8G' or a plain number of bytes."""
    s = text.strip().upper().removesuffix("B").removesuffix("I")
    scale = _SUFFIX.get(s[-1:], 1)
    try:
        value = int(float(s[:-1] if s[-1:] in _SUFFIX else s) * scale)
    except ValueError:
        raise ValueError(
            f"--kv-budget {text!r}: expected bytes such as 268435456, 256M or 8G"
        ) from None
    if value <= 0:
        raise ValueError(f"--kv-budget {text!r}: expected a positive size")
    return value


def load_model(spec: str, dtype: str = "float32") -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer or None) for `--model`."""
    if spec.startswith("tiny:"):
        family = spec.removeprefix("tiny:")
        if family == "bench":
            return tiny_model("llama", **BENCH_LLAMA), tiny_tokenizer(BENCH_LLAMA["vocab_size"])
        if family not in FAMILIES:
            raise ValueError(
                f"--model {spec}: expected tiny:<family> with family in {FAMILIES} or tiny:bench"
            )
        return tiny_model(family), tiny_tokenizer()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"--model {spec}: not a folder; pass a local Hugging Face model folder or tiny:<family>"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
        return model, AutoTokenizer.from_pretrained(path) if has_tokenizer else None
    except (OSError, ValueError) as exc:  # no config.json, unknown architecture, bad weights
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"--model {spec}: not a loadable Hugging Face model folder ({first})"
        ) from exc


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

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host, self.port = host, port or free_port(host)
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning")
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
    return ap


def build_worker(args: argparse.Namespace) -> ServiceWorker:
    """The (not yet started) worker for parsed arguments; ValueError for any bad argument.
    The cheap checks come first, so a typo is reported before the model loads."""
    check_host(args.host, args.token)
    kv_budget = parse_bytes(args.kv_budget)
    check_port(args.host, args.port)
    if args.request_timeout <= 0:
        raise ValueError(f"--request-timeout {args.request_timeout}: expected seconds > 0")
    prefix_cache = args.policy == "global" if args.prefix_cache is None else args.prefix_cache
    if prefix_cache and args.policy != "global":
        raise ValueError("--prefix-cache needs --policy global (fcfs-lru has its own LRU cache)")
    model, tokenizer = load_model(args.model, args.dtype)
    engine = Engine(
        model,
        tokenizer,
        kv_budget=kv_budget,
        block_size=args.block_size,
        max_step_tokens=args.max_step_tokens,
        policy=args.policy,
        prefix_cache=prefix_cache,
    )
    return ServiceWorker(engine, max_queue=args.max_queue, gather_window=args.gather_window)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        worker = build_worker(args)
    except ValueError as exc:
        print(f"{parser.prog}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    app = create_app(
        worker.start(),
        token=args.token,
        request_timeout=args.request_timeout,
        served_model_name=args.served_model_name or args.model,
    )
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        worker.close()
