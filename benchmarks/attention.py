"""Benchmark: one decode step of shared-prefix attention, cascade against flat baselines.

B sequences share a P-token prefix and each owns a 128-token suffix (its last key is the token
being decoded); 8 query heads, 2 KV heads, head dim 128. Methods, all on the same inputs:

- naive:     each sequence's KV materialized (the prefix copied B times) and attended by
             transformers' own eager attention (`eager_attention_forward`, what
             attn_implementation="eager" runs: repeat_kv, softmax(q K^T) V). Ratios are against it.
- naive-gqa: a stronger naive over the same expanded KV: a KV head's query heads stacked into one
             matrix, so GQA copies nothing; plain torch matmul, softmax, matmul
- sdpa:      torch's scaled_dot_product_attention over the same expanded KV (enable_gqa)
- torch:     our cascade reference over the paged pool (the prefix stored once)
- triton:    our Triton kernels (CUDA only; skipped without a GPU)

Methods are timed round-robin (one call of each per round, medians over rounds), so a machine
whose speed drifts during the run (CPU frequency, neighbours on a VM) shifts every method alike.

The memory-traffic bound is the time to read every KV byte that must be read once (the prefix
once, every suffix once) at the copy bandwidth measured here ((read + write) / time of a large
copy). Attention's arithmetic sets a second floor, the compute bound: its FLOPs (4 * B * H * L * D,
the same for every method) at the matmul rate measured here; on a CPU the cascade meets that one
first. A method whose KV (naive: after repeat_kv) exceeds --mem-cap-gb is skipped with a note.
Writes results/attention.json.

    python benchmarks/attention.py [--quick] [--mem-cap-gb 3]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tree_kernels.cascade import cascade_attention
from tree_kernels.plan import CascadePlan, Row, Segment, plan_cascade

HEADS, KV_HEADS, HEAD_DIM, SUFFIX, BLOCK_SIZE = 8, 2, 128, 128, 16


@dataclass
class Inputs:
    q: torch.Tensor  # [B, H, D] one decode query per sequence
    k_pool: torch.Tensor  # [slots, KVH, D] prefix blocks, then each sequence's suffix blocks
    v_pool: torch.Tensor
    plan: CascadePlan
    k_flat: torch.Tensor | None  # [B, KVH, P + SUFFIX, D] expanded per sequence (None if skipped)
    v_flat: torch.Tensor | None


@dataclass
class Result:
    batch: int
    prefix: int
    method: str
    seconds: float
    vs_naive: float | None  # naive (transformers eager) seconds / this method's seconds
    vs_naive_gqa: float | None  # naive-gqa seconds / this method's seconds
    gb_per_s: float  # bytes that must be read once / seconds
    vs_bound: float  # seconds / memory-traffic bound
    vs_compute: float  # seconds / compute bound


def make_inputs(batch: int, prefix: int, dtype: torch.dtype, device: str, expand: bool) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(0)
    p_blocks, s_blocks = -(-prefix // BLOCK_SIZE), -(-SUFFIX // BLOCK_SIZE)
    slots = (p_blocks + batch * s_blocks) * BLOCK_SIZE
    shape = (slots, KV_HEADS, HEAD_DIM)
    k_pool = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    v_pool = torch.randn(shape, generator=gen, device=device, dtype=dtype)
    q = torch.randn(batch, HEADS, HEAD_DIM, generator=gen, device=device, dtype=dtype)
    segments = [Segment(blocks=range(p_blocks), length=prefix)]
    rows = []
    for b in range(batch):
        first = p_blocks + b * s_blocks
        segments.append(Segment(blocks=range(first, first + s_blocks), length=SUFFIX))
        rows.append(Row(q_start=b, q_len=1, path=[0, b + 1]))
    plan = plan_cascade(segments, rows, BLOCK_SIZE, device=device)
    k_flat = v_flat = None
    if expand:
        suffix = torch.arange(SUFFIX, device=device)
        own = (p_blocks * BLOCK_SIZE + torch.arange(batch, device=device)[:, None]
               * s_blocks * BLOCK_SIZE + suffix)  # [B, SUFFIX] slots
        idx = torch.cat([torch.arange(prefix, device=device).expand(batch, prefix), own], 1)
        k_flat = k_pool[idx].transpose(1, 2).contiguous()  # [B, L, KVH, D] -> [B, KVH, L, D]
        v_flat = v_pool[idx].transpose(1, 2).contiguous()
    return Inputs(q, k_pool, v_pool, plan, k_flat, v_flat)


class _EagerModule(torch.nn.Module):
    """The two attributes transformers' eager attention reads from its attention module."""

    num_key_value_groups = HEADS // KV_HEADS


