"""Batched ``TransformersBackend.generate`` vs a one-chat-at-a-time loop, side by side in one run.

Same model, same chats (the HarmAug generator's prefix-attack chats, built by
``InstructionGenerator.requests`` from the default pack's seed rows), same sampling settings. Model
loading is timed separately and excluded from the throughput numbers. "New tokens" are the tokens each
row really needed (up to its end-of-sequence token); "useful slots" is their share of what the batches
computed: a batch keeps decoding rows that already stopped, the price batching pays for parallelism.

    python -m benchmarks.generation_throughput [--n 96] [--batch-sizes 8 32] [--modes request stage]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    DEFAULT_PACK,
    RESULTS_DIR,
    machine_info,
    markdown_table,
    pack_config,
    peak_rss_mib,
    write_results,
)
from harmaug_pl.augment.chat_stage import length_order, prompt_lengths
from harmaug_pl.augment.generator import InstructionGenerator
from harmaug_pl.backends import TransformersBackend
from harmaug_pl.backends.base import Chat, SamplingConfig
from harmaug_pl.data.loaders import DataSource, load_examples

NAME = "generation_throughput"


GENERATOR_SETTINGS = ("num_exemplars", "instruction", "user_template", "exemplar_format", "prefix", "seed")
MODES = {  # mode -> (batches cut as the chat stage cuts them, the pack backend's prefix caching)
    "request": (False, False),
    "stage": (True, True),
}


def pack_generator(backend: TransformersBackend, pack: dict[str, Any]) -> InstructionGenerator:
    """The pack's generator (exemplars, prefix, sort window) on ``backend``."""
    given = pack["data"]["init_args"]["generator"]["init_args"]
    settings = {key: value for key, value in given.items() if key in (*GENERATOR_SETTINGS, "sort_window")}
    return InstructionGenerator(backend, **settings)


def generator_chats(backend: TransformersBackend, n: int, pack: dict[str, Any]) -> list[Chat]:
    """The first ``n`` generator chats the pack would send: its seed rows, exemplar count and prefix."""
    seed_rows = load_examples(DataSource(**pack["data"]["init_args"]["seed_data"]), origin="seed").examples
    return [request.chat for request in pack_generator(backend, pack).requests(seed_rows, n)]


def pack_prefix_caching(pack: dict[str, Any]) -> bool:
    """Whether the pack's generator backend computes the chats' shared prefix once."""
    backend = pack["data"]["init_args"]["generator"]["init_args"]["backend"].get("init_args", {})
    return bool(backend.get("prefix_caching", False))


def pack_sampling(pack: dict[str, Any], max_new_tokens: int | None) -> SamplingConfig:
    """The pack generator's sampling settings, with ``max_new_tokens`` overridden when given."""
    given = dict(pack["data"]["init_args"]["generator"]["init_args"].get("sampling") or {})
    if max_new_tokens is not None:
        given["max_new_tokens"] = max_new_tokens
    return SamplingConfig(**given)


