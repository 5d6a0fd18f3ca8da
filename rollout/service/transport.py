"""The client's HTTP transport: one request to the rollout service, retried while that is safe.

Design decisions:
- Two clocks. `timeout` is how long a request may run (sent to the server, which caps it, and
  the read timeout on the wire); `deadline` is how long to keep trying to be served: from the
  first failure of a call (a 503, a refused or lost connection), new attempts start only until
  `deadline` seconds have passed. A server that cannot be reached fails within seconds with a
  `ConnectionError` naming its URL, however long its requests may run.
- What is retried: a 503 (overload; never before its Retry-After), a connection that could not
  be made, and, for requests that are safe to repeat (GET, POST /sample: the same seed gives the
  same trees), a connection lost mid-request (a killed or restarting server). A weight upload
  whose connection was lost is not repeated: it may have been applied.
- Every retry is a warning on the "rollout.client" logger (URL, reason, attempt, wait), so a
  client waiting on a dead server is never silent.
- The server's messages become Python errors: 4xx -> ValueError with the server's `detail`
  (401 -> PermissionError), 504 -> TimeoutError, other 5xx -> RuntimeError.
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

import httpx

log = logging.getLogger("rollout.client")

# the connection failed before the request reached the server: always safe to try again
_UNREACHED = (httpx.ConnectError, httpx.ConnectTimeout)
# the connection broke after the request may have reached it (server killed, restarting)
_LOST = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError, httpx.CloseError)


def detail(response: httpx.Response) -> str:
    """The server's explanation; schema errors as 'field: message' lines."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:1000]
    found = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(found, list):
        parts = []
        for d in found:
            if not isinstance(d, dict):
                parts.append(str(d))
                continue
            loc = ".".join(str(x) for x in d.get("loc", []) if x != "body")
            parts.append(f"{loc}: {d.get('msg', d)}" if loc else str(d.get("msg", d)))
        return "; ".join(parts)
    return str(found)


class Transport:
    """Requests to `url` with the retry policy above; `retries` counts the retries so far."""

    def __init__(
        self, url: str, token: str | None, timeout: float, deadline: float, max_backoff: float
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.deadline = deadline
        self.max_backoff = max_backoff
        self.retries = 0
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=url, headers=headers)

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        repeatable: bool,
        accept: tuple[int, ...] = (),
        run_for: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """The JSON answer; `accept` lists error statuses whose body is an answer too, `run_for`
        the seconds this request may run (default: the client's timeout)."""
        run_for = self.timeout if run_for is None else run_for
        # connecting is bounded by the deadline, a running request by its timeout (+ slack for
        # the server to answer 504 itself)
        kwargs["timeout"] = httpx.Timeout(run_for + 30.0, connect=self.deadline)
        give_up: float | None = None  # set at the first failure
        attempt = 0
        while True:
            started = time.monotonic()
            try:
                response = self._http.request(method, path, **kwargs)
            except _UNREACHED as exc:
                give_up = started + self.deadline if give_up is None else give_up
                reason, error = f"cannot connect ({type(exc).__name__})", exc
            except _LOST as exc:
                if not repeatable:
                    raise ConnectionError(
                        f"lost the connection to {self.url} during {method} {path} "
                        f"({type(exc).__name__}: {exc}); it may have been applied: check "
                        "Client.health()['policy_version'] before sending it again"
                    ) from exc
                give_up = time.monotonic() + self.deadline if give_up is None else give_up
                reason, error = f"connection lost ({type(exc).__name__})", exc
            except httpx.TimeoutException as exc:
                raise TimeoutError(
                    f"{method} {self.url}{path}: no answer within {run_for + 30:.0f} s "
                    "(the request's timeout + 30 s); raise timeout="
                ) from exc
            else:
                if response.status_code != 503 or 503 in accept:
                    return self._result(response, accept)
                give_up = time.monotonic() + self.deadline if give_up is None else give_up
                reason, error = f"503 {detail(response)}", None
            wait = self._backoff(attempt, response if error is None else None, give_up)
            if wait is None:
                raise self._gave_up(method, path, reason, error) from error
            attempt += 1
            self.retries += 1
            log.warning(
                "%s %s%s: %s; retry %d in %.2f s (deadline %.0f s)",
                method,
                self.url,
                path,
                reason,
                attempt,
                wait,
                self.deadline,
            )
            time.sleep(wait)

    def _gave_up(self, method: str, path: str, reason: str, error: Exception | None) -> Exception:
        if error is None:
            return RuntimeError(
                f"the rollout service at {self.url} stayed overloaded for deadline="
                f"{self.deadline:g} s ({reason}); raise deadline= or the server's --max-queue"
            )
        return ConnectionError(
            f"cannot reach the rollout service at {self.url} ({method} {path}: {reason}, "
            f"retried for deadline={self.deadline:g} s): is `python -m rollout.serve` running "
            "there? raise deadline= to wait longer for a restarting server"
        )

    def _backoff(
        self, attempt: int, response: httpx.Response | None, give_up: float
    ) -> float | None:
        """Seconds to wait before the next try, or None when the deadline has passed."""
        # jitter: clients refused together come back spread out, never before Retry-After
        wait = min(0.1 * 2**attempt, self.max_backoff) * random.uniform(0.5, 1.0)
        retry_after = response.headers.get("Retry-After") if response is not None else None
        if retry_after is not None:
            try:
                wait = max(wait, float(retry_after) * random.uniform(1.0, 1.25))
            except ValueError:
                pass
        left = give_up - time.monotonic()
        return None if left <= 0 else min(wait, left)

    @staticmethod
    def _result(response: httpx.Response, accept: tuple[int, ...]) -> Any:
        code = response.status_code
        if code < 400 or code in accept:
            return response.json()
        message = f"rollout service answered {code}: {detail(response)}"
        if code == 401:
            raise PermissionError(message)
        if code == 504:
            raise TimeoutError(message)
        if code < 500:
            raise ValueError(message)
        raise RuntimeError(message)