_EAGER = _EagerModule().eval()


def naive(x: Inputs, scale: float) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import eager_attention_forward

    out, _ = eager_attention_forward(_EAGER, x.q[:, :, None], x.k_flat, x.v_flat, None, scale)
    return out[:, 0]  # [B, 1, H, D] -> [B, H, D]


def naive_gqa(x: Inputs, scale: float) -> torch.Tensor:
    B, rep = x.q.shape[0], HEADS // KV_HEADS
    q = x.q.float().view(B, KV_HEADS, rep, HEAD_DIM)  # the query heads of one KV head stack
    scores = torch.matmul(q, x.k_flat.float().transpose(-1, -2)) * scale  # [B, KVH, rep, L]
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, x.v_flat.float()).view(B, HEADS, HEAD_DIM).to(x.q.dtype)


def sdpa(x: Inputs, scale: float) -> torch.Tensor:
    q = x.q[:, :, None, :]  # [B, H, 1, D]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, x.k_flat, x.v_flat, scale=scale, enable_gqa=True
    )
    return out[:, :, 0]


def ours(impl: str) -> Callable[[Inputs, float], torch.Tensor]:
    def run(x: Inputs, scale: float) -> torch.Tensor:
        return cascade_attention(x.q, x.k_pool, x.v_pool, x.plan, scale, impl=impl)

    return run


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str, budget_s: float, min_reps: int = 3) -> float:
    """Median seconds per call after one warm-up call, repeating within `budget_s`."""
    return timeit_round_robin({"fn": fn}, device, budget_s, min_reps)["fn"]