class TokenCounter:
    """Counts the tokens ``lm.generate`` really produced, by wrapping it on this one model object.

    ``new_tokens``: per row, up to and including its first end-of-sequence token (what the model had
    to write); ``slots``: rows x decoding steps of each batch (what the batch computed, finished rows
    included). Re-tokenising decoded text would miscount (merges differ), hence the wrapper.
    """

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self.new_tokens = 0
        self.slots = 0
        eos = lm.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self._generate = lm.generate

    def _counting_generate(self, input_ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        output = self._generate(input_ids=input_ids, **kwargs)
        new = output[:, input_ids.shape[1] :]
        self.slots += new.numel()
        for row in new.tolist():
            ends = [i for i, token in enumerate(row) if token in self.eos]
            self.new_tokens += ends[0] + 1 if ends else len(row)
        return output

    def __enter__(self) -> TokenCounter:
        self.lm.generate = self._counting_generate
        return self

    def __exit__(self, *exc: object) -> None:
        del self.lm.generate  # back to the class's method


def measure(
    backend: TransformersBackend,
    chats: list[Chat],
    sampling: SamplingConfig,
    batch_size: int,
    seed: int = 0,
    mode: str = "request",
    sort_window: int = 1,
    prefix_caching: bool = False,
) -> dict[str, Any]:
    """Generate for every chat in chunks of ``batch_size``; wall and CPU time, rows/s and new tokens/s.

    ``mode`` ``stage`` cuts the batches as the chat stages do (length order within windows of
    ``sort_window`` batches) and uses ``prefix_caching``; ``request`` keeps the chats' order, no cache.
    """
    sorted_batches, cached = MODES[mode]
    if sorted_batches:
        chats = [chats[i] for i in length_order(prompt_lengths(backend, chats), sort_window * batch_size)]
    backend.prefix_caching = cached and prefix_caching
    with TokenCounter(backend.lm) as counter:
        started, cpu_started = time.perf_counter(), time.process_time()
        for index, start in enumerate(range(0, len(chats), batch_size)):
            backend.generate(chats[start : start + batch_size], sampling, seed + index)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    label = (
        "length order" + (" + prefix cache" if backend.prefix_caching else "")
        if sorted_batches
        else "request order"
    )
    return {
        "batch_size": batch_size,
        "mode": "sequential loop" if batch_size == 1 else f"batched, {label}",
        "cpu_seconds": round(cpu, 3),
        "rows": len(chats),
        "seconds": round(seconds, 3),
        "rows_per_s": round(len(chats) / seconds, 3),
        "new_tokens": counter.new_tokens,
        "new_tokens_per_s": round(counter.new_tokens / seconds, 2),
        "useful_slot_fraction": round(counter.new_tokens / counter.slots, 3) if counter.slots else None,
    }


def run(
    model: str,
    n: int = 96,
    batch_sizes: list[int] | None = None,
    max_new_tokens: int | None = 40,
    threads: int | None = None,
    pack: str = DEFAULT_PACK,
    out_dir: str | Path = RESULTS_DIR,
    modes: list[str] | None = None,
) -> dict[str, Any]:
    """Measure every batch size (1, the sequential loop, always included) in every mode; write the results."""
    if n < 1:
        raise SystemExit("--n must be >= 1")
    sizes = sorted({1, *(batch_sizes or [8, 32])})
    if sizes[0] < 1:
        raise SystemExit("--batch-sizes must be >= 1")
    if threads is not None:
        torch.set_num_threads(threads)
    config = pack_config(pack)
    sampling = pack_sampling(config, max_new_tokens)
    backend = TransformersBackend(model)
    try:
        started = time.perf_counter()
        _ = backend.lm
        load_seconds = time.perf_counter() - started
        load_peak = peak_rss_mib()
        chats = generator_chats(backend, n, config)
        sort_window = pack_generator(backend, config).sort_window
        prompt_tokens = [len(ids) for ids in backend.tokenizer(backend.render(chats))["input_ids"]]
        backend.generate(chats[:1], SamplingConfig(max_new_tokens=2), seed=0)  # warm-up, not timed
        results = [measure(backend, chats, sampling, 1)]
        for size in sizes[1:]:
            for mode in modes or list(MODES):
                results.append(
                    measure(backend, chats, sampling, size, 0, mode, sort_window, pack_prefix_caching(config))
                )
    finally:
        backend.close()
    sequential = results[0]
    for result in results:
        result["rows_per_s_vs_sequential"] = round(result["rows_per_s"] / sequential["rows_per_s"], 2)
        result["new_tokens_per_s_vs_sequential"] = (
            round(result["new_tokens_per_s"] / sequential["new_tokens_per_s"], 2)
            if sequential["new_tokens_per_s"]
            else None
        )
    data = {
        "benchmark": NAME,
        "model": model,
        "pack": pack,
        "n_chats": len(chats),
        "sampling": asdict(sampling),
        "prompt_tokens_mean": round(statistics.mean(prompt_tokens), 1),
        "prompt_tokens_max": max(prompt_tokens),
        "load_seconds": round(load_seconds, 2),
        "peak_rss_mib_after_load": load_peak,
        "peak_rss_mib": peak_rss_mib(),
        "load_average_1min_end": os.getloadavg()[0],
        "machine": machine_info(),
        "results": results,
    }
    write_results(NAME, data, render(data), out_dir)
    return data


def render(data: dict[str, Any]) -> str:
    """The markdown report: settings, then one row per batch size."""
    sampling = data["sampling"]
    header = (
        f"## Generation throughput: batched vs sequential\n\n"
        f"model `{data['model']}` (load {data['load_seconds']} s, excluded), {data['n_chats']} generator "
        f"chats of the `{data['pack']}` pack (prompt tokens: mean {data['prompt_tokens_mean']}, "
        f"max {data['prompt_tokens_max']}), max_new_tokens {sampling['max_new_tokens']}, "
        f"temperature {sampling['temperature']}, top_p {sampling['top_p']}; "
        f"torch threads {data['machine']['torch_threads']} of {data['machine']['cpu_count']} CPUs; "
        f"peak RSS {data['peak_rss_mib']} MiB; 1-minute load average at the end "
        f"{data['load_average_1min_end']} (CPU time moves less with the load than wall time)\n\n"
    )
    rows = [
        [
            r["mode"],
            r["batch_size"],
            r["rows"],
            r["seconds"],
            r["cpu_seconds"],
            r["rows_per_s"],
            r["new_tokens"],
            r["new_tokens_per_s"],
            r["useful_slot_fraction"],
            r["rows_per_s_vs_sequential"],
            r["new_tokens_per_s_vs_sequential"],
        ]
        for r in data["results"]
    ]
    headers = [
        "mode",
        "batch",
        "rows",
        "seconds",
        "CPU s",
        "rows/s",
        "new tokens",
        "new tokens/s",
        "useful slots",
        "rows/s ÷ sequential",
        "tokens/s ÷ sequential",
    ]
    return header + markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=None, help="model reference (default: the pack generator's)")
    parser.add_argument("--pack", default=DEFAULT_PACK, help="pack whose seed data and sampling to use")
    parser.add_argument(
        "--n",
        type=int,
        default=96,
        help="number of generator chats (more than a batch, or nothing is sorted)",
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32], help="1 is always added")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=list(MODES),
        help="batched modes: request order without prefix cache, or as the chat stage runs them",
    )
    parser.add_argument("--out-dir", default=str(RESULTS_DIR))
    args = parser.parse_args(argv)
    model = (
        args.model
        or pack_config(args.pack)["data"]["init_args"]["generator"]["init_args"]["backend"]["init_args"][
            "model"
        ]
    )
    return run(
        model,
        args.n,
        args.batch_sizes,
        args.max_new_tokens,
        args.threads,
        args.pack,
        args.out_dir,
        args.modes,
    )


if __name__ == "__main__":
    main()
