"""Concurrent multi-turn agents against three servers: ours with its cross-request prefix cache,
ours without it (`--no-prefix-cache`), and vLLM's OpenAI server (CPU build, prefix caching on).

Workload (the defaults; benchmarks/agents_workload.py): 8 conversations x 5 turns on the
benchmarks' tiny Llama (`tiny:bench`: hidden 512, 8 layers, vocab 4096, random weights saved
with its tiny tokenizer to a temp folder both servers load); a 256-token system prompt shared by
all; each turn appends a 32-token synthetic tool observation and asks for 32 tokens
(temperature 1, fixed seeds, EOS ignored, so every server generates exactly the same count).
Token ids go to POST /v1/completions; answers come back as `choices[0].token_ids`.

Reported per server: generated tokens/s (completion tokens over the pass's wall time; best and
median of --repeats), p50/p99 request latency, and prefill tokens computed per turn (ours: GET
/stats `tokens_forwarded` less decode; vLLM: GET /metrics
`vllm:prompt_tokens_by_source_total{source="local_compute"}`) against the goal line, the tokens
a turn adds that no earlier request forwarded. A table, results/agents.json and a PNG plot.

Design decisions:
- One server works at a time (2 cores): the processes load together (nothing is timed then),
  then each is warmed up alone with a short pass of the same shapes and left idle (an idle
  server takes no CPU) while the others run; passes interleave (ours-cache, ours-no-cache,
  vLLM, ours-cache, ...).
- Every pass (warm-up and each repeat) draws fresh token ids from its own seed, the same on
  every server, so no pass is served from a cache an earlier pass filled.
- Lockstep turns by default, so counters read between turns give each turn's prefill exactly
  (see agents_workload.py; `--schedule free` for agents that do not wait for each other: vLLM
  then reports per-turn prefill through `usage.prompt_tokens_details.cached_tokens`, ours only
  totals). Ours waits its gather window (--gather-window, 0.1 s) at the start of every turn.
- vLLM reuses only whole KV blocks (128 tokens by default on its CPU build; `--vllm-block-size`
  changes it); ours reuses any token-length prefix. vLLM runs with --skip-tokenizer-init (it
  never detokenizes); ours loads the folder's tokenizer and returns text as well.
Usage: python benchmarks/agents.py [--clients 8] [--turns 5] [--repeats 3] [--dtype bfloat16]
       [--schedule lockstep|free] [--servers ours-cache,ours-no-cache,vllm] [--no-vllm]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import httpx
from agents_report import plot, print_table, ratios, summarize
from agents_servers import Server, start_ours, start_vllm
from agents_workload import Workload, run_workload
from vllm_venv import vllm_python

SERVERS = ("ours-cache", "ours-no-cache", "vllm")


def write_model(spec: str, folder: Path, max_len: int) -> dict:
    """Save the tiny model `spec` (tiny:bench or tiny:<family>) with its tokenizer; its config."""
    from rollout.tiny import BENCH_LLAMA, FAMILIES, tiny_model, tiny_tokenizer

    family = spec.removeprefix("tiny:")
    if family == "bench":
        kw = dict(BENCH_LLAMA, max_position_embeddings=max(2048, max_len))
        family = "llama"
    elif family in FAMILIES:
        kw = dict(max_position_embeddings=max(512, max_len))
    else:
        raise SystemExit(f"--model {spec}: expected tiny:bench, tiny:<{'|'.join(FAMILIES)}> "
                         "or a local model folder")  # fmt: skip
    model = tiny_model(family, seed=0, **kw)  # fp32 on disk; each server casts to --dtype
    model.save_pretrained(folder)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return model.config.to_dict()


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="tiny:bench", help="tiny:bench, tiny:<family> or a folder")
    ap.add_argument("--clients", type=int, default=8, help="concurrent conversations")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--system-tokens", type=int, default=256, help="shared system prompt")
    ap.add_argument("--observation-tokens", type=int, default=32, help="tool output per turn")
    ap.add_argument("--max-tokens", type=int, default=32, help="answer length per turn")
    ap.add_argument("--schedule", default="lockstep", choices=["lockstep", "free"])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per server, interleaved")
    ap.add_argument("--warmup-turns", type=int, default=2, help="turns of the warm-up pass")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per server")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--servers", default=",".join(SERVERS), help=f"comma list of {SERVERS}")
    ap.add_argument("--no-vllm", action="store_true", help="run ours only")
    ap.add_argument("--no-install", action="store_true", help="never create .venv-vllm")
    ap.add_argument("--no-logprobs", action="store_true", help="do not ask for log-probs")
    ap.add_argument("--kv-budget", default="256M", help="ours: --kv-budget")
    ap.add_argument("--ours-args", default="", help="more flags for ours, e.g. '--block-size 32'")
    ap.add_argument("--vllm-block-size", type=int, default=None, help="vLLM's KV block size")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="seconds per server")
    ap.add_argument("--out", default="results/agents.json", help="JSON; the plot is .png beside")
    args = ap.parse_args(argv)
    names = [s for s in args.servers.split(",") if s]
    unknown = sorted(set(names) - set(SERVERS))
    if unknown or not names:
        ap.error(f"--servers: unknown {unknown}; expected a comma list of {','.join(SERVERS)}")
    args.skipped = {}
    if args.no_vllm and "vllm" in names:
        names.remove("vllm")
        args.skipped["vllm"] = "skipped: --no-vllm"
    if args.repeats < 1 or args.threads < 1 or args.warmup_turns < 0:
        ap.error("--repeats and --threads must be >= 1, --warmup-turns >= 0")
    args.names = names
    try:  # vocab_size is the model's, set once it is known
        args.workload = Workload(args.clients, args.turns, args.system_tokens,
                                 args.observation_tokens, args.max_tokens,
                                 schedule=args.schedule)  # fmt: skip
    except ValueError as exc:
        ap.error(f"--{str(exc).replace('_', '-')}")
    return args


def launch(name: str, args, folder: Path, w: Workload, logs: Path) -> tuple[Server | None, str]:
    """Start one server's process (not yet serving); (None, why) when vLLM is not to be had."""
    if name != "vllm":
        server = start_ours(name, folder, logs, prefix_cache=name == "ours-cache",
                            dtype=args.dtype, threads=args.threads, kv_budget=args.kv_budget,
                            extra=shlex.split(args.ours_args))  # fmt: skip
        return server, "started"
    python, status = vllm_python(args.no_install)
    if python is None:
        return None, status
    server = start_vllm(python, folder, logs, dtype=args.dtype, threads=args.threads,
                        max_model_len=w.max_len, block_size=args.vllm_block_size)  # fmt: skip
    return server, "started"


