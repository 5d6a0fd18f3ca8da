"""Command line and embedding helpers of the rollout service (`python -m rollout.serve`).

`load_model` reads `--model`: a local Hugging Face model folder (`from_pretrained`, with its
tokenizer when the folder has one) or `tiny:<family>` for a seeded random tiny model from
`rollout.tiny` (`tiny:bench` is the benchmarks' larger Llama). `BackgroundServer` runs uvicorn on
a thread for tests, benchmarks and notebooks; the CLI runs it in the foreground.
"""

from __future__ import annotations

import argparse
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI

from ..api import Engine
from ..tiny import BENCH_LLAMA, FAMILIES, tiny_model
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
            return tiny_model("llama", **BENCH_LLAMA), None
        if family not in FAMILIES:
            raise ValueError(
                f"--model {spec}: expected tiny:<family> with family in {FAMILIES} or tiny:bench"
            )
        return tiny_model(family), None
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(
            f"--model {spec}: not a folder; pass a local Hugging Face model folder or tiny:<family>"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    has_tokenizer = any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    return model, AutoTokenizer.from_pretrained(path) if has_tokenizer else None


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
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return ap


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    check_host(args.host, args.token)
    model, tokenizer = load_model(args.model, args.dtype)
    engine = Engine(
        model,
        tokenizer,
        kv_budget=parse_bytes(args.kv_budget),
        block_size=args.block_size,
        max_step_tokens=args.max_step_tokens,
        policy=args.policy,
    )
    worker = ServiceWorker(
        engine, max_queue=args.max_queue, gather_window=args.gather_window
    ).start()
    app = create_app(worker, token=args.token, request_timeout=args.request_timeout)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    finally:
        worker.close()
