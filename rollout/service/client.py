"""`rollout.Client`: the rollout service seen as an `Engine`.

    sampler = rollout.Engine(model, tokenizer, kv_budget=2**30)   # in-process
    sampler = rollout.Client("http://127.0.0.1:8000")             # python -m rollout.serve
    trees = sampler.sample_tree(prompts, depth=3, width=4, segment_len=32, seed=step)

`sample_tree` takes the arguments of `Engine.sample_tree` and returns the same `trees.Tree`
objects (rebuilt from their JSON), carrying the policy version that sampled them; trainers take
trees, so they accept either source.

Design decisions:
- Overload is normal: a 503 is retried with exponential backoff (jittered, at least the server's
  Retry-After) until the client's `deadline`; so is a refused connection (a restarting server).
  Nothing else is retried.
- The server's messages become Python errors: 4xx -> ValueError with the server's `detail`
  (401 -> PermissionError), 504 -> TimeoutError, other 5xx -> RuntimeError.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import httpx
import torch
from safetensors.torch import save as save_safetensors

from trees import Tree


def _detail(response: httpx.Response) -> str:
    """The server's explanation; FastAPI's schema errors as 'field: message' lines."""
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        return response.text
    if isinstance(detail, list):
        parts = []
        for d in detail:
            loc = ".".join(str(x) for x in d.get("loc", []) if x != "body")
            parts.append(f"{loc}: {d.get('msg', d)}" if loc else str(d.get("msg", d)))
        return "; ".join(parts)
    return str(detail)


class Client:
    """A connection to a rollout service.

    url: the server, e.g. "http://127.0.0.1:8000".
    token: the server's bearer token (--token), if it has one.
    timeout: seconds one request may take on the server (sent with it) and on the wire.
    deadline: seconds to keep retrying an overloaded (503) or unreachable server before giving up;
        defaults to `timeout`.
    """

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        timeout: float = 600.0,
        deadline: float | None = None,
        max_backoff: float = 8.0,
    ) -> None:
        if not isinstance(timeout, (int, float)) or timeout <= 0:
            raise ValueError(f"timeout={timeout!r}: expected seconds > 0")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.deadline = float(deadline if deadline is not None else timeout)
        self.max_backoff = max_backoff
        self.retries = 0  # 503s and refused connections retried so far (benchmarks report it)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(self.timeout + 30.0)
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

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
        timeout: float | None = None,
    ) -> list[Tree]:
        """One `Tree` per prompt, in order; the same trees as `Engine.sample_tree` with the same
        arguments on the same weights. `timeout` overrides the client's for this request."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings or of token-id lists, not a string")
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
            "timeout": timeout or self.timeout,
        }
        data = self._request("POST", "/sample", json=body)
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
            return self._request("POST", "/weights/file", json={"path": str(path)})[
                "policy_version"
            ]
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
        payload = save_safetensors(tensors)
        headers = {"Content-Type": "application/octet-stream"}
        return self._request("POST", "/weights", content=payload, headers=headers)["policy_version"]

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def stats(self) -> dict[str, int | float]:
        """Queue depth, tokens/s, KV use, forwarded/unique tokens (see GET /stats)."""
        return self._request("GET", "/stats")

    @property
    def policy_version(self) -> int:
        return int(self.health()["policy_version"])

    # transport -------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        give_up = time.monotonic() + self.deadline
        attempt = 0
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.ConnectError as exc:
                wait = self._backoff(attempt, None, give_up)
                if wait is None:
                    msg = f"cannot reach the rollout service at {self.url}"
                    raise ConnectionError(msg) from exc
            else:
                if response.status_code != 503:
                    return self._result(response)
                wait = self._backoff(attempt, response.headers.get("Retry-After"), give_up)
                if wait is None:
                    raise RuntimeError(
                        f"the rollout service stayed overloaded for {self.deadline:.0f} s "
                        f"({_detail(response)}); raise deadline= or the server's --max-queue"
                    )
            self.retries += 1
            attempt += 1
            time.sleep(wait)

    def _backoff(self, attempt: int, retry_after: str | None, give_up: float) -> float | None:
        """Seconds to wait before the next try, or None when the deadline would pass."""
        # jitter: clients refused together come back spread out, never before Retry-After
        wait = min(0.1 * 2**attempt, self.max_backoff) * random.uniform(0.5, 1.0)
        if retry_after is not None:
            try:
                wait = max(wait, float(retry_after) * random.uniform(1.0, 1.25))
            except ValueError:
                pass
        left = give_up - time.monotonic()
        return None if left <= 0 else min(wait, left)

    @staticmethod
    def _result(response: httpx.Response) -> Any:
        code = response.status_code
        if code < 400:
            return response.json()
        message = f"rollout service answered {code}: {_detail(response)}"
        if code == 401:
            raise PermissionError(message)
        if code == 504:
            raise TimeoutError(message)
        if code < 500:
            raise ValueError(message)
        raise RuntimeError(message)