def request_body(server: Server, w: Workload, logprobs: bool) -> dict:
    """The fixed fields of every request to `server` (vLLM's names; ours accepts the same)."""
    models = server.http.get("/v1/models").json()["data"]
    body = {
        "model": models[0]["id"],
        "max_tokens": w.max_tokens,
        "temperature": 1.0,
        "n": 1,
        "ignore_eos": True,  # both sides generate exactly max_tokens
        "return_token_ids": True,  # choices[0].token_ids: the next turn's prompt needs them
    }
    if logprobs:  # RL clients need each sampled token's log-prob
        body.update(logprobs=0, return_tokens_as_token_ids=True)
    return body


def model_folder(spec: str, tmp: Path, max_len: int) -> tuple[Path, dict]:
    """(folder, config dict): a tiny model written under `tmp`, or the folder given."""
    if spec.startswith("tiny:"):
        return tmp / "model", write_model(spec, tmp / "model", max_len)
    folder = Path(spec)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"--model {spec}: no config.json there; pass a model folder or tiny:bench")
    return folder, json.loads((folder / "config.json").read_text())


def start_all(
    args, folder: Path, w: Workload, warm: Workload | None, logs: Path, servers: dict, status: dict
) -> None:
    """Start every server into `servers` and `status` (filled as they start, so the caller can
    close what started if a later one fails), then warm each up alone; then they idle.

    NOTE: the processes load at the same time (nothing is timed while they load); every
    request, warm-up included, runs with one server busy at a time."""
    for name in args.names:
        server, status[name] = launch(name, args, folder, w, logs)
        if server is not None:
            servers[name] = server
    for name, server in list(servers.items()):
        try:
            status[name] = f"ready in {server.wait_ready(args.start_timeout):.0f} s"
        except RuntimeError as exc:
            server.close()
            del servers[name]
            if name != "vllm":
                raise
            status[name] = f"vLLM failed to start: {exc}"
        print(f"{name}: {status[name]}", flush=True)
    for server in servers.values():
        server.body = request_body(server, w, not args.no_logprobs)
        if warm is not None:
            run_workload(server, warm, 999, server.body)


