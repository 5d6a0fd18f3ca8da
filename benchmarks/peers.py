"""Speed against a real peer: tree-rollouts and vLLM's CPU build, same model folder, same threads.

Workloads (benchmarks/peers_floor.py), a tiny random Llama (hidden 512, 8 layers, 8 query / 2 KV
heads, vocab 4096, intermediate 1376) saved with save_pretrained to a temp folder both load:
  flat  2 prompts x 1024 tokens, 64 completions x 96 tokens each (vLLM: SamplingParams(n=64))
  tree  the same prompts, depth 3, width 4, segment 32, leaves to 96 new tokens (vLLM: 3 rounds of
        n=4, each round's prompts = previous prompt + output, prefix caching on)
  long  1 prompt x 4096 tokens, 64 completions x 32 tokens
EOS is ignored on both sides, so both sample exactly the same tokens; the counts are checked.

Design decisions:
- vLLM runs in its own venv (scripts/vllm_env.sh: it pins other torch/transformers versions) as
  one long-lived worker (benchmarks/peers_vllm.py) driven over stdin, so runs interleave
  (ours, vLLM, ours, vLLM, ...) with both sides warm; each side is warmed up with the same shapes.
- Ours reuses one `rollout.Engine` (a warm KV pool of fixed budget) across runs; vLLM resets its
  prefix cache before every timed run. Best of --repeats per side, each timed run after the
  machine has gone quiet (settle.py: vLLM's worker spins on a core for most of a second after
  its run, and an OpenMP runtime's threads after their last parallel region).
- Each side's distance from the compute floor (FLOPs of the unique tokens over a 2048^3 product's
  rate, the faster of MKL and oneDNN, measured in this run, best of several samples) is printed
  next to its time: the rate drifts on shared VMs, so it is re-measured after every workload.
Usage: python benchmarks/peers.py [--quick] [--dtype float32|bfloat16] [--repeats 3]
       [--workloads flat,tree,long] [--workload NAME=PROMPTS:LEN:WxS[,WxS...]] [--no-vllm]
       [--no-install] [--out results/peers.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from peers_floor import Workload, floor_flops, matmul_gflops, parse_workload, workloads
from settle import settle
from transformers import AutoModelForCausalLM
from vllm_venv import vllm_env, vllm_python

import rollout
from rollout.engine.scheduler import tree_blocks
from rollout.tiny import BENCH_LLAMA, tiny_model
from trees.spec import TreeSpec

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BLOCK = 16


class Ours:
    """tree-rollouts on the saved model: one Engine, its pool sized once for every workload."""

    def __init__(self, folder: Path, dtype: torch.dtype, loads: list[Workload]) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        cfg = self.model.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        block_bytes = (
            2 * cfg.num_hidden_layers * BLOCK * cfg.num_key_value_heads * head_dim * dtype.itemsize
        )
        worst = max(w.n_prompts * tree_blocks(self.spec(w), w.prompt_len, BLOCK) for w in loads)
        self.engine = rollout.Engine(self.model, kv_budget=worst * block_bytes, block_size=BLOCK)

    @staticmethod
    def spec(w: Workload) -> TreeSpec:
        segs = list(w.segments[:-1]) if w.depth > 1 else 32  # depth 1: no inner segment
        return TreeSpec.make(w.depth, list(w.widths), segs, w.max_new_tokens)

    def run(self, w: Workload, prompts: list[list[int]]) -> dict:
        spec = self.spec(w)
        start = time.perf_counter()
        trees = self.engine.sample_tree(
            prompts,
            spec.depth,
            list(spec.width),
            segment_len=list(spec.segment_len) or 32,
            max_new_tokens=spec.max_new_tokens,
            eos_token_id=[],
            seed=0,
            progress=False,
        )
        seconds = time.perf_counter() - start
        sampled = sum(len(n.tokens) for t in trees for n in t.nodes() if n.depth > 0)
        leaf = sum(len(tr.completion_ids) for t in trees for tr in t.trajectories())
        return {"seconds": seconds, "sampled_tokens": sampled, "leaf_tokens": leaf}


class VllmPeer:
    """The vLLM worker process (benchmarks/peers_vllm.py in .venv-vllm), one JSON line each way."""

    def __init__(self, python: Path, spec: dict, workdir: Path, threads: int) -> None:
        spec_path = workdir / "vllm_spec.json"
        spec_path.write_text(json.dumps(spec))
        self.log_path = workdir / "vllm.log"
        env = vllm_env(python, threads)
        self.env_summary = {
            k: env.get(k)
            for k in (
                "LD_PRELOAD",
                "VLLM_CPU_OMP_THREADS_BIND",
                "VLLM_CPU_NUM_OF_RESERVED_CPU",
                "VLLM_CPU_KVCACHE_SPACE",
            )
        }
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(
            [str(python), str(Path(__file__).with_name("peers_vllm.py")), str(spec_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=workdir,
        )
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"vLLM worker exited (rc {self.proc.wait()}):\n{self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"vLLM worker failed:\n{reply['error']}\n{self.log_tail()}")
        return reply

    def run(self, name: str) -> dict:
        self.proc.stdin.write(json.dumps({"run": name}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def log_tail(self, lines: int = 10) -> str:
        """The log's last lines, after its last few error lines (the root cause is often there)."""
        self.log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        errors = [x for x in text if "Error:" in x][-3:]
        return "\n".join(["vLLM log, errors:", *errors, "vLLM log, last lines:", *text[-lines:]])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        self.log.close()


