"""Rows/s through ``OpenAICompatibleBackend`` (HTTP) vs the in-process ``TransformersBackend``.

Same tiny models (built here, as the tests build them), same rows, side by side in one run:

- teacher scoring (``LlamaGuardTeacher``, one verdict step per row) and prefilled generation
  (``max_new_tokens`` per row, greedy);
- ``in-process``: ``TransformersBackend`` in this process, batched (``--batch-size``);
- ``direct``: the loopback server's own model call for one row, in this process, no HTTP: what the
  server computes per request;
- ``http cN``: ``OpenAICompatibleBackend`` against the loopback vLLM-shaped server
  (tests/vllm_shaped_server.py) in its own process, N requests in flight.

The loopback server runs one request at a time on the CPU (vLLM batches concurrent requests on a
GPU), so ``http`` minus ``direct`` is the price of HTTP + JSON + the client per row, and concurrency
can only hide that price behind the server's compute, not add compute. Client CPU is this process's
CPU time; server CPU is read with psutil.

    python -m benchmarks.remote_backend [--rows 64] [--gen-rows 32] [--max-new-tokens 16] [--concurrency 1 8]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    RESULTS_DIR,
    free_port,
    machine_info,
    markdown_table,
    process_cpu_s,
    write_results,
)
from harmaug_pl.backends import OpenAICompatibleBackend, SamplingConfig, TransformersBackend
from harmaug_pl.teachers.llama_guard import LlamaGuardTeacher
from tests.tiny_models import GUARD_TEMPLATE, save_tiny_llama
from tests.vllm_shaped_server import ServerState, run_model, spawn

NAME = "remote_backend"
PREFIX = "Sure, here is"
# mild, clearly fake placeholder rows
PROMPTS = [
    "How do I bake bread?",
    "Tell me a mean placeholder insult.",
    "What is the capital of France?",
    "Write a rude joke about placeholder people.",
]


def measure(
    work: Callable[[], Any], rows: int, repeats: int, server_pid: int | None = None
) -> dict[str, float]:
    """Median wall time, client and server CPU time of ``repeats`` passes (CPU contention makes one noisy)."""
    walls, cpus, servers = [], [], []
    for _ in range(repeats):
        server_before = process_cpu_s(server_pid) if server_pid else 0.0
        cpu, wall = time.process_time(), time.perf_counter()
        work()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        servers.append(process_cpu_s(server_pid) - server_before if server_pid else 0.0)
    wall = statistics.median(walls)
    result = {
        "rows": rows,
        "wall_s": round(wall, 3),
        "wall_s_all": [round(w, 3) for w in walls],
        "rows_per_s": round(rows / wall, 2),
        "client_cpu_s": round(statistics.median(cpus), 2),
    }
    if server_pid:
        result["server_cpu_s"] = round(statistics.median(servers), 2)
    return result


def rows_for(n: int) -> tuple[list[str], list[str | None]]:
    prompts = [f"{PROMPTS[i % len(PROMPTS)]} (placeholder {i})" for i in range(n)]
    return prompts, [None if i % 2 == 0 else "I'm sorry, but I can't help with that." for i in range(n)]


def chats_for(n: int) -> list[list[dict[str, str]]]:
    return [
        [
            {"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} (placeholder {i})"},
            {"role": "assistant", "content": PREFIX},
        ]
        for i in range(n)
    ]


def guard_chats(prompts: list[str], responses: list[str | None]) -> list[list[dict[str, str]]]:
    """What ``LlamaGuardTeacher`` sends for each row."""
    return [
        [{"role": "user", "content": p}] + ([] if r is None else [{"role": "assistant", "content": r}])
        for p, r in zip(prompts, responses)
    ]


def timed_stage(
    backend: Any, task: str, rows: tuple, sampling: SamplingConfig, batch_size: int
) -> Callable[[], Any]:
    """One pass over the rows, in stage batches of ``batch_size``, as the pipeline sends them."""
    if task == "score":
        teacher = LlamaGuardTeacher(backend, batch_size=batch_size)
        return lambda: teacher.score(*rows)
    chats = rows[0]
    return lambda: [
        backend.generate(chats[i : i + batch_size], sampling, seed=0)
        for i in range(0, len(chats), batch_size)
    ]


def direct_calls(state: ServerState, encoded: list[list[int]], body: dict[str, Any], steps: int) -> list:
    return [run_model(state, ids, body, steps) for ids in encoded]


def run(
    rows: int,
    gen_rows: int,
    max_new_tokens: int,
    concurrency: list[int],
    batch_size: int,
    repeats: int,
    out_dir: str,
) -> dict[str, Any]:
    torch.set_num_threads(1)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0)
    prompts, responses = rows_for(rows)
    work = {"score": (prompts, responses), "generate": (chats_for(gen_rows),)}
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = {
            "score": save_tiny_llama(Path(tmp) / "guard", chat_template=GUARD_TEMPLATE, seed=1),
            "generate": save_tiny_llama(Path(tmp) / "llama"),
        }
        for task, model in models.items():
            count = rows if task == "score" else gen_rows
            local = TransformersBackend(str(model))
            stage = timed_stage(local, task, work[task], sampling, batch_size)
            reference = stage()  # loads the model and warms up outside the timing; the reference output
            results.append(
                {
                    "task": task,
                    "mode": f"in-process batch {batch_size}",
                    "concurrency": "-",
                    **measure(stage, count, repeats),
                }
            )

            # the server's own per-request model call on the same token ids, without HTTP
            state = ServerState(str(model), "m", str(model))
            if task == "score":
                verdicts = [local.first_token_id("unsafe"), local.first_token_id("safe")]
                texts = local.render(
                    guard_chats(prompts, responses), add_generation_prompt=False, suffix="\n\n"
                )
                body, steps = {"temperature": 0.0, "logprobs": 2, "logprob_token_ids": verdicts}, 1
            else:
                texts = local.render(work[task][0])
                body, steps = {"temperature": 0.0}, max_new_tokens
            encoded = [local.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
            direct = measure(functools.partial(direct_calls, state, encoded, body, steps), count, repeats)
            results.append(
                {"task": task, "mode": "direct (server's model call)", "concurrency": "-", **direct}
            )
            local.close()

            port = free_port()
            server = spawn(model, port, "m")
            try:
                for n in concurrency:
                    remote = OpenAICompatibleBackend(
                        f"http://127.0.0.1:{port}/v1", "m", str(model), max_concurrency=n
                    )
                    remote.describe()  # /models and /tokenize once, outside the timing
                    stage = timed_stage(remote, task, work[task], sampling, batch_size)
                    stage()  # warm-up (connections, server caches)
                    timing = measure(stage, count, repeats, server.pid)
                    row = {"task": task, "mode": "http (vLLM-shaped loopback)", "concurrency": n, **timing}
                    output = stage()
                    if task == "score":
                        row["max_abs_score_diff"] = max(abs(a - b) for a, b in zip(output, reference))
                    else:
                        row["same_text_as_in_process"] = output == reference
                    results.append(row)
                    remote.close()
            finally:
                server.kill()
                server.wait()
    for task in models:
        mine = [r for r in results if r["task"] == task]
        local_rate, direct = mine[0]["rows_per_s"], mine[1]
        for r in mine:
            r["vs_in_process"] = round(r["rows_per_s"] / local_rate, 3)
            if r["mode"].startswith("http"):
                # wall: what a row waits for beyond the model call; CPU: what HTTP costs each side
                r["wall_overhead_ms_per_row"] = round((r["wall_s"] - direct["wall_s"]) / r["rows"] * 1000, 2)
                r["client_cpu_ms_per_row"] = round(r["client_cpu_s"] / r["rows"] * 1000, 2)
                extra = r["server_cpu_s"] - direct["client_cpu_s"]
                r["server_extra_cpu_ms_per_row"] = round(extra / r["rows"] * 1000, 2)
    data = {"machine": machine_info(), "load_avg_1_5_15": os.getloadavg(), "results": results}
    headers = ["task", "mode", "concurrency", "rows", "wall s (median)", "rows/s", "x in-process",
               "wall overhead ms/row vs direct", "client CPU ms/row",
               "server CPU ms/row over the model call"]  # fmt: skip
    table = markdown_table(
        headers,
        [[r["task"], r["mode"], r["concurrency"], r["rows"], r["wall_s"], r["rows_per_s"], r["vs_in_process"],
          r.get("wall_overhead_ms_per_row", "-"), r.get("client_cpu_ms_per_row", "-"),
          r.get("server_extra_cpu_ms_per_row", "-")] for r in results],
    )  # fmt: skip
    note = f"\n\nLoad average at the end (1/5/15 min): {data['load_avg_1_5_15']}; CPUs: {os.cpu_count()}."
    write_results(NAME, data, f"# {NAME}\n\n{table}{note}", out_dir)
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=64, help="teacher rows")
    parser.add_argument("--gen-rows", type=int, default=32, help="prefilled chats to continue")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--batch-size", type=int, default=8, help="stage batch (in-process batch size)")
    parser.add_argument("--repeats", type=int, default=3, help="passes per mode; the median is reported")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    return run(
        args.rows,
        args.gen_rows,
        args.max_new_tokens,
        args.concurrency,
        args.batch_size,
        args.repeats,
        args.out_dir,
    )


if __name__ == "__main__":
    main()