def timed_passes(servers: dict, status: dict, w: Workload, repeats: int) -> dict[str, list]:
    """`repeats` passes per server, interleaved; pass r draws its inputs from seed r on every
    server. A vLLM failure stops vLLM only (the report says why); ours' failures raise."""
    runs: dict[str, list] = {name: [] for name in servers}
    for r in range(repeats):
        for name, server in list(servers.items()):
            try:
                run = run_workload(server, w, r, server.body)
            except (RuntimeError, httpx.HTTPError) as exc:
                if server.kind != "vllm":
                    raise
                status[name] = f"vLLM failed in pass {r + 1}: {exc}\n{server.log_tail()}"
                print(f"NOTE: {status[name]}", flush=True)
                server.close()
                del servers[name], runs[name]
                continue
            runs[name].append(run)
            n = sum(len(x.answer) for x in run.records)
            print(f"  pass {r + 1} {name}: {run.wall_s:.2f} s, {n / run.wall_s:.1f} tokens/s",
                  flush=True)  # fmt: skip
    return runs


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    w = args.workload
    servers: dict[str, Server] = {}
    status: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="agents-") as tmp:
        folder, config = model_folder(args.model, Path(tmp), w.max_len)
        w = replace(w, vocab_size=config["vocab_size"])
        try:
            # 1. Each server alone: start, warm up on a short pass of the same shapes, idle.
            warm = replace(w, turns=args.warmup_turns) if args.warmup_turns else None
            start_all(args, folder, w, warm, Path(tmp), servers, status)
            # 2. Timed passes, interleaved.
            runs = timed_passes(servers, status, w, args.repeats)
        finally:
            for server in servers.values():
                server.close()
    return report_of(args, w, config, servers, status, runs, time.perf_counter() - t0)


def report_of(args, w: Workload, config: dict, servers: dict, status: dict, runs: dict,
              wall: float) -> dict:  # fmt: skip
    """Print the table, write the JSON and the plot; the report as a dict."""
    rows = {
        name: summarize(name, runs[name], w, {"status": status[name], "command": s.cmd})
        for name, s in servers.items()
    }
    layers = config.get("num_hidden_layers")
    model = f"{args.model} (hidden {config.get('hidden_size')}, {layers} layers)"
    title = (
        f"{w.clients} agents x {w.turns} turns ({w.schedule}), system {w.system_tokens}, "
        f"observation {w.observation_tokens}, answer {w.max_tokens} tokens; {model}, "
        f"{args.dtype}, {args.threads} threads, {args.repeats} passes"
    )
    missing = {**args.skipped, **{n: status[n] for n in args.names if n not in servers}}
    for name, why in missing.items():
        print(f"NOTE: {name} not run: {why}")
    if not rows:
        raise SystemExit("no server ran")
    print_table(title, rows, w)
    ratio = ratios(rows)
    for key, value in ratio.items():
        if value is not None:
            print(f"{key}: {value:.2f}")
    out = Path(args.out)
    png = out.with_suffix(".png")
    plotted = plot(rows, w, png, title)
    report = {
        "title": title,
        "workload": asdict(w),
        "model": {"spec": args.model, **{k: config.get(k) for k in (
            "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "intermediate_size", "vocab_size")}},
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "servers": rows,
        "not_run": missing,
        "ratios": ratio,
        "plot": str(png) if plotted else None,
        "wall_seconds": wall,
    }  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}" + (f" and {png}" if plotted else "") + f" ({wall:.0f} s in all)")
    return report


if __name__ == "__main__":
    main()
