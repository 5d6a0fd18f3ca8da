"""The vLLM side of benchmarks/peers.py: a worker run by `.venv-vllm`'s python, not ours.

Design decisions:
- One process for the whole benchmark, kept alive and driven over stdin (one JSON command a
  line), so `peers.py` can interleave ours and vLLM run by run without paying vLLM's start-up
  (model load, engine process, KV allocation) per repeat, and both sides run warm.
- Replies go to the stdout it was started with; everything else printed (vLLM's logs, its engine
  process's output) is moved to stderr, which the parent sends to a log file, so a log line can
  never be mistaken for a reply.
- A workload is a branching schedule: `widths[k]` children per sequence in round k, each sampling
  exactly `segments[k]` tokens (ignore_eos, min_tokens = max_tokens). A flat group is one round
  with n = group size; a tree is one round per level, each round's prompts being the previous
  round's prompt + output, with prefix caching reusing what it can of the KV.
- Only stdlib and vllm are imported: this file must not depend on our venv.

Usage (by peers.py): python peers_vllm.py SPEC.json, then lines {"run": NAME} or {"quit": true};
each answered by one JSON line. SPEC: {"model", "dtype", "max_model_len", "max_num_seqs",
"workloads": {NAME: {"prompts", "widths", "segments"}}}.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback


def sample_rounds(llm, sampling_params, tokens_prompt, workload: dict) -> dict:
    """Run one workload's rounds; return the time and the token counts both sides must match."""
    seqs = [list(p) for p in workload["prompts"]]  # each round's prompts
    path_new = [0] * len(seqs)  # tokens sampled so far along each sequence's path
    sampled = 0
    start = time.perf_counter()
    for n, k in zip(workload["widths"], workload["segments"], strict=True):
        params = sampling_params(
            n=n,
            max_tokens=k,
            min_tokens=k,
            ignore_eos=True,
            detokenize=False,
            logprobs=0,  # ours records each sampled token's log-prob too
            temperature=1.0,
        )
        prompts = [tokens_prompt(prompt_token_ids=s) for s in seqs]
        outs = llm.generate(prompts, params, use_tqdm=False)
        next_seqs, next_new = [], []
        for seq, new, out in zip(seqs, path_new, outs, strict=True):
            for completion in out.outputs:
                ids = list(completion.token_ids)
                next_seqs.append(seq + ids)
                next_new.append(new + len(ids))
                sampled += len(ids)
        seqs, path_new = next_seqs, next_new
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "sampled_tokens": sampled, "leaf_tokens": sum(path_new)}


def serve(spec: dict, reply) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model=spec["model"],
        skip_tokenizer_init=True,
        enable_prefix_caching=True,
        dtype=spec["dtype"],
        max_model_len=spec["max_model_len"],
        max_num_seqs=spec["max_num_seqs"],
        seed=0,
    )
    load_seconds = time.perf_counter() - start
    warmup = {}
    for name, workload in spec["workloads"].items():  # same shapes as the timed runs
        llm.reset_prefix_cache()
        warmup[name] = sample_rounds(llm, SamplingParams, TokensPrompt, workload)["seconds"]
    import vllm

    cache = llm.llm_engine.vllm_config.cache_config
    sched = llm.llm_engine.vllm_config.scheduler_config
    reply(
        {
            "ready": True,
            "vllm_version": vllm.__version__,
            "load_seconds": load_seconds,
            "warmup_seconds": warmup,
            "block_size": cache.block_size,
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "kv_cache_space_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        }
    )
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("quit"):
            break
        try:
            llm.reset_prefix_cache()  # every timed run starts cold, as ours does
            reply(sample_rounds(llm, SamplingParams, TokensPrompt, spec["workloads"][cmd["run"]]))
        except Exception:  # report and keep serving: the parent decides what to do
            reply({"error": traceback.format_exc()})


def main() -> None:
    # NOTE: keep the real stdout for replies, point fd 1 at stderr before vllm is imported, so
    # every log line of this process and its children goes to the parent's log file.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def reply(obj: dict) -> None:
        channel.write(json.dumps(obj) + "\n")
        channel.flush()

    with open(sys.argv[1]) as f:
        spec = json.load(f)
    try:
        serve(spec, reply)
    except Exception:
        reply({"error": traceback.format_exc()})
        raise


if __name__ == "__main__":
    main()
