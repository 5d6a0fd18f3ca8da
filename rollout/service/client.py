"""`rollout.Client`: the rollout service seen as an `Engine`.

    sampler = rollout.Engine(model, tokenizer, kv_budget=2**30)   # in-process
    sampler = rollout.Client("http://127.0.0.1:8000")             # python -m rollout.serve
    trees = sampler.sample_tree(prompts, depth=3, width=4, segment_len=32, seed=step)

`sample_tree` takes the arguments of `Engine.sample_tree` and returns the same `trees.Tree`
objects (rebuilt from their JSON), carrying the policy version that sampled them; trainers take
trees, so they accept either source.

Design decisions:
- Retries, deadlines and error mapping live in transport.py: a 503, a server that cannot be
  reached and a connection lost mid-sample are retried for `deadline` seconds (10 by default),
  each retry logged; how long a request may run (`timeout`) is a separate clock.
- A restarted server is a different policy: it starts again at policy version 0 on its startup
  weights. Every answer carries the server's `server_id` (random per start); a client that
  pushed weights, or saw a policy version above 0, raises `ServerRestarted` when the id changes
  rather than silently sampling from the startup weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from trees import Tree

from .transport import Transport

log = logging.getLogger("rollout.client")


class ServerRestarted(RuntimeError):
    """The server restarted since this client pushed weights (or saw a later policy version): it
    now serves its startup weights. Push the weights again (`Client.update_weights`)."""


class Client:
    """A connection to a rollout service.

    url: the server, e.g. "http://127.0.0.1:8000".
    token: the server's bearer token (--token), if it has one.
    timeout: seconds one request may run on the server (sent with it) and on the wire.
    deadline: seconds, from a call's first failure, to keep retrying it: 503s (overload), a
        server that cannot be reached, and a connection lost during a sample (repeating a sample
        gives the same trees). Then it fails: ConnectionError naming the URL for an unreachable
        server, RuntimeError for one that stayed overloaded. Each retry is a warning on the
        "rollout.client" logger. Raise it for a server that takes long to (re)start, or when
        many callers share a small --max-queue.

    Restarts: the client remembers the server's `server_id` (random per start). If it changes
    and this client pushed weights (`update_weights`) or saw a policy version above 0, the call
    raises `ServerRestarted`: the new server serves its startup weights, so push them again (the
    client then follows the new server). If the client only ever saw the startup policy, nothing
    is lost: it logs a warning and follows the new server.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 600.0,
        deadline: float = 10.0,
        max_backoff: float = 8.0,
    ) -> None:
        for name, value in (("timeout", timeout), ("deadline", deadline)):
            if not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name}={value!r}: expected seconds > 0")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"url={url!r}: expected http://host:port, e.g. http://127.0.0.1:8000")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.deadline = float(deadline)
        self.server_id: str | None = None  # the server start this client talks to
        self._pushed = False  # weights sent to this server start
        self._seen_version = 0  # the highest policy version this server start reported
        self._transport = Transport(self.url, token, self.timeout, self.deadline, max_backoff)

    @property
    def retries(self) -> int:
        """503s and failed or lost connections retried so far (benchmarks report it)."""
        return self._transport.retries

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._transport.close()

    # the protocol ----------------------------------------------------------------------------
    def sample_tree(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        depth: int = 1,
        width: int | Sequence[int] = 1,
        *,
        segment_len: int | Sequence[int] = 32,
        max_new_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        branch_entropy: float | None = None,
        min_segment_len: int | Sequence[int] | None = None,
        stop: str | Sequence[str] | None = None,
        top_logprobs: int = 0,
        timeout: float | None = None,
    ) -> list[Tree]:
        """One `Tree` per prompt, in order; the same trees as `Engine.sample_tree` with the same
        arguments on the same weights. `timeout` overrides the client's for this request."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or of token-id lists, not a string")
        if timeout is not None and (not isinstance(timeout, (int, float)) or not timeout > 0):
            raise ValueError(f"timeout={timeout!r}: expected seconds > 0, or None (the client's)")
        body = {
            "prompts": [p if isinstance(p, str) else list(p) for p in prompts],
            "depth": depth,
            "width": width if isinstance(width, int) else list(width),
            "segment_len": segment_len if isinstance(segment_len, int) else list(segment_len),
            "max_new_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "seed": seed,
            "eos_token_id": eos_token_id
            if eos_token_id is None or isinstance(eos_token_id, int)
            else list(eos_token_id),
            "branch_entropy": branch_entropy,
            "min_segment_len": min_segment_len
            if min_segment_len is None or isinstance(min_segment_len, int)
            else list(min_segment_len),
            "stop": stop if stop is None or isinstance(stop, str) else list(stop),
            "top_logprobs": top_logprobs,
            "timeout": timeout or self.timeout,
        }
        data = self._transport.request(
            "POST", "/sample", repeatable=True, run_for=body["timeout"], json=body
        )
        self._note_server(data)
        return [Tree.from_dict(t) for t in data["trees"]]

    def update_weights(
        self, state_dict: Mapping[str, torch.Tensor] | None = None, *, path: str | None = None
    ) -> int:
        """Replace the served policy's weights; returns the new policy version. Pass a state dict
        (uploaded as safetensors; a subset of the model's tensors is fine) or `path`, a
        .safetensors file the server can read. Trees requested before this call finish on the
        old weights; trees requested after it are sampled by the new ones."""
        if (state_dict is None) == (path is None):
            raise ValueError("update_weights: pass exactly one of state_dict= or path=")
        if path is not None:
            kwargs: dict[str, Any] = {"json": {"path": str(path)}}
        else:
            tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
            headers = {"Content-Type": "application/octet-stream"}
            kwargs = {"content": save_safetensors(tensors), "headers": headers}
        route = "/weights/file" if path is not None else "/weights"
        data = self._transport.request("POST", route, repeatable=False, **kwargs)
        self._note_server(data, pushed=True)
        return int(data["policy_version"])

    def health(self) -> dict[str, Any]:
        """{"status": "ok" | "failing", "policy_version", "model", "server_id", "error"};
        "failing" (the server answers 503) while its last engine step failed, with the error."""
        data = self._transport.request("GET", "/health", repeatable=True, accept=(503,))
        self._note_server(data)
        return data

    def stats(self) -> dict[str, int | float]:
        """Queue depth, tokens/s, KV use, forwarded/unique tokens (see GET /stats)."""
        return self._transport.request("GET", "/stats", repeatable=True)

    @property
    def policy_version(self) -> int:
        return int(self.health()["policy_version"])

    # restarts --------------------------------------------------------------------------------
    def _note_server(self, data: Mapping[str, Any], pushed: bool = False) -> None:
        """Follow the server start that answered; ServerRestarted if it is a new one and this
        client's policy is lost with the old one."""
        server_id = data.get("server_id")
        version = int(data.get("policy_version", 0))
        old, lost = self.server_id, self._pushed or self._seen_version > 0
        if server_id is not None and old is not None and server_id != old:
            self._pushed, self._seen_version = False, 0
        self.server_id = server_id or old
        self._pushed = self._pushed or pushed
        self._seen_version = max(self._seen_version, version)
        if server_id is None or old is None or server_id == old:
            return
        if lost:
            raise ServerRestarted(
                f"the rollout service at {self.url} restarted (server_id {old} -> {server_id}): "
                f"it serves its startup weights again (policy version {version}), not the policy "
                "this client pushed or saw; push the weights again with update_weights()"
            )
        log.warning(
            "the rollout service at %s restarted (server_id %s -> %s); this client only saw its "
            "startup policy, so it carries on with the new server",
            self.url,
            old,
            server_id,
        )
