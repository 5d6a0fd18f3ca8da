"""`rollout.Client` against servers that are down, killed mid-request or restarted: it fails fast
and says so when nothing answers, retries what is safe to repeat (every retry logged), and never
samples silently from a restarted server's startup weights after it pushed its own."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from service_fixtures import running_service
from test_service import SYSTEM, assert_same_trees, in_process

import rollout
from rollout.service.cli import free_port
from rollout.tiny import tiny_model

KW = dict(segment_len=3, max_new_tokens=8, eos_token_id=[7, 9], seed=11)


def client_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "rollout.client"]


def test_an_unreachable_server_fails_with_a_connection_error_and_logs_every_retry(caplog):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert rollout.Client(url).deadline == 10.0, "reaching a server has its own short deadline"
    assert rollout.Client(url).timeout == 600.0, "a request may still run for long"
    with caplog.at_level(logging.WARNING, "rollout.client"), rollout.Client(url, deadline=1) as c:
        with pytest.raises(ConnectionError, match=f"cannot reach the rollout service at {url}"):
            c.sample_tree([[1, 2, 3]], 1, 2, max_new_tokens=4)
    retries = client_warnings(caplog)
    assert len(retries) == c.retries >= 1
    for attempt, message in enumerate(retries, 1):
        assert re.fullmatch(
            rf"POST {re.escape(url)}/sample: cannot connect \(ConnectError\); "
            rf"retry {attempt} in \d+\.\d+ s \(deadline 1 s\)",
            message,
        ), message


def start_server(port: int, log: Path) -> subprocess.Popen:
    """`python -m rollout.serve --model tiny:llama` on `port`, once its /health answers."""
    cmd = [sys.executable, "-m", "rollout.serve", "--model", "tiny:llama", "--port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen([*cmd, "--block-size", "4"], stdout=out, stderr=out)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "the server did not start within 120 s"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.1)


def test_a_server_killed_mid_request_and_restarted_still_answers_the_call(tmp_path, caplog):
    port, log = free_port(), tmp_path / "server.log"
    url = f"http://127.0.0.1:{port}"
    prompts, depth, width = [SYSTEM + [1]], 1, 2
    # long enough (150 engine steps) that the kill lands while the server samples it
    kw = dict(segment_len=8, max_new_tokens=150, eos_token_id=[], seed=5)
    server = start_server(port, log)
    got: list = []
    client = rollout.Client(url, deadline=120)  # covers the restart of the server
    client.health()
    caller = threading.Thread(
        target=lambda: got.extend(client.sample_tree(prompts, depth, width, **kw))
    )
    try:
        with caplog.at_level(logging.WARNING, "rollout.client"):
            caller.start()
            deadline = time.monotonic() + 60
            while httpx.get(url + "/stats", timeout=10).json()["running_trees"] == 0:
                assert time.monotonic() < deadline and caller.is_alive(), "it never started"
                time.sleep(0.01)
            os.kill(server.pid, signal.SIGKILL)
            server.wait(10)
            server = start_server(port, log)  # same port, a fresh server (startup weights)
            caller.join(180)
    finally:
        server.kill()
        server.wait(10)
        client.close()
    assert not caller.is_alive() and len(got) == 1
    assert_same_trees(got, in_process(prompts, depth, width, model_seed=0, **kw))
    messages = client_warnings(caplog)
    assert client.retries >= 1 and any("connection lost" in m for m in messages), messages
    # it only saw the startup policy: the restart is logged and the client follows the new server
    assert any("restarted" in m and "carries on" in m for m in messages), messages


@pytest.mark.parametrize("history", ["pushed weights", "saw a later version", "startup only"])
def test_a_restarted_server_is_detected(history, caplog):
    port = free_port()
    prompts = [SYSTEM + [1], [3, 4]]
    client = rollout.Client(f"http://127.0.0.1:{port}")
    with running_service(port=port) as first:
        before = client.sample_tree(prompts, 2, 2, **KW)
        assert client.server_id == first.worker.server_id
        if history == "pushed weights":
            assert client.update_weights(tiny_model("llama", seed=2).state_dict()) == 1
        elif history == "saw a later version":
            with first.client() as trainer:  # another process pushed; this one sampled from it
                trainer.update_weights(tiny_model("llama", seed=2).state_dict())
            assert client.sample_tree(prompts, **KW)[0].policy_version == 1
    with running_service(port=port) as second, caplog.at_level(logging.WARNING, "rollout.client"):
        if history == "startup only":
            again = client.sample_tree(prompts, 2, 2, **KW)
            assert_same_trees(again, before)  # the same startup policy: nothing was lost
            assert any("restarted" in m for m in client_warnings(caplog))
        else:
            with pytest.raises(rollout.ServerRestarted, match="push the weights again"):
                client.sample_tree(prompts, 2, 2, **KW)
            # after pushing again the client follows the new server
            assert client.update_weights(tiny_model("llama", seed=2).state_dict()) == 1
            assert client.sample_tree(prompts, **KW)[0].policy_version == 1
        assert client.server_id == second.worker.server_id != first.worker.server_id
    client.close()


def test_a_lost_weight_upload_is_not_repeated():
    # a weight update may have been applied before the connection broke: it is an error
    # naming what to check, never a silent second update
    with running_service() as svc, svc.client() as client:
        transport = client._transport
        calls = []

        def lost(*args, **kwargs):
            calls.append(args)
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

        transport._http.request = lost
        with pytest.raises(ConnectionError, match="it may have been applied"):
            client.update_weights(tiny_model("llama", seed=2).state_dict())
        assert len(calls) == 1 and client.retries == 0
