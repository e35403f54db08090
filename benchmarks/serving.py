"""Serving under load: ``harmaug serve`` on loopback, micro-batching vs batch size 1, eager/ONNX/int8.

Part 1, why batching pays or not (in-process, no HTTP): CPU time per row of the student at batch 1,
in batches of 32 rows padded to their longest row (one forward pass, what the cost table's
"batched" column did), and the same 32 rows in length-sorted forward passes of ``--forward-batch``;
plus the fixed cost of one forward pass (one 8-token row) and the padding each rule adds.

Part 2, load (HTTP): per format, servers started identically but for their batching settings, each
its own process (``python -m harmaug_pl.deploy.serve``, same ``--threads``), all up at once;
``--clients`` concurrent clients each send one-row ``/v1/moderations`` requests back to back for
``--duration`` seconds (eval-set prompts, in turn), then stop. The arms take turns, ``--repeats``
rounds of all of them, so a change in the machine's other load falls on every arm alike; the ratios
are given as the median and range over the rounds. Reported: rows/s, p50/p95/p99 latency, errors,
rows per model call, model time per row (the server's own ``harmaug_model_seconds``: tokenise +
forward) apart from the server's whole CPU time per row (the difference is HTTP, JSON and
scheduling), the load generator's CPU, and the server's RSS before and after. The ratio that
matters: rows/s of the micro-batching server vs the batch-size-1 server at the most clients, per
round, same run.

Part 3, fairness: the default server gets the largest request its limits allow (``max_rows`` rows of
``max_chars`` characters, as many as fit in ``max_body_bytes``), and 0.3 s later a one-row request;
reported: how long the one-row request took, and the large one.

    python -m benchmarks.serving [--student runs/cpu_tiny/student] [--duration 10] [--threads 1] [--repeats 3]

On a shared machine wall-clock rates move with the other load; CPU time per row moves much less.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx2
import torch
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.common import (
    DEFAULT_PACK,
    RESULTS_DIR,
    free_port,
    machine_info,
    markdown_table,
    pack_config,
    process_cpu_s,
    process_rss_mib,
    stop_process_group,
    write_results,
)
from benchmarks.cost_profile import prepare_student
from harmaug_pl.data.encoding import tokenize_rows
from harmaug_pl.data.loaders import DataSource, load_examples
from harmaug_pl.deploy.export import INT8_FILE, ONNX_FILE
from harmaug_pl.deploy.guard import Guard
from harmaug_pl.deploy.serve import ServeSettings

NAME = "serving"
REPO = Path(__file__).resolve().parent.parent
FORMATS = {"eager": None, "ONNX": ONNX_FILE, "ONNX int8": INT8_FILE}


# -- part 1: the model alone --------------------------------------------------------------------
def cpu_s() -> float:
    return time.process_time()


def per_row(run: Any, rows: int, repeat: int = 2) -> float:
    """Least CPU ms per row over ``repeat`` runs (the least is the one other load disturbed least)."""
    best = float("inf")
    for _ in range(repeat):
        started = cpu_s()
        run()
        best = min(best, (cpu_s() - started) * 1000 / rows)
    return best


def padded_tokens(lengths: list[int], forward: int) -> int:
    """Tokens fed when ``lengths`` go through length-sorted forward passes of ``forward`` rows."""
    ordered = sorted(lengths)
    return sum(
        len(ordered[i : i + forward]) * max(ordered[i : i + forward]) for i in range(0, len(ordered), forward)
    )


def model_shapes(guard: Guard, prompts: list[str], batch: int, forwards: list[int]) -> list[dict[str, Any]]:
    """CPU per row by batching rule on the same rows, and the padding each rule feeds the model."""
    features, _ = tokenize_rows(guard.tokenizer, prompts, [None] * len(prompts), guard.settings.max_length)
    lengths = [len(f["input_ids"]) for f in features]
    chunks = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
    chunk_lengths = [lengths[i : i + batch] for i in range(0, len(lengths), batch)]
    guard.score(prompts[:4])  # warm-up
    rules: list[tuple[str, Any, int | None]] = [
        ("batch 1", lambda: [guard.score([p]) for p in prompts], sum(lengths)),
        (
            f"{batch} rows, one forward (pad to longest)",
            lambda: [guard.score(c, batch_size=batch) for c in chunks],
            sum(len(c) * max(c) for c in chunk_lengths),
        ),
    ]
    for forward in forwards:
        rules.append(
            (
                f"{batch} rows, length-sorted forwards of {forward}",
                lambda forward=forward: [guard.score(c, batch_size=forward) for c in chunks],
                sum(padded_tokens(c, forward) for c in chunk_lengths),
            )
        )
    rules.append(
        (
            "fixed cost: a forward of one 8-token row",
            lambda: [guard.score(["a b c d e f"]) for _ in range(20)],
            None,
        )
    )
    results = []
    for name, run, tokens in rules:
        rows = 20 if tokens is None else len(prompts)
        ms = per_row(run, rows)
        results.append(
            {
                "rule": name,
                "cpu_ms_per_row": round(ms, 2),
                "tokens_fed_per_real": round(tokens / sum(lengths), 2) if tokens else None,
                "cpu_us_per_token_fed": round(ms * 1000 * rows / tokens, 1) if tokens else None,
            }
        )
    return results


# -- part 2: load over HTTP ---------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    wanted = {
        "harmaug_model_seconds_sum",
        "harmaug_model_cpu_seconds_total",
        "harmaug_batch_rows_sum",
        "harmaug_batch_rows_count",
        "harmaug_rows_total",
    }
    values: dict[str, float] = dict.fromkeys(wanted, 0.0)
    for family in text_string_to_metric_families(httpx2.get(f"{url}/metrics", timeout=30).text):
        for sample in family.samples:
            if sample.name in wanted:
                values[sample.name] += sample.value
    return values


class Server:
    """One ``harmaug serve`` process on loopback, always stopped on exit."""

    def __init__(self, model: Path, threads: int, batching: list[str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [
            sys.executable,
            "-m",
            "harmaug_pl.deploy.serve",
            "--model",
            str(model),
            "--port",
            str(self.port),
        ]
        command += ["--threads", str(threads), "--log_level", "warning", *batching]
        self.process = subprocess.Popen(
            command, cwd=REPO, start_new_session=True, stderr=subprocess.PIPE, text=True
        )

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 300
        while True:
            if self.process.poll() is not None:
                raise SystemExit(f"harmaug serve exited: {self.process.stderr.read()[-2000:]}")
            try:
                if httpx2.get(f"{self.url}/ready", timeout=5).status_code == 200:
                    return self
            except httpx2.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("harmaug serve was not ready after 300 s")
            time.sleep(0.5)

    def __exit__(self, *exc: object) -> None:
        stop_process_group(self.process)


async def load(url: str, prompts: list[str], clients: int, duration: float) -> dict[str, Any]:
    """``clients`` loops sending one-row moderation requests until ``duration`` is up."""
    latencies: list[float] = []
    errors = 0
    turn = 0
    deadline = time.perf_counter() + duration

    async def client(http: httpx2.AsyncClient) -> None:
        nonlocal errors, turn
        while time.perf_counter() < deadline:
            prompt = prompts[turn % len(prompts)]
            turn += 1
            started = time.perf_counter()
            try:
                reply = await http.post("/v1/moderations", json={"input": prompt})
                ok = reply.status_code == 200
            except httpx2.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    limits = httpx2.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx2.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


async def fairness(url: str) -> dict[str, Any]:
    """The largest request the server's default limits allow, then a one-row request 0.3 s later."""
    limits = ServeSettings()
    text = "a " * (limits.max_chars // 2)
    rows = min(limits.max_rows, (limits.max_body_bytes - 32) // (len(json.dumps(text)) + 2))
    async with httpx2.AsyncClient(base_url=url, timeout=300) as http:
        started = time.perf_counter()
        large = asyncio.ensure_future(http.post("/v1/moderations", json={"input": [text] * rows}))
        await asyncio.sleep(0.3)
        sent = time.perf_counter()
        small = await http.post("/v1/moderations", json={"input": "hello"})
        small_s = time.perf_counter() - sent
        big = await large
    return {
        "large_rows": rows,
        "large_chars_per_row": len(text),
        "large_s": round(time.perf_counter() - started, 2),
        "one_row_s": round(small_s, 3),
        "statuses": [big.status_code, small.status_code],
    }


def spread(values: list[float]) -> str:
    """Median [min-max] over the rounds."""
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def measure(server: Server, prompts: list[str], clients: int, duration: float) -> dict[str, Any]:
    pid = server.process.pid
    before_metrics, before_cpu, client_cpu = scrape(server.url), process_cpu_s(pid), cpu_s()
    result = asyncio.run(load(server.url, prompts, clients, duration))
    client_cpu = cpu_s() - client_cpu
    after_metrics, server_cpu = scrape(server.url), process_cpu_s(pid) - before_cpu
    delta = {k: after_metrics[k] - before_metrics[k] for k in after_metrics}
    rows = len(result["latencies"])
    calls = delta["harmaug_batch_rows_count"] or float("nan")
    model_ms = delta["harmaug_model_seconds_sum"] * 1000 / max(rows, 1)
    model_cpu_ms = delta["harmaug_model_cpu_seconds_total"] * 1000 / max(rows, 1)
    server_ms = server_cpu * 1000 / max(rows, 1)
    return {
        "clients": clients,
        "rows": rows,
        "rows_per_s": round(rows / result["elapsed"], 1),
        "p50_ms": round(quantile(result["latencies"], 0.5) * 1000, 1),
        "p95_ms": round(quantile(result["latencies"], 0.95) * 1000, 1),
        "p99_ms": round(quantile(result["latencies"], 0.99) * 1000, 1),
        "errors": result["errors"],
        "rows_per_model_call": round(delta["harmaug_batch_rows_sum"] / calls, 1),
        "model_ms_per_row": round(model_ms, 2),
        "model_cpu_ms_per_row": round(model_cpu_ms, 2),
        "server_cpu_ms_per_row": round(server_ms, 2),
        "outside_model_cpu_ms_per_row": round(server_ms - model_cpu_ms, 2),
        "client_cpu_ms_per_row": round(client_cpu * 1000 / max(rows, 1), 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pack", default=DEFAULT_PACK, help="shipped pack name or pack file")
    parser.add_argument("--student", help="an exported student folder (default: the pack's export_dir)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per cell")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of all arms, taken in turn")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch / onnxruntime threads")
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="micro-batching server: rows per model call"
    )
    parser.add_argument("--forward-batch", type=int, default=4, help="rows per length-sorted forward pass")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--shape-rows", type=int, default=64, help="rows of part 1 (0: skip it)")
    parser.add_argument("--verify-rows", type=int, default=16, help="rows the export is verified on")
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)

    pack = pack_config(args.pack)
    folder, what, verification = prepare_student(args, pack, Path(args.out_dir) / "serving_guard")
    eval_source = dict(next(iter(pack["data"]["init_args"]["eval_sets"].values())))
    prompts = [e.prompt for e in load_examples(DataSource(**eval_source), origin="eval").examples]
    torch.set_num_threads(args.threads)

    shapes = {}
    for fmt in args.formats if args.shape_rows else []:
        guard = Guard.from_pretrained(folder / FORMATS[fmt] if FORMATS[fmt] else folder, threads=args.threads)
        forwards = sorted({4, 8, args.forward_batch})
        shapes[fmt] = model_shapes(guard, prompts[: args.shape_rows], args.max_batch_size, forwards)
        print(fmt, shapes[fmt], flush=True)
        del guard

    wait = ["--max_wait_ms", str(args.max_wait_ms)]
    arms = {
        f"micro-batch {args.max_batch_size}, sorted forwards of {args.forward_batch}": [
            "--max_batch_size",
            str(args.max_batch_size),
            "--forward_batch_size",
            str(args.forward_batch),
            *wait,
        ],
        f"micro-batch {args.max_batch_size}, one forward": [
            "--max_batch_size",
            str(args.max_batch_size),
            "--forward_batch_size",
            "0",
            *wait,
        ],
        "batch size 1": ["--max_batch_size", "1", "--max_wait_ms", "0"],
    }
    batched, one_forward, single = arms
    most = max(args.clients)
    cells, fair = [], []
    for fmt in args.formats:
        model = folder / FORMATS[fmt] if FORMATS[fmt] else folder
        with contextlib.ExitStack() as stack:
            servers = {arm: stack.enter_context(Server(model, args.threads, b)) for arm, b in arms.items()}
            rss_before = {}
            for arm, server in servers.items():
                asyncio.run(load(server.url, prompts, 4, 2.0))  # warm-up
                rss_before[arm] = process_rss_mib(server.process.pid)
            for round_ in range(args.repeats):
                for arm, server in servers.items():
                    for clients in args.clients if arm == batched else [most]:
                        cell = {"format": fmt, "arm": arm, "round": round_}
                        cell.update(measure(server, prompts, clients, args.duration))
                        cells.append(cell)
                        print(cell, flush=True)
                fair.append({"format": fmt, "round": round_, **asyncio.run(fairness(servers[batched].url))})
                print(fair[-1], flush=True)
            for arm, server in servers.items():
                rss_after = process_rss_mib(server.process.pid)
                for cell in cells:
                    if cell["format"] == fmt and cell["arm"] == arm:
                        cell.update(rss_before_mib=rss_before[arm], rss_after_mib=rss_after)
                        cell["rss_growth_pct"] = round(
                            100 * (rss_after - rss_before[arm]) / rss_before[arm], 1
                        )

    ratios = []
    for fmt in args.formats:
        per_round = []
        for round_ in range(args.repeats):
            at = {
                c["arm"]: c
                for c in cells
                if c["format"] == fmt and c["clients"] == most and c["round"] == round_
            }
            per_round.append(
                {
                    "rows_per_s_ratio": at[batched]["rows_per_s"] / at[single]["rows_per_s"],
                    "one_forward_ratio": at[one_forward]["rows_per_s"] / at[single]["rows_per_s"],
                    "server_cpu_per_row_ratio": at[single]["server_cpu_ms_per_row"]
                    / at[batched]["server_cpu_ms_per_row"],
                }
            )
        ratios.append({"format": fmt, **{k: spread([r[k] for r in per_round]) for k in per_round[0]}})
        ratios[-1]["rounds"] = [{k: round(v, 3) for k, v in r.items()} for r in per_round]

    load_avg = os.getloadavg()
    lines = [
        f"# Serving under load ({what})",
        "",
        f"{machine_info()['cpu_count']} CPUs, server threads {args.threads}, {args.duration:g} s per cell, "
        f"{args.repeats} rounds of the arms in turn, one-row /v1/moderations requests; load average at "
        f"the end {load_avg[0]:.1f} (other jobs included).",
        "",
        "## Part 1: the model alone, CPU per row by batching rule",
        "",
    ]
    for fmt, rows in shapes.items():
        lines += [f"### {fmt}", ""]
        lines.append(
            markdown_table(
                ["rule", "CPU ms/row", "tokens fed / real tokens", "CPU µs per token fed"],
                [
                    [
                        r["rule"],
                        r["cpu_ms_per_row"],
                        r["tokens_fed_per_real"] or "",
                        r["cpu_us_per_token_fed"] or "",
                    ]
                    for r in rows
                ],
            )
        )
        lines.append("")
    lines += ["## Part 2: load over HTTP", ""]
    lines.append(
        markdown_table(
            [
                "format",
                "server",
                "round",
                "clients",
                "rows/s",
                "p50 ms",
                "p95 ms",
                "p99 ms",
                "errors",
                "rows/call",
                "model ms/row (wall)",
                "model CPU ms/row",
                "server CPU ms/row",
                "HTTP etc. CPU ms/row",
                "client CPU ms/row",
                "RSS MiB before → after",
            ],
            [
                [
                    c["format"],
                    c["arm"],
                    c["round"],
                    c["clients"],
                    c["rows_per_s"],
                    c["p50_ms"],
                    c["p95_ms"],
                    c["p99_ms"],
                    c["errors"],
                    c["rows_per_model_call"],
                    c["model_ms_per_row"],
                    c["model_cpu_ms_per_row"],
                    c["server_cpu_ms_per_row"],
                    c["outside_model_cpu_ms_per_row"],
                    c["client_cpu_ms_per_row"],
                    f"{c['rss_before_mib']:.0f} → {c['rss_after_mib']:.0f} ({c['rss_growth_pct']:+.1f}%)",
                ]
                for c in cells
            ],
        )
    )
    lines += [
        "",
        f"## Micro-batching vs batch size 1 at {most} clients (median [range] of {args.repeats} rounds)",
        "",
    ]
    lines.append(
        markdown_table(
            [
                "format",
                f"rows/s: {batched} / batch 1",
                f"rows/s: {one_forward} / batch 1",
                "server CPU per row: batch 1 / micro-batch",
            ],
            [
                [r["format"], r["rows_per_s_ratio"], r["one_forward_ratio"], r["server_cpu_per_row_ratio"]]
                for r in ratios
            ],
        )
    )
    lines += ["", "## Part 3: a one-row request sent 0.3 s after the largest allowed request", ""]
    lines.append(
        markdown_table(
            ["format", "round", "large request", "large request s", "one-row request s", "statuses"],
            [
                [
                    f["format"],
                    f["round"],
                    f"{f['large_rows']} rows x {f['large_chars_per_row']:,} chars",
                    f["large_s"],
                    f["one_row_s"],
                    f["statuses"],
                ]
                for f in fair
            ],
        )
    )
    data = {
        "student": what,
        "settings": vars(args),
        "machine": machine_info(),
        "load_average_end": load_avg,
        "export_verification": verification,
        "model_shapes": shapes,
        "load": cells,
        "ratios": ratios,
        "fairness": fair,
    }
    write_results(NAME, data, "\n".join(lines), args.out_dir)
    return data


if __name__ == "__main__":
    main()