def check_tokens(side: str, w: Workload, r: dict) -> None:
    got, want = (r["leaf_tokens"], r["sampled_tokens"]), (w.leaf_tokens, w.sampled_tokens)
    if got != want:
        raise SystemExit(f"{w.name}: {side} sampled (leaf, unique) tokens {got}, expected {want}")


def best(runs: list[dict], w: Workload, floor_s: float) -> dict:
    top = min(runs, key=lambda r: r["seconds"])
    return {
        "seconds": top["seconds"],
        "all_seconds": [r["seconds"] for r in runs],
        "leaf_tokens": top["leaf_tokens"],
        "sampled_tokens": top["sampled_tokens"],
        "tokens_per_s": w.leaf_tokens / top["seconds"],
        "x_floor": top["seconds"] / floor_s,
    }


def print_table(title: str, rows: dict, gflops: float) -> None:
    print(f"\n{title}\nmatmul 2048^3: best {gflops:.0f} GFLOP/s; tokens/s counts leaf tokens")
    print(
        f"{'workload':<9}{'leaf/unique tokens':>19}{'floor s':>9} |{'ours s':>8}{'tok/s':>8}"
        f"{'x floor':>8} |{'vLLM s':>8}{'tok/s':>8}{'x floor':>8} |{'vLLM/ours':>10}"
    )
    for name, r in rows.items():
        o, v = r["ours"], r["vllm"]
        peer = (
            f"{v['seconds']:>8.2f}{v['tokens_per_s']:>8.0f}{v['x_floor']:>8.1f}"
            if v
            else f"{'-':>8}{'-':>8}{'-':>8}"
        )
        ratio = f"{r['vllm_over_ours']:>10.2f}" if v else f"{'-':>10}"
        print(
            f"{name:<9}{r['leaf_tokens']:>11}/{r['sampled_tokens']:<7}{r['floor_seconds']:>9.3f} |"
            f"{o['seconds']:>8.2f}{o['tokens_per_s']:>8.0f}{o['x_floor']:>8.1f} |{peer} |{ratio}"
        )


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workloads", default="flat,tree,long", help="comma list of flat,tree,long")
    ap.add_argument(
        "--workload", action="append", default=[], metavar="NAME=PROMPTS:LEN:WxS[,WxS...]",
        help="another workload (repeatable): e.g. small=2:1024:4x96, rounds of width x tokens",
    )
    ap.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=3, help="best of N, interleaved per workload")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a tiny model and workloads (smoke test)")
    ap.add_argument("--no-vllm", action="store_true", help="run ours only")
    ap.add_argument("--no-install", action="store_true", help="never create .venv-vllm")
    ap.add_argument("--out", default="results/peers.json")
    args = ap.parse_args(argv)
    names = [s for s in args.workloads.split(",") if s]
    unknown = set(names) - {"flat", "tree", "long"}
    if unknown or not (names or args.workload):
        ap.error(f"--workloads: unknown {sorted(unknown)}; expected a comma list of flat,tree,long")
    try:
        args.custom = [parse_workload(text) for text in args.workload]
    except ValueError as e:
        ap.error(str(e))
    taken = names + [w.name for w in args.custom]
    if len(set(taken)) < len(taken):
        ap.error(f"workload names must differ: {taken}")
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    args.names = names
    return args


def start_peer(
    args: argparse.Namespace, folder: Path, loads: list[Workload], prompts: dict, tmp: Path
) -> tuple[VllmPeer | None, str]:
    """The vLLM worker, loaded and warmed up on every workload; or None and why not."""
    if args.no_vllm:
        return None, "skipped: --no-vllm"
    python, status = vllm_python(args.no_install)
    if python is None:
        return None, status
    spec = {
        "model": str(folder),
        "dtype": args.dtype,
        "max_model_len": max(w.prompt_len + w.max_new_tokens for w in loads),
        "max_num_seqs": 256,  # every sequence of a round in one batch, as ours
        "workloads": {
            w.name: {
                "prompts": prompts[w.name],
                "widths": list(w.widths),
                "segments": list(w.segments),
            }
            for w in loads
        },
    }
    print("starting vLLM (load + warm-up on every workload)...", flush=True)
    try:
        return VllmPeer(python, spec, tmp, args.threads), "ran"
    except (RuntimeError, OSError) as e:
        return None, f"vLLM failed to start: {e}"


