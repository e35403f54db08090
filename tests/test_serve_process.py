"""``harmaug serve`` as a real uvicorn process on loopback: the openai client, every bad request
and overload, then a normal answer; SIGTERM drains the requests in flight; what a hostile client
does at the HTTP layer (a body over the limit, declared or chunked; headers or a body that never
finish) under both of uvicorn's HTTP parsers. Slow (a process start), run in CI; the server is
always stopped."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest

from harmaug_pl.deploy.guard import Guard
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE, free_port, wait_for_http
from tests.test_serve import BAD_LIMITS, BAD_REQUESTS

pytestmark = pytest.mark.slow
PROMPTS = PLACEHOLDER_UNSAFE + PLACEHOLDER_SAFE
WAIT_MS = 800  # the wait budget: single requests sit this long in the queue, so they are in flight
READ_TIMEOUT_S = 1.0


@pytest.fixture(params=["h11", "httptools"])
def server(request: pytest.FixtureRequest, tiny_export: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    if request.param == "httptools":
        pytest.importorskip("httptools", reason="uvicorn's httptools parser is not installed")
    port = free_port()
    limits = [f"--{k}={v}" for k, v in BAD_LIMITS.items()]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harmaug_pl.deploy.serve",
            "--model",
            str(tiny_export),
            "--port",
            str(port),
            "--max_batch_size",
            "32",
            "--max_wait_ms",
            str(WAIT_MS),
            "--max_queue_rows",
            "8",
            "--http",
            request.param,
            "--read_timeout_s",
            str(READ_TIMEOUT_S),
            *limits,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(process, f"{url}/ready", timeout=90)
        yield process, url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


async def until_queued(http: httpx2.AsyncClient, rows: int) -> None:
    """Wait until ``rows`` rows are queued (the server's own gauge), not for a guessed time."""
    deadline = time.monotonic() + 30
    while f"harmaug_queue_rows {rows:.1f}" not in (await http.get("/metrics")).text:
        assert time.monotonic() < deadline, f"{rows} rows were never queued together"
        await asyncio.sleep(0.01)


def test_openai_client_bad_requests_overload_then_a_normal_answer(
    server: tuple[subprocess.Popen, str], tiny_export: Path
) -> None:
    process, url = server
    guard = Guard.from_pretrained(tiny_export)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    created = client.moderations.create(model="omni-moderation-latest", input=PROMPTS[:4])
    for result, score in zip(created.results, guard.score(PROMPTS[:4])):
        assert result.category_scores.to_dict() == {"unsafe": pytest.approx(score, abs=1e-6)}
        assert result.flagged is (score > guard.threshold)

    with httpx2.Client(base_url=url, timeout=30) as http:
        for path, payload, status, param, words in BAD_REQUESTS:
            if isinstance(payload, bytes):
                reply = http.post(path, content=payload, headers={"content-type": "application/json"})
            else:
                reply = http.post(path, json=payload)
            assert reply.status_code == status, (path, payload, reply.text)
            assert words in reply.json()["error"]["message"] and reply.json()["error"]["param"] == param
        too_big = http.post("/v1/moderations", json={"input": "x" * 6000})
        assert too_big.status_code == 413

    async def overload() -> list[httpx2.Response]:
        async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
            first = [
                asyncio.create_task(http.post("/v1/moderations", json={"input": PROMPTS[:4]})) for _ in (0, 1)
            ]
            await until_queued(http, 8)  # both are queued (8 rows: the limit), waiting for a batch
            refused = await http.post("/v1/moderations", json={"input": PROMPTS[0]})
            return [refused, *await asyncio.gather(*first)]

    refused, *queued = asyncio.run(overload())
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert [r.status_code for r in queued] == [200, 200]

    again = client.moderations.create(input=PROMPTS[5])
    assert again.results[0].category_scores.to_dict()["unsafe"] == pytest.approx(
        guard.score([PROMPTS[5]])[0], abs=1e-6
    )
    metrics = httpx2.get(f"{url}/metrics").text
    assert 'harmaug_requests_total{endpoint="/v1/moderations",status="503"} 1.0' in metrics
    assert process.poll() is None


def test_sigterm_answers_the_requests_in_flight_then_exits(
    server: tuple[subprocess.Popen, str], tiny_export: Path
) -> None:
    process, url = server
    guard = Guard.from_pretrained(tiny_export)

    async def in_flight() -> list[httpx2.Response]:
        async with httpx2.AsyncClient(base_url=url, timeout=30) as http:
            sent = [
                asyncio.create_task(http.post("/v1/classify", json={"rows": [{"prompt": p}]}))
                for p in PROMPTS[:3]
            ]
            await until_queued(http, 3)  # the rows are queued, waiting for their batch
            os.kill(process.pid, signal.SIGTERM)
            return await asyncio.gather(*sent)

    replies = asyncio.run(in_flight())
    assert [r.status_code for r in replies] == [200, 200, 200]
    got = [r.json()["results"][0]["p_unsafe"] for r in replies]
    assert got == pytest.approx(guard.score(PROMPTS[:3]), abs=1e-6)
    # after its graceful shutdown uvicorn re-raises the signal, so the process reports SIGTERM
    assert process.wait(timeout=30) == -signal.SIGTERM
    log = process.stdout.read()
    assert "Shutting down" in log and "Finished server process" in log
    with pytest.raises(httpx2.TransportError):
        httpx2.get(f"{url}/health", timeout=2)


def raw_exchange(url: str, data: bytes, wait_s: float = 10.0) -> tuple[bytes, float]:
    """Send ``data`` on a fresh connection; everything the server answers until it closes, and when."""
    host, port = url.removeprefix("http://").split(":")
    started = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=wait_s) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer, time.monotonic() - started


def post_head(length: int | None) -> bytes:
    size = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return (
        b"POST /v1/moderations HTTP/1.1\r\nHost: guard\r\nContent-Type: application/json\r\n%s\r\n\r\n" % size
    )


def test_hostile_http_is_refused_and_every_connection_ends(
    server: tuple[subprocess.Popen, str], tiny_export: Path
) -> None:
    process, url = server
    big = json.dumps({"input": "x" * 6000}).encode()  # over the 5000-byte limit (BAD_LIMITS)
    declared, _ = raw_exchange(url, post_head(len(big)) + big)
    chunked_body = b"".join(
        b"%x\r\n%s\r\n" % (len(big[i : i + 700]), big[i : i + 700]) for i in range(0, len(big), 700)
    )
    chunked, _ = raw_exchange(url, post_head(None) + chunked_body + b"0\r\n\r\n")
    for answer in (declared, chunked):
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413") and b"connection: close" in head.lower(), head
        assert json.loads(body)["error"]["code"] == "body_too_large"
    short, took = raw_exchange(url, post_head(100) + b'{"input": "h')  # the rest never comes
    assert short.startswith(b"HTTP/1.1 408") and took < READ_TIMEOUT_S + 5, (short, took)
    slow_headers, took = raw_exchange(
        url, b"POST /v1/moderations HTTP/1.1\r\nHost: gu"
    )  # nor the headers' end
    assert slow_headers == b"" and took < READ_TIMEOUT_S + 5  # closed by the server
    again = httpx2.post(f"{url}/v1/moderations", json={"input": PROMPTS[0]}, timeout=30)
    assert again.status_code == 200 and again.json()["results"][0]["category_scores"][
        "unsafe"
    ] == pytest.approx(Guard.from_pretrained(tiny_export).score([PROMPTS[0]])[0], abs=1e-6)
    assert process.poll() is None
