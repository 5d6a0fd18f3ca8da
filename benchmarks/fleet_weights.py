"""What a fleet-wide weight update costs per GB: numpy views through Ray's object store (ours)
against torch tensors through it (Ray's default pickling), on one local fleet.

Workload: a Llama of about `--gb` GB in float32 (random weights saved as a Hugging Face folder,
served by `--replicas` replicas of 1 thread). Ours is the fleet's own path, timed by the front
(`/stats` `last_update`): `ray.put` of the packed state dict, each replica's get from the object
store, and its load (waiting for queued requests, `load_state_dict`, flushing the prefix cache);
plus, as a caller sees it, `Client.update_weights(path=...)` end to end (the front reads the
.safetensors file, puts it, every replica gets and loads it); `--upload` also times the upload
of the state dict (POST /weights), which is bound by the HTTP server's body parsing (uvicorn
read 256 MB in 11 s here). The baseline puts the torch state dict as is and calls each
replica's `update_weights` with it (Ray resolves the reference: get then load).
Each path runs `--repeats` times; the table shows the medians in seconds per GB.
Usage: python benchmarks/fleet_weights.py [--gb 1] [--replicas 2] [--out results/fleet_weights.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from safetensors.torch import save_file

import rollout
from rollout.fleet import start_fleet
from rollout.tiny import tiny_model


def model_of(gb: float) -> torch.nn.Module:
    """A tiny-family Llama with about `gb` GB of float32 parameters (hidden 1024, 51 MB/layer)."""
    layers = max(1, round(gb * 2**30 / (4 * 12.6e6)))
    return tiny_model(
        "llama",
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=4096,
    )


def ours(fleet, state: dict | str, repeats: int) -> dict[str, list[float]]:
    """The fleet's path from a state dict (uploaded) or a .safetensors path (read by the front)."""
    rows: dict[str, list[float]] = {}
    with rollout.Client(fleet.url, timeout=3600) as client:
        for _ in range(repeats):
            began = time.perf_counter()
            if isinstance(state, str):
                client.update_weights(path=state)
            else:
                client.update_weights(state)
            rows.setdefault("client_s", []).append(time.perf_counter() - began)
            for name, value in client.stats()["last_update"].items():
                rows.setdefault(name, []).append(value)
    return rows


def baseline(fleet, state: dict, repeats: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {}
    version = 1000  # the replicas' own version; the front is not told (the benchmark ends here)
    for _ in range(repeats):
        began = time.perf_counter()
        ref = ray.put(state)
        put = time.perf_counter()
        loaded = ray.get([a.update_weights.remote(ref, version) for a in fleet.actors])
        done = time.perf_counter()
        load = max(x.load_s for x in loaded)
        rows.setdefault("put_s", []).append(put - began)
        rows.setdefault("get_s", []).append(done - put - load)  # Ray's get, before the call
        rows.setdefault("load_s", []).append(load)
        version += 1
        del ref
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--upload", action="store_true", help="also time POST /weights (slow)")
    ap.add_argument("--out", default="results/fleet_weights.json")
    args = ap.parse_args()
    model = model_of(args.gb)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gb = sum(t.numel() * t.element_size() for t in state.values()) / 2**30
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        path = str(Path(folder) / "update.safetensors")
        save_file(state, path)
        with start_fleet(folder, args.replicas, threads=1, kv_budget="64M") as fleet:
            rows = {"ours (file)": ours(fleet, path, args.repeats)}
            if args.upload:
                rows["ours (upload)"] = ours(fleet, state, args.repeats)
            rows["torch pickled"] = baseline(fleet, state, args.repeats)
    medians = {path: {k: statistics.median(v) for k, v in r.items()} for path, r in rows.items()}
    print(
        f"\n{gb:.2f} GB state dict (float32), {args.replicas} replicas, 1 thread each, "
        f"{platform.machine()}; medians of {args.repeats}, seconds per GB"
    )
    print(f"{'path':15} {'put':>6} {'get':>6} {'load':>6} {'put+get+load':>13} {'client':>7}")
    for path, m in medians.items():
        total = m["put_s"] + m["get_s"] + m["load_s"]
        client = f"{m['client_s'] / gb:>7.2f}" if "client_s" in m else f"{'-':>7}"
        print(
            f"{path:15} {m['put_s'] / gb:>6.2f} {m['get_s'] / gb:>6.2f} {m['load_s'] / gb:>6.2f} "
            f"{total / gb:>13.2f} {client}"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"args": vars(args), "gb": gb, "rows": rows, "medians": medians}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