def time_interleaved(
    ours: Ours,
    peer: VllmPeer | None,
    loads: list[Workload],
    prompts: dict,
    repeats: int,
    dtype: torch.dtype,
) -> tuple[dict, list[float], str | None]:
    """Runs ours, vLLM, ours, vLLM ... per workload; the matmul rate before and after each.

    Returns the runs per workload and side, the rate samples, and why vLLM stopped (or None).
    """
    rates = [matmul_gflops(dtype)]
    raw: dict[str, dict[str, list[dict]]] = {}
    failure = None
    for w in loads:
        raw[w.name] = {"ours": [], "vllm": []}
        for i in range(repeats):
            settle()
            r = ours.run(w, prompts[w.name])
            check_tokens("ours", w, r)
            raw[w.name]["ours"].append(r)
            msg = f"  {w.name} run {i + 1}: ours {r['seconds']:.2f} s"
            if peer is not None and failure is None:
                try:
                    settle()
                    v = peer.run(w.name)
                except RuntimeError as e:  # keep ours going; the report says what happened
                    failure = f"vLLM failed on {w.name}: {e}"
                    msg += f"\nNOTE: {failure}"
                else:
                    check_tokens("vLLM", w, v)
                    raw[w.name]["vllm"].append(v)
                    msg += f", vLLM {v['seconds']:.2f} s"
            print(msg, flush=True)
        rates.append(matmul_gflops(dtype))
    return raw, rates, failure


def summarize(cfg, loads: list[Workload], raw: dict, gflops: float) -> dict:
    """Per workload: the floor, each side's best run and its distance from the floor."""
    rows = {}
    for w in loads:
        flops = floor_flops(cfg, w)
        floor_s = flops["total"] / (gflops * 1e9)
        o = best(raw[w.name]["ours"], w, floor_s)
        v = best(raw[w.name]["vllm"], w, floor_s) if raw[w.name]["vllm"] else None
        rows[w.name] = {
            "workload": w.describe(),
            "leaf_tokens": w.leaf_tokens,
            "sampled_tokens": w.sampled_tokens,
            "floor_flops": flops,
            "floor_seconds": floor_s,
            "ours": o,
            "vllm": v,
            "vllm_over_ours": v["seconds"] / o["seconds"] if v else None,
        }
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    t0 = time.perf_counter()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    loads = [workloads(args.quick)[n] for n in args.names] + args.custom
    model_kw = dict(BENCH_LLAMA, max_position_embeddings=8192)
    if args.quick:
        # head_dim stays 64: vLLM's CPU attention has kernels for a few head sizes only (not 16)
        model_kw.update(
            hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4
        )
    gen = torch.Generator().manual_seed(0)
    prompts = {
        w.name: torch.randint(
            0, model_kw["vocab_size"], (w.n_prompts, w.prompt_len), generator=gen
        ).tolist()
        for w in loads
    }
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        folder = Path(tmp) / "model"
        tiny_model("llama", seed=0, **model_kw).save_pretrained(folder)  # fp32 on disk
        # 1. vLLM first: it loads the folder and warms up on every workload, alone on the cores.
        peer, status = start_peer(args, folder, loads, prompts, Path(tmp))
        vllm_info = dict(peer.info, env=peer.env_summary) if peer is not None else None
        if peer is None:
            print(f"NOTE: {status}", flush=True)
        # 2. Ours: load the same folder, warm up on every workload. The startup heap is frozen
        #    for Python's cycle collector, as vLLM's engine core does with its own
        #    (freeze_gc_heap): unfrozen, a full collection scans torch's and transformers'
        #    objects every few runs (166 ms inside one bf16 tree run, measured with gc.callbacks).
        ours = Ours(folder, dtype, loads)
        gc.collect()
        gc.freeze()
        for w in loads:
            check_tokens("ours (warm-up)", w, ours.run(w, prompts[w.name]))
        # 3. Timed, interleaved.
        raw, rates, failure = time_interleaved(ours, peer, loads, prompts, args.repeats, dtype)
        gc.unfreeze()  # as vLLM's shutdown does: the heap is the collector's again
        status = failure or status
        if peer is not None:
            peer.close()
    gflops = max(rates)
    rows = summarize(ours.model.config, loads, raw, gflops)
    title = (
        f"tiny Llama h{model_kw['hidden_size']} x {model_kw['num_hidden_layers']} layers, "
        f"{args.dtype}, {args.threads} threads, best of {args.repeats}, "
        f"{platform.processor() or platform.machine()}; vLLM: {status}"
    )
    print_table(title, rows, gflops)
    report = {
        "model": model_kw,
        "dtype": args.dtype,
        "threads": args.threads,
        "repeats": args.repeats,
        "quick": args.quick,
        "matmul_gflops": {"best": gflops, "samples": rates, "shape": [2048, 2048, 2048]},
        "vllm": {"status": status, "info": vllm_info},
        "workloads": rows,
        "wall_seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} ({report['wall_seconds']:.0f} s in all)")
    return report


if __name__ == "__main__":
    main()
