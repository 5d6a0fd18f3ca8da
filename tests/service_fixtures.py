"""A real rollout service on loopback for the service tests: uvicorn on a free port, tiny model."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx

import rollout
from rollout.service.app import create_app
from rollout.service.cli import BackgroundServer
from rollout.service.worker import ServiceWorker
from rollout.tiny import tiny_model

BLOCK = 2 * 2 * 4 * 2 * 16 * 4  # bytes of one block: K and V, 2 layers, 4 tokens, 2x16 heads, fp32


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float, what: str) -> None:
    """Poll `url`/health until the server process `proc` answers 200; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not start"
        time.sleep(0.2)


class CharTokenizer:
    """Text prompts without a download: one token per character (the tiny vocabulary is 256)."""

    eos_token_id = None

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 256 for c in text]}


@dataclass
class Service:
    url: str
    engine: rollout.Engine
    worker: ServiceWorker

    def client(self, **kw) -> rollout.Client:
        return rollout.Client(self.url, **kw)

    def wait_idle(self, timeout: float = 20.0) -> dict:
        """Stats once nothing is pending (every request answered)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.worker.snapshot()
            if stats["pending_trees"] == 0 and stats["running_trees"] == 0:
                return stats
            assert time.monotonic() < deadline, f"service never went idle: {stats}"
            time.sleep(0.02)


@contextlib.contextmanager
def running_service(
    *,
    seed: int = 1,
    blocks: int = 2048,
    max_queue: int = 64,
    token: str | None = None,
    request_timeout: float = 60.0,
    start_worker: bool = True,
    tokenizer: object | None = None,
    port: int | None = None,
    prefix_cache: bool = False,
    served_model_name: str | None = None,
) -> Iterator[Service]:
    """A served tiny Llama (`tiny_model("llama", seed)`, block size 4, `blocks` KV blocks), on
    `port` (a free one by default; pass the same port twice to restart a server in place)."""
    engine = rollout.Engine(
        tiny_model("llama", seed=seed),
        tokenizer,
        kv_budget=blocks * BLOCK,
        block_size=4,
        prefix_cache=prefix_cache,
    )
    worker = ServiceWorker(engine, max_queue=max_queue)
    if start_worker:
        worker.start()
    app = create_app(
        worker, token=token, request_timeout=request_timeout, served_model_name=served_model_name
    )
    try:
        with BackgroundServer(app, port=port) as srv:
            yield Service(srv.url, engine, worker)
    finally:
        worker.close()
