"""`python -m rollout.serve` on the command line: mistakes are one line on stderr and exit status
2, never a traceback; `--model tiny:<family>` serves its tiny tokenizer, so string prompts work;
the command serves and a signal ends it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
from service_fixtures import wait_healthy
from test_service import KW, assert_same_trees

import rollout
from rollout.service.app import create_app
from rollout.service.cli import (
    BackgroundServer,
    build_parser,
    build_worker,
    free_port,
    load_model,
)
from rollout.tiny import tiny_model, tiny_tokenizer

PROG = "python -m rollout.serve: error: "


def test_command_line_mistakes_are_one_line_and_exit_2(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    busy_port = busy.getsockname()[1]
    cases = [
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: not a folder"),
        (["--model", str(tmp_path)], f"--model {tmp_path}: not a loadable Hugging Face model"),
        (["--model", "tiny:gpt9"], "--model tiny:gpt9: expected tiny:<family>"),
        (["--model", "tiny:llama", "--kv-budget", "lots"], "--kv-budget 'lots': expected bytes"),
        (["--model", "tiny:llama", "--host", "0.0.0.0"], "--host 0.0.0.0 exposes the policy"),
        (["--model", "tiny:llama", "--port", str(busy_port)], f"--port {busy_port}: cannot"),
    ]
    env = {k: v for k, v in os.environ.items() if k != "ROLLOUT_TOKEN"}
    # all at once: each pays the imports (seconds), none gets as far as serving
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "rollout.serve", *args]
            + ([] if "--port" in args else ["--port", str(free_port())]),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, _ in cases
    ]
    try:
        for proc, (args, needle) in zip(procs, cases, strict=True):
            out, err = proc.communicate(timeout=300)
            lines = err.strip().splitlines()
            assert proc.returncode == 2, (args, err)
            assert len(lines) == 1 and lines[0].startswith(PROG + needle), err
    finally:
        busy.close()
        for proc in procs:
            proc.kill()


def test_the_tiny_server_takes_string_prompts():
    port = free_port()
    args = build_parser().parse_args(["--model", "tiny:llama", "--port", str(port)])
    worker = build_worker(args).start()
    prompts = ["What is 2+2?", "Say hi."]
    try:
        with BackgroundServer(create_app(worker), port=port) as srv, rollout.Client(srv.url) as c:
            remote = c.sample_tree(prompts, 2, 2, **KW)
    finally:
        worker.close()
    tokenizer = tiny_tokenizer()
    local = rollout.Engine(tiny_model("llama"), tokenizer).sample_tree(prompts, 2, 2, **KW)
    assert_same_trees(remote, local)
    assert [t.prompt for t in remote] == prompts
    assert remote[0].prompt_ids == tokenizer("What is 2+2?")["input_ids"]


@pytest.mark.parametrize("spec", ["tiny:llama", "tiny:qwen3"])
def test_tiny_models_come_with_the_tiny_tokenizer(spec):
    model, tokenizer = load_model(spec)
    assert tokenizer is not None and tokenizer.chat_template
    assert max(tokenizer.get_vocab().values()) < model.config.vocab_size


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_command_serves_and_ends_cleanly_on_a_signal(sig):
    # The real command: HTTP on a thread, the engine loop on the main thread (run_here). It
    # answers as the in-process engine does; a signal ends the loop, then the server, exit 0.
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rollout.serve", "--model", "tiny:llama", "--port", str(port)],
        env={k: v for k, v in os.environ.items() if k != "ROLLOUT_TOKEN"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url, 300, "the server")
        with rollout.Client(url) as client:
            remote = client.sample_tree(["Say hi."], 2, 2, **KW)
        local = rollout.Engine(tiny_model("llama"), tiny_tokenizer()).sample_tree(
            ["Say hi."], 2, 2, **KW
        )
        assert_same_trees(remote, local)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0 and "Traceback" not in err, err
    finally:
        proc.kill()
