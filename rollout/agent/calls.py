"""Environment calls off the engine's thread, each bounded by a timeout.

A plain environment's `start`/`step` run in a thread pool; an `async def step` runs on one event
loop in a thread of its own, where a timeout cancels the call. A plain call cannot be interrupted:
past its deadline the branch ends ("env_timeout") and the call's result, if it ever comes, is
dropped, while its worker thread stays busy until the call returns (so an environment that hangs
for good costs a worker; the pool has `workers` of them).

Results come back to the engine as `Answer`s, collected without blocking between steps (or, when
nothing else is left to run, by waiting for the first one). An environment that breaks the protocol
(a `step` that returns no `Observation`, ids outside the vocabulary) raises `EnvProtocolError` on
the engine's thread: that is a bug to fix, not a branch to drop.
"""

from __future__ import annotations

import asyncio
import inspect
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NamedTuple

from .env import Env, EnvProtocolError, Observation, Turn

UNSTARTED = object()  # the state of an episode whose `start` has not run yet
ASYNC_GRACE = 5.0  # seconds past env_timeout before an async call is dropped here, unanswered


class Answer(NamedTuple):
    """What came back for one branch: its state and observation with the observation's ids, or
    `error` ("env_error" | "env_timeout") and its `detail`."""

    key: Any
    state: Any = None
    observation: Observation | None = None
    ids: list[int] | None = None
    error: str | None = None
    detail: str = ""


class EnvCalls:
    """Runs `env` calls for keyed branches; `answers()` returns the finished ones."""

    def __init__(
        self, env: Env, encode: Callable[[str], list[int]] | None, timeout: float, workers: int = 8
    ) -> None:
        self.env, self.encode, self.timeout = env, encode, timeout
        self.is_async = inspect.iscoroutinefunction(env.step)
        self._done: queue.SimpleQueue[Any] = queue.SimpleQueue()  # (key, call) as calls finish
        self._calls: dict[Any, tuple[Future, float]] = {}  # key -> (its call, deadline)
        self._pool = None if self.is_async else ThreadPoolExecutor(workers, "env")
        self._loop: asyncio.AbstractEventLoop | None = None
        if self.is_async:
            self._loop = asyncio.new_event_loop()
            threading.Thread(target=self._serve_loop, name="env-loop", daemon=True).start()
        self.calls = 0  # step calls made

    def submit(self, key: Any, state: Any, prompt: Any, turn: Turn) -> None:
        assert key not in self._calls, "a branch has one environment call at a time"
        self.calls += 1
        if self.is_async:
            coro = asyncio.wait_for(self._call_async(state, prompt, turn), self.timeout)
            fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        else:
            fut = self._pool.submit(self._call, state, prompt, turn)
        # an async call times out on its loop (wait_for cancels it there); the deadline here
        # only backs that up
        grace = ASYNC_GRACE if self.is_async else 0.0
        self._calls[key] = (fut, time.monotonic() + self.timeout + grace)
        fut.add_done_callback(lambda f: self._done.put((key, f)))

    def answers(self, block: bool) -> list[Answer]:
        """Finished (or timed-out) calls; with `block`, wait for one while any is running."""
        done = self._drain()
        if block and not done and self._calls:
            wait = max(min(d for _f, d in self._calls.values()) - time.monotonic(), 0.0)
            try:
                done.append(self._done.get(timeout=wait + 1e-3))
            except queue.Empty:
                pass  # the earliest deadline passed: that call times out below
            done += self._drain()
        # a call past its deadline, or one that finished (and is still this key's current call)
        now = time.monotonic()
        keys = [k for k, (_f, d) in self._calls.items() if d <= now]
        keys += [k for k, f in done if k in self._calls and self._calls[k][0] is f]
        return [self._answer(k) for k in dict.fromkeys(keys)]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._stop_loop(), self._loop)
        self._calls.clear()

    # internals -------------------------------------------------------------------------------
    def _serve_loop(self) -> None:
        self._loop.run_forever()
        self._loop.close()

    async def _stop_loop(self) -> None:
        """Cancel the calls still running (their branches are gone), then stop the loop."""
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.get_running_loop().stop()
    def _drain(self) -> list[tuple[Any, Future]]:
        done = []
        while True:
            try:
                done.append(self._done.get_nowait())
            except queue.Empty:
                return done

    def _answer(self, key: Any) -> Answer:
        fut, _deadline = self._calls.pop(key)
        if not fut.done():
            fut.cancel()
            return Answer(key, error="env_timeout", detail=f"no answer within {self.timeout} s")
        try:
            state, obs, ids = fut.result()
        except EnvProtocolError:
            raise
        except (TimeoutError, asyncio.TimeoutError):
            return Answer(key, error="env_timeout", detail=f"no answer within {self.timeout} s")
        except BaseException as exc:  # noqa: BLE001 - any failure of the environment ends its branch
            return Answer(key, error="env_error", detail=f"{type(exc).__name__}: {exc}"[:500])
        return Answer(key, state, obs, ids)

    def _call(self, state: Any, prompt: Any, turn: Turn) -> tuple[Any, Observation, list[int]]:
        if state is UNSTARTED:
            state = self._sync("start", self.env.start(prompt))
        return self._finish(state, self._sync("step", self.env.step(state, turn)))

    async def _call_async(
        self, state: Any, prompt: Any, turn: Turn
    ) -> tuple[Any, Observation, list[int]]:
        if state is UNSTARTED:
            state = self.env.start(prompt)
            state = await state if inspect.isawaitable(state) else state
        return self._finish(state, await self.env.step(state, turn))

    def _sync(self, method: str, value: Any) -> Any:
        if inspect.isawaitable(value):
            raise EnvProtocolError(
                f"{type(self.env).__name__}.{method} returned an awaitable while step is a plain "
                "function: make step `async def` too, or make this method plain"
            )
        return value

    def _finish(self, state: Any, obs: Any) -> tuple[Any, Observation, list[int]]:
        if not isinstance(obs, Observation):
            raise EnvProtocolError(
                f"{type(self.env).__name__}.step returned {type(obs).__name__}; it must return "
                "rollout.agent.Observation(tokens=... or text=..., done=..., reward=...)"
            )
        if obs.text is not None:
            if self.encode is None:
                raise EnvProtocolError(
                    f"{type(self.env).__name__}.step answered text but sample_tree has no "
                    "tokenizer: pass tokenizer=, or answer Observation(tokens=...)"
                )
            return state, obs, list(self.encode(obs.text)) if obs.text else []
        return state, obs, list(obs.tokens or ())
