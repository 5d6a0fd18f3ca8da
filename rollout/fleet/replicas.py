"""The front's view of its replicas: which are up, their load, restarts, weight updates.

Design decisions:
- Everything here runs on the front's event loop (one thread), so the counts need no locks:
  choosing a replica and counting the request in flight happen with no `await` between them.
  Waiters (a request waiting for a replica, an update waiting for the requests in flight) park
  on futures that every change of state wakes (`_changed`).
- Load is requests in flight per replica, counted here from routing to the end of the answer
  (a stream's last byte), and handed to the `Router` with every choice.
- A lost replica (its actor died, or a request to it lost its connection and the actor does not
  answer a ping either) is marked down at once, so nothing else is routed to it; the router
  forgets it (a fresh replica's cache is empty) and a new actor starts in the background. Before
  it takes traffic it replays the `WeightLog` under the update lock, so it comes back at the
  fleet's policy version with the fleet's weights. A failed restart is retried with backoff.
- Generations: each lease records the generation of the replica it was routed to, so a late
  failure of a request sent to the old actor never marks the new one down.
- A weight update is fleet-wide and atomic for routing: the shipment goes into the object store
  while requests still flow, then routing stops (new requests wait), the requests in flight
  finish, every replica loads it and takes the new version, and routing resumes. No tree mixes
  versions and a request routed after the update gets the new one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import ray

from ..service.errors import HTTPError
from .replica import Loaded
from .router import Router
from .weights import WeightLog, ship

log = logging.getLogger("rollout.fleet")

UP, RESTARTING = "up", "restarting"


@dataclass(eq=False)
class Member:
    """One replica slot: its current actor and what the front counts about it."""

    index: int
    actor: Any  # the ActorHandle of the current generation
    url: str
    status: str = UP
    generation: int = 0  # bumped when the replica is lost
    in_flight: int = 0
    routed: int = 0  # requests sent to it, retries included
    answered: int = 0  # requests it answered (a lost request is answered by another)
    restarts: int = 0
    error: str | None = None  # why it was last lost, or why its restart is failing


class Lease(NamedTuple):
    """A request routed to `member` as it was at `generation`."""

    member: Member
    generation: int
    url: str


def describe(exc: BaseException) -> str:
    """One line: the original error of a Ray task or actor error, else the error itself."""
    cause = getattr(exc, "cause", None)
    err = cause if isinstance(cause, BaseException) else exc
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:500]}" if text else type(err).__name__


def start_all(spawn: Callable[[int], Any], n: int, timeout: float) -> list[Member]:
    """Start `n` replicas concurrently and wait for all; on the first failure kill every one
    and raise `ValueError` (a bad argument: model spec, dtype...) or `RuntimeError` naming it."""
    actors = [spawn(i) for i in range(n)]
    refs = [a.start.remote() for a in actors]
    index = {ref: i for i, ref in enumerate(refs)}
    urls: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, timeout=max(deadline - time.monotonic(), 0))
            if not ready:
                i = index[pending[0]]
                raise RuntimeError(
                    f"replica {i} of {n} did not start within {timeout:g} s: the cluster may "
                    "lack the CPUs it asks for (see `ray status`), or its model loads slowly"
                )
            for ref in ready:
                try:
                    urls[index[ref]] = ray.get(ref)
                except Exception as exc:
                    cause = getattr(exc, "cause", exc)
                    bad_argument = isinstance(cause, (ValueError, TypeError))
                    why = " ".join(str(cause).split()) if bad_argument else describe(exc)
                    kind = ValueError if bad_argument else RuntimeError
                    raise kind(f"replica {index[ref]} of {n} failed to start: {why}") from exc
    except BaseException:
        for actor in actors:
            ray.kill(actor)
        raise
    return [Member(i, actor, urls[i]) for i, actor in enumerate(actors)]


class ReplicaSet:
    """The replicas behind one front. Use from the front's event loop only."""

    def __init__(
        self,
        members: Sequence[Member],
        spawn: Callable[[int], Any],
        router: Router,
        *,
        start_timeout: float = 300.0,
        ping_timeout: float = 10.0,
        route_timeout: float = 600.0,
    ) -> None:
        self.members = list(members)
        self.spawn = spawn
        self.router = router
        self.start_timeout, self.ping_timeout = start_timeout, ping_timeout
        self.route_timeout = route_timeout  # how long a request may wait for a replica
        self.weights = WeightLog()
        self.spawned = [m.actor for m in self.members]  # every actor started, for close()
        self.retried = 0  # requests sent again after their replica was lost
        self.updates = 0
        self.last_update: dict[str, float] = {}
        self.closing = False  # set by Fleet.close(): no Ray call may start after it
        self._open = True  # False while a weight update holds routing
        self._waiters: set[asyncio.Future] = set()
        self._update_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    @property
    def version(self) -> int:
        return self.weights.version

    # routing -----------------------------------------------------------------------------
    async def acquire(self, key: tuple) -> Lease:
        """Route a request: wait for routing to be open and a replica up, choose, count it."""
        try:
            await self._wait_until(self._routable, self.route_timeout)
        except asyncio.TimeoutError:
            raise HTTPError(
                503, f"no replica came up within {self.route_timeout:g} s", {"Retry-After": "5"}
            ) from None
        alive = [m.status == UP for m in self.members]
        choice = self.router.choose(key, [m.in_flight for m in self.members], alive)
        self.router.record(choice, key)
        member = self.members[choice]
        member.in_flight += 1
        member.routed += 1
        return Lease(member, member.generation, member.url)

    def release(self, lease: Lease, answered: bool) -> None:
        """The request is over on this replica (`answered`: it answered it)."""
        lease.member.in_flight -= 1
        lease.member.answered += answered
        assert lease.member.in_flight >= 0, lease
        self._changed()

    def _routable(self) -> bool:
        return self._open and any(m.status == UP for m in self.members)

    # failures and restarts -------------------------------------------------------------------
    async def lost(self, lease: Lease, exc: BaseException) -> None:
        """A request to `lease`'s replica failed with `exc`: mark it down unless it still
        answers a ping (then the failure was the connection's alone)."""
        member = lease.member
        if member.generation != lease.generation or member.status != UP:
            return  # already known
        if not isinstance(exc, ray.exceptions.RayError) and await self._answers(member):
            log.warning("replica %d: %s, but it answers a ping", member.index, describe(exc))
            return
        if member.generation == lease.generation and member.status == UP:
            self._mark_down(member, describe(exc))

    async def watch(self, interval: float) -> None:
        """Ping every replica that is up every `interval` s; one that does not answer is lost
        (so an idle replica that died is restarted, not found by the next request)."""
        while not self.closing:
            await asyncio.sleep(interval)
            ups = [(m, m.generation) for m in self.members if m.status == UP]
            answers = await asyncio.gather(*(self._answers(m) for m, _ in ups))
            for (member, generation), answered in zip(ups, answers, strict=True):
                if not answered and member.generation == generation and member.status == UP:
                    self._mark_down(member, "it stopped answering pings")

    async def _answers(self, member: Member) -> bool:
        if self.closing:  # NOTE: a Ray call after ray.shutdown() would start a new Ray
            return True
        try:
            await asyncio.wait_for(member.actor.ping.remote(), self.ping_timeout)
        except Exception:
            return False
        return True

    def _mark_down(self, member: Member, reason: str) -> None:
        if self.closing:
            return
        log.warning("replica %d lost (%s); restarting it", member.index, reason)
        old = member.actor
        member.status, member.error = RESTARTING, reason
        member.generation += 1
        self.router.forget(member.index)
        self._changed()
        task = asyncio.ensure_future(self._restart(member, old))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart(self, member: Member, old: Any) -> None:
        """A new actor in `member`'s slot, given the fleet's weights before it takes traffic."""
        _kill(old)
        self.spawned.remove(old)
        delay = 1.0
        while not self.closing:
            actor = self.spawn(member.index)
            self.spawned.append(actor)
            try:
                url = await asyncio.wait_for(actor.start.remote(), self.start_timeout)
                async with self._update_lock:  # no update starts or ends while it syncs
                    for shipment in self.weights.shipments:
                        await actor.update_weights.remote(shipment, shipment.version)
                    member.actor, member.url, member.status = actor, url, UP
                    member.restarts += 1
                    self._changed()
                log.warning("replica %d is back at policy version %d", member.index, self.version)
                return
            except Exception as exc:
                member.error = f"restart failed: {describe(exc)}"
                log.warning("replica %d: %s; again in %.0f s", member.index, member.error, delay)
                _kill(actor)
                self.spawned.remove(actor)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)
            except BaseException:  # cancelled: the fleet is closing
                _kill(actor)
                raise

    # weight updates --------------------------------------------------------------------------
    async def update(self, state_dict: dict[str, Any]) -> int:
        """Load `state_dict` on every replica as one new policy version; returns it."""
        async with self._update_lock:
            version = self.version + 1
            began = time.perf_counter()
            shipment = await asyncio.to_thread(ship, state_dict, version)
            put = time.perf_counter()
            self._open = False
            try:
                await self._wait_until(lambda: all(m.in_flight == 0 for m in self.members))
                drained = time.perf_counter()
                ups = [m for m in self.members if m.status == UP]
                generations = [m.generation for m in ups]
                if not ups:
                    raise HTTPError(503, "no replica is up to load the weights; retry shortly")
                calls = [m.actor.update_weights.remote(shipment, version) for m in ups]
                outcomes = await asyncio.gather(*calls, return_exceptions=True)
                loaded = [o for o in outcomes if isinstance(o, Loaded)]
                if not loaded:  # refused (the same check on every replica), or all lost
                    raise getattr(outcomes[0], "cause", outcomes[0])
                self.weights.add(shipment)
                for member, generation, outcome in zip(ups, generations, outcomes, strict=True):
                    lost = member.generation != generation or member.status != UP  # known
                    if not isinstance(outcome, Loaded) and not lost:  # it restarts, replays
                        self._mark_down(member, f"weight update failed: {describe(outcome)}")
            finally:
                self._open = True
                self._changed()
            self.updates += 1
            self.last_update = {
                "bytes": shipment.nbytes,
                "put_s": put - began,
                "drain_s": drained - put,
                "get_s": max(o.get_s for o in loaded),
                "load_s": max(o.load_s for o in loaded),
                "paused_s": time.perf_counter() - put,
            }
            return version

    # waiting ---------------------------------------------------------------------------------
    async def _wait_until(self, ready: Callable[[], bool], timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not ready():
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.add(waiter)
            try:
                left = None if deadline is None else max(deadline - time.monotonic(), 0)
                await asyncio.wait_for(waiter, left)
            finally:
                self._waiters.discard(waiter)

    def _changed(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def close(self) -> None:
        """Stop the restarts in progress (the actors are killed by `kill_all`)."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def kill_all(self) -> None:
        for actor in self.spawned:
            _kill(actor)


def _kill(actor: Any) -> None:
    try:
        ray.kill(actor)
    except Exception:  # already dead, or Ray is gone
        pass