def timeit_round_robin(fns: dict[str, Callable[[], object]], device: str, budget_s: float,
                       min_reps: int = 3) -> dict[str, float]:
    """Median seconds per call of each function, calling them in turn, one call each per round,
    after one warm-up round; rounds repeat within `budget_s` per function (at most 100)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    sync(device)
    start = time.perf_counter()
    while True:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        rounds = len(times[next(iter(fns))])
        spent = time.perf_counter() - start
        if rounds >= min_reps and (spent >= budget_s * len(fns) or rounds >= 100):
            break
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def copy_bandwidth(device: str, nbytes: int = 1 << 28, budget_s: float = 1.0) -> float:
    """Bytes moved (read + write) per second by a large copy into a preallocated tensor."""
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = timeit(lambda: dst.copy_(src), device, budget_s, min_reps=5)
    return 2 * nbytes / seconds


def matmul_rate(device: str, dtype: torch.dtype, n: int = 1024, budget_s: float = 1.0) -> float:
    """FLOP/s of one n x n x n matrix product in `dtype`."""
    a = torch.randn(n, n, device=device).to(dtype)
    seconds = timeit(lambda: a @ a, device, budget_s, min_reps=5)
    return 2 * n**3 / seconds


def bench_one(batch: int, prefix: int, args: argparse.Namespace, bandwidth: float,
              flop_rate: float) -> list[Result]:
    dtype = getattr(torch, args.dtype)
    elem = torch.finfo(dtype).bits // 8
    flat_bytes = 2 * batch * (prefix + SUFFIX) * KV_HEADS * HEAD_DIM * elem
    cap = args.mem_cap_gb * 1e9
    expand = flat_bytes <= cap
    repeated = flat_bytes * (1 + HEADS // KV_HEADS)  # naive holds the KV and its repeat_kv copy
    skipped = ("naive, naive-gqa and sdpa" if not expand
               else "naive" if repeated > cap else None)
    if skipped:
        need = flat_bytes if not expand else repeated
        print(f"  B={batch} P={prefix}: {need / 1e9:.1f} GB of expanded KV > --mem-cap-gb "
              f"{args.mem_cap_gb}: {skipped} skipped")
    x = make_inputs(batch, prefix, dtype, args.device, expand)
    scale = HEAD_DIM**-0.5
    methods: dict[str, Callable[[Inputs, float], torch.Tensor]] = {}
    if expand and repeated <= cap:
        methods["naive"] = naive
    if expand:
        methods.update({"naive-gqa": naive_gqa, "sdpa": sdpa})
    methods["torch"] = ours("torch")
    if args.device == "cuda":
        methods["triton"] = ours("triton")
    must_read = 2 * (prefix + batch * SUFFIX) * KV_HEADS * HEAD_DIM * elem
    bound = must_read / bandwidth
    compute = 4 * batch * HEADS * (prefix + SUFFIX) * HEAD_DIM / flop_rate
    reference = None
    for name, fn in methods.items():  # every method must agree before its time counts
        out = fn(x, scale).float()
        if reference is None:
            reference = out
        err = (out - reference).abs().max().item()
        assert err < (1e-3 if dtype == torch.float32 else 3e-2), f"{name}: max error {err}"
    del out, reference
    seconds = timeit_round_robin(
        {name: (lambda fn=fn: fn(x, scale)) for name, fn in methods.items()},
        args.device, args.budget_s)
    results = [Result(batch, prefix, name, secs, None, None, must_read / secs / 1e9,
                      secs / bound, secs / compute) for name, secs in seconds.items()]
    for r in results:
        for attr, base in (("vs_naive", seconds.get("naive")),
                           ("vs_naive_gqa", seconds.get("naive-gqa"))):
            setattr(r, attr, None if base is None else base / r.seconds)
    return results


def print_table(results: list[Result]) -> None:
    print(f"{'B':>4} {'P':>6} {'method':>9} {'seconds':>10} {'x naive':>8} {'x n-gqa':>8} "
          f"{'GB/s':>7} {'x bound':>8} {'x flops':>8}")
    for r in results:
        speedup, gqa = ("-" if v is None else f"{v:.1f}" for v in (r.vs_naive, r.vs_naive_gqa))
        print(f"{r.batch:>4} {r.prefix:>6} {r.method:>9} {r.seconds:>10.5f} {speedup:>8} "
              f"{gqa:>8} {r.gb_per_s:>7.1f} {r.vs_bound:>8.1f} {r.vs_compute:>8.1f}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, short timings")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--mem-cap-gb", type=float, default=3.0, help="max expanded KV bytes")
    parser.add_argument("--budget-s", type=float, default=None, help="timing budget per method")
    parser.add_argument("--grid", default=None, help="e.g. 64x4096,16x1024 (default: full grid)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="results/attention.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.quick:
        grid = [(4, 256), (16, 1024)]
    else:
        grid = [(b, p) for b in (16, 64, 256) for p in (1024, 4096, 16384)]
    if args.budget_s is None:
        args.budget_s = 0.05 if args.quick else 1.0
    if args.grid:
        grid = [tuple(int(n) for n in item.split("x")) for item in args.grid.split(",")]
    bandwidth = copy_bandwidth(args.device, 1 << 24 if args.quick else 1 << 28, args.budget_s)
    flop_rate = matmul_rate(args.device, getattr(torch, args.dtype), 256 if args.quick else 1024,
                            args.budget_s)
    print(f"{args.device} {args.dtype}: copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write), "
          f"matmul {flop_rate / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads; "
          f"H={HEADS} KVH={KV_HEADS} D={HEAD_DIM} suffix={SUFFIX} block={BLOCK_SIZE}")
    results = [r for b, p in grid for r in bench_one(b, p, args, bandwidth, flop_rate)]
    print_table(results)
    report = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "copy_gb_per_s": bandwidth / 1e9,
        "matmul_gflop_per_s": flop_rate / 1e9,
        "shape": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "suffix": SUFFIX,
                  "block_size": BLOCK_SIZE},
        "results": [asdict(r) for r in results],
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"wrote {args.out}")
    assert all(math.isfinite(r.seconds) for r in results)
    return report


if __name__ == "__main__":
    main()
