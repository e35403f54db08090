"""harmaug serve in-process: the endpoints, micro-batching, every refusal, then a normal answer.

The app runs with its lifespan (the micro-batcher) behind httpx2's ASGI transport, so these tests
need no port; tests/test_serve_process.py runs the real uvicorn process on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harmaug_pl.deploy.export import INT8_FILE, ONNX_FILE
from harmaug_pl.deploy.guard import Guard
from harmaug_pl.deploy.serve import ServeSettings, console_main, create_app
from tests.helpers import PLACEHOLDER_SAFE, PLACEHOLDER_UNSAFE

PROMPTS = PLACEHOLDER_UNSAFE + PLACEHOLDER_SAFE
RESPONSE = "I'm sorry, but I can't help with that."


@pytest.fixture(scope="module")
def guard(tiny_export: Path) -> Guard:
    return Guard.from_pretrained(tiny_export)


@contextlib.asynccontextmanager
async def served(guard: Guard, **settings: Any) -> AsyncIterator[httpx2.AsyncClient]:
    """The app with its lifespan running, and a client that talks to it in-process."""
    app = create_app(guard, ServeSettings(**settings), model_name="tiny-guard")
    async with app.router.lifespan_context(app):
        transport = httpx2.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx2.AsyncClient(transport=transport, base_url="http://guard") as client:
            client.app = app
            yield client


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def answers_correctly(client: httpx2.AsyncClient, guard: Guard) -> None:
    """After whatever came before, a normal request still gets the guard's own scores."""
    reply = await client.post("/v1/classify", json={"rows": [{"prompt": PROMPTS[0], "response": RESPONSE}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["results"][0]["p_unsafe"] == pytest.approx(
        guard.score([PROMPTS[0]], [RESPONSE])[0], abs=1e-6
    )


def metric(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise KeyError(name)


def test_moderations_in_openai_shape_with_the_guard_s_one_category(guard: Guard) -> None:
    async def body() -> None:
        async with served(guard) as client:
            one = (await client.post("/v1/moderations", json={"input": PROMPTS[0]})).json()
            many = await client.post(
                "/v1/moderations", json={"input": PROMPTS, "model": "omni-moderation-latest"}
            )
            assert many.status_code == 200
            reply = many.json()
        assert one["id"].startswith("modr-") and one["model"] == "tiny-guard"
        assert len(one["results"]) == 1 and len(reply["results"]) == len(PROMPTS)
        expected = guard.score(PROMPTS)
        assert reply["model"] == "tiny-guard"  # the model it asked for is not the one that answers
        for result, score in zip(reply["results"], expected):
            assert set(result["categories"]) == {"unsafe"} == set(result["category_scores"])
            assert result["category_scores"]["unsafe"] == pytest.approx(score, abs=1e-6)
            assert result["flagged"] == result["categories"]["unsafe"] == (score > guard.threshold)
            assert result["truncated"] is False

    run(body())


def test_the_real_openai_client_reads_the_moderation_endpoint(guard: Guard) -> None:
    async def body() -> None:
        async with served(guard) as client:
            oai = openai.AsyncOpenAI(base_url="http://guard/v1", api_key="unused", http_client=client)
            created = await oai.moderations.create(model="omni-moderation-latest", input=PROMPTS[:3])
            parts = await oai.moderations.create(input=[{"type": "text", "text": PROMPTS[3]}])
            with pytest.raises(openai.UnprocessableEntityError, match="text only"):
                await oai.moderations.create(input=[{"type": "image_url", "image_url": {"url": "x"}}])
        scores = guard.score(PROMPTS[:4])
        for result, score in zip([*created.results, *parts.results], scores):
            assert result.category_scores.to_dict() == {"unsafe": pytest.approx(score, abs=1e-6)}
            assert result.flagged is (score > guard.threshold)

    run(body())


def test_classify_scores_pairs_with_the_threshold_it_reports(guard: Guard) -> None:
    rows = [{"prompt": p, "response": RESPONSE} for p in PROMPTS[:4]] + [{"prompt": p} for p in PROMPTS[4:]]

    async def body() -> None:
        async with served(guard) as client:
            default = (await client.post("/v1/classify", json={"rows": rows})).json()
            strict = (await client.post("/v1/classify", json={"rows": rows, "threshold": 0.0})).json()
        responses = [RESPONSE] * 4 + [None] * 4
        expected = guard.classify(PROMPTS, responses)
        assert default["threshold"] == guard.threshold and strict["threshold"] == 0.0
        for got, want in zip(default["results"], expected):
            assert got == {**want, "p_unsafe": pytest.approx(want["p_unsafe"], abs=1e-6)}
        assert all(r["label"] == "unsafe" for r in strict["results"])

    run(body())


def test_concurrent_requests_share_one_model_call(guard: Guard) -> None:
    async def body() -> None:
        # a long wait budget and a batch of exactly the 8 requests: one call, whatever the timing
        async with served(guard, max_batch_size=8, max_wait_ms=5000) as client:
            replies = await asyncio.gather(
                *(client.post("/v1/moderations", json={"input": p}) for p in PROMPTS)
            )
            text = (await client.get("/metrics")).text
        got = [r.json()["results"][0]["category_scores"]["unsafe"] for r in replies]
        assert got == pytest.approx(guard.score(PROMPTS), abs=1e-6)
        assert metric(text, "harmaug_batch_rows_count") == 1
        assert metric(text, "harmaug_batch_rows_sum") == 8
        assert metric(text, "harmaug_rows_total", endpoint="/v1/moderations") == 8
        assert metric(text, "harmaug_requests_total", endpoint="/v1/moderations", status="200") == 8
        assert metric(text, "harmaug_model_seconds_count") == 1

    run(body())


def test_a_request_longer_than_the_batch_is_split_and_answered_in_order(guard: Guard) -> None:
    async def body() -> None:
        async with served(guard, max_batch_size=3, turn_rows=3, max_wait_ms=0) as client:
            reply = (await client.post("/v1/moderations", json={"input": PROMPTS})).json()
            text = (await client.get("/metrics")).text
        got = [r["category_scores"]["unsafe"] for r in reply["results"]]
        assert got == pytest.approx(guard.score(PROMPTS), abs=1e-6)
        assert metric(text, "harmaug_batch_rows_count") == 3  # 3 + 3 + 2 rows

    run(body())


@pytest.mark.parametrize("name", [ONNX_FILE, INT8_FILE])
def test_every_exported_format_serves(tiny_export: Path, name: str) -> None:
    onnx_guard = Guard.from_pretrained(tiny_export / name)

    async def body() -> None:
        async with served(onnx_guard, turn_rows=32) as client:  # the 8 rows in one model call
            reply = (
                await client.post("/v1/classify", json={"rows": [{"prompt": p} for p in PROMPTS]})
            ).json()
        # int8 activations are quantised per forward pass: compare with the server's passes (of 4)
        assert [r["p_unsafe"] for r in reply["results"]] == pytest.approx(
            onnx_guard.score(PROMPTS, batch_size=4), abs=1e-5
        )

    run(body())


def test_health_readiness_and_prometheus_metrics(guard: Guard) -> None:
    async def body() -> None:
        async with served(guard) as client:
            health = await client.get("/health")
            assert health.json() == {"status": "ok"} and health.headers["x-request-id"].startswith("req_")
            ready = await client.get("/ready")
            assert ready.status_code == 200 and ready.json()["model"] == "tiny-guard"
            await client.post("/v1/moderations", json={"input": "x" * 2000})  # truncated
            reply = await client.get("/metrics")
            assert reply.headers["content-type"].startswith("text/plain")
            assert metric(reply.text, "harmaug_truncated_rows_total") == 1
            assert metric(reply.text, "harmaug_queue_rows") == 0
            assert metric(reply.text, "harmaug_request_seconds_count", endpoint="/v1/moderations") == 1
            client.app.state.draining = True  # what SIGTERM sets (tests/test_serve_process.py)
            assert (await client.get("/ready")).status_code == 503
            refused = await client.post("/v1/moderations", json={"input": "hi"})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"

    run(body())


# -- bad input and overload: one test per row, each followed by a normal request ----------------
def test_long_rows_are_truncated_and_marked_not_refused(guard: Guard) -> None:
    long_prompt = " ".join(PROMPTS * 20)  # far over the tiny guard's 64 tokens

    async def body() -> None:
        async with served(guard) as client:
            reply = await client.post(
                "/v1/classify", json={"rows": [{"prompt": long_prompt}, {"prompt": "hi"}]}
            )
            assert reply.status_code == 200
            got = reply.json()["results"]
            await answers_correctly(client, guard)
        assert [r["truncated"] for r in got] == [True, False]
        assert got[0]["p_unsafe"] == pytest.approx(guard.score([long_prompt])[0], abs=1e-6)

    run(body())


# (path, body, status, field named, words in the message); the limits are BAD_LIMITS
BAD_LIMITS = {"max_rows": 4, "max_chars": 3000, "max_body_bytes": 5000}
BAD_REQUESTS = [
    ("/v1/classify", b'{"rows": [{"prompt": "hi"}', 400, None, "malformed JSON"),
    ("/v1/moderations", b"not json", 400, None, "malformed JSON"),
    ("/v1/classify", {"rows": [{"prompt": 5}]}, 422, "rows[0].prompt", "valid string"),
    ("/v1/classify", {"rows": [{"response": "a"}]}, 422, "rows[0].prompt", "required"),
    (
        "/v1/classify",
        {"rows": [{"prompt": "a", "respones": "b"}]},
        422,
        "rows[0].respones",
        "not permitted",
    ),
    ("/v1/classify", {"rows": "hi"}, 422, "rows", "valid list"),
    ("/v1/classify", {"rows": [{"prompt": "a"}], "threshold": 2}, 422, "threshold", "less than or equal"),
    ("/v1/classify", {"rows": [{"prompt": "a"}], "threshold": "0.5"}, 422, "threshold", "valid number"),
    ("/v1/classify", {"rows": [{"prompt": "a"}], "threshold": True}, 422, "threshold", "valid number"),
    ("/v1/classify", {"rows": []}, 422, "rows", "at least one"),
    ("/v1/moderations", {}, 422, "input", "required"),
    ("/v1/moderations", {"input": []}, 422, "input", "at least one"),
    ("/v1/moderations", {"input": ["a"] * 5}, 422, "input", "above the limit of 4"),
    ("/v1/moderations", {"input": "x" * 3001}, 422, "input", "3001 characters"),
    (
        "/v1/classify",
        {"rows": [{"prompt": "a", "response": "x" * 3001}]},
        422,
        "rows[0].response",
        "hard cap",
    ),
    ("/v1/moderations", {"input": [{"type": "image_url"}]}, 422, "input[0].type", "text only"),
]


@pytest.mark.parametrize(("path", "payload", "status", "param", "words"), BAD_REQUESTS)
def test_bad_requests_are_named_and_the_server_goes_on(
    guard: Guard, path: str, payload: Any, status: int, param: str | None, words: str
) -> None:
    async def body() -> None:
        async with served(guard, **BAD_LIMITS) as client:
            if isinstance(payload, bytes):
                reply = await client.post(path, content=payload, headers={"content-type": "application/json"})
            else:
                reply = await client.post(path, json=payload)
            assert reply.status_code == status, reply.text
            assert reply.headers["x-request-id"].startswith("req_")
            error = reply.json()["error"]
            assert words in error["message"]
            assert error["param"] == param
            await answers_correctly(client, guard)

    run(body())


def test_a_body_over_the_limit_is_413_declared_or_streamed(guard: Guard) -> None:
    big = json.dumps({"input": "x" * 5000}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 1000):
            yield big[start : start + 1000]

    async def body() -> None:
        async with served(guard, max_body_bytes=5000) as client:
            declared = await client.post(
                "/v1/moderations", content=big, headers={"content-type": "application/json"}
            )
            streamed = await client.post(  # no Content-Length: counted while it arrives
                "/v1/moderations", content=chunks(), headers={"content-type": "application/json"}
            )
            for reply in (declared, streamed):
                assert reply.status_code == 413 and reply.headers["connection"] == "close"
                assert reply.json()["error"] == {
                    "message": "request body above the 5000-byte limit",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "body_too_large",
                }
            await answers_correctly(client, guard)

    run(body())


def test_a_full_queue_answers_503_with_retry_after(guard: Guard) -> None:
    async def body() -> None:
        # rows wait up to 1 s for a batch of 64 to fill, and at most 2 rows may wait
        async with served(guard, max_batch_size=64, max_wait_ms=1000, max_queue_rows=2, max_rows=2) as client:
            waiting = asyncio.create_task(client.post("/v1/moderations", json={"input": PROMPTS[:2]}))
            while client.app.state.batcher.queued_rows < 2:
                await asyncio.sleep(0.01)
            refused = await client.post("/v1/moderations", json={"input": PROMPTS[2]})
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.json()["error"]["code"] == "queue_full"
            assert refused.json()["error"]["type"] == "service_unavailable"  # not a server failure
            busy = await client.get("/ready")  # a load balancer sends new requests elsewhere
            assert busy.status_code == 503 and busy.json() == {"status": "busy"}
            first = await waiting  # the queued request is still answered
            assert (await client.get("/ready")).status_code == 200
            assert [r["category_scores"]["unsafe"] for r in first.json()["results"]] == pytest.approx(
                guard.score(PROMPTS[:2]), abs=1e-6
            )
            await answers_correctly(client, guard)

    run(body())


def test_a_model_failure_is_a_500_for_that_request_only(
    guard: Guard, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    async def body() -> httpx2.Response:
        async with served(guard) as client:
            with monkeypatch.context() as patched:
                patched.setattr(guard, "score_all", broken)
                reply = await client.post("/v1/moderations", json={"input": "hi"})
            await answers_correctly(client, guard)
        return reply

    reply = run(body())
    rid = reply.headers["x-request-id"]
    assert reply.status_code == 500 and reply.headers["connection"] == "close"
    # the client learns the request id, not the server's internals; the server log has the cause
    assert reply.json()["error"] == {
        "message": f"the guard failed on this request (request id {rid})",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
    assert f"request {rid} failed" in caplog.text and "RuntimeError: boom" in caplog.text


@pytest.mark.parametrize("broken", ["missing", "corrupt_weights", "corrupt_onnx", "settings"])
def test_a_model_that_cannot_load_stops_the_command_with_one_line(
    tiny_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture, broken: str
) -> None:
    import shutil

    folder = tmp_path / "guard"
    shutil.copytree(tiny_export, folder)
    model = str(folder)
    if broken == "missing":
        model = str(tmp_path / "nowhere")
    elif broken == "corrupt_weights":
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    elif broken == "corrupt_onnx":
        (folder / ONNX_FILE).write_bytes(b"not a graph")
        model = str(folder / ONNX_FILE)
    else:
        (folder / "harmaug_guard.json").write_text(json.dumps({"max_length": "long"}))  # names the field
    with pytest.raises(SystemExit) as stopped:
        console_main(["--model", model, "--port", "1"])
    assert stopped.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "it/s]" not in line]  # tqdm bars
    assert len(lines) == 1 and lines[0].startswith("harmaug serve: error: ModelLoadError"), lines
    assert broken != "settings" or "max_length must be a whole number" in lines[0]


def test_settings_that_cannot_work_are_refused(tiny_export: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        console_main(["--model", str(tiny_export), "--max_rows", "300", "--max_queue_rows", "256"])
    assert "could never be queued" in capsys.readouterr().err


def json_bytes(payload: Any) -> bytes:
    """A JSON body as a client may send it: ``\\ud800`` escapes are valid JSON, not valid Unicode."""
    return json.dumps(payload).encode()


def test_text_that_is_not_unicode_is_refused_by_field_and_never_fails_its_batch(guard: Guard) -> None:
    bad = [
        (
            "/v1/classify",
            {"rows": [{"prompt": "fine"}, {"prompt": "a", "response": "x\ud800"}]},
            "rows[1].response",
        ),
        ("/v1/moderations", {"input": "\udfff"}, "input"),
        ("/v1/moderations", {"input": ["fine", "ab\ud800cd"]}, "input[1]"),
    ]

    async def body() -> list[httpx2.Response]:
        # every request waits for one shared model call: the bad ones would be in it
        async with served(guard, max_batch_size=64, max_wait_ms=500) as client:
            headers = {"content-type": "application/json"}
            sent = [client.post("/v1/moderations", json={"input": p}) for p in PROMPTS]
            sent += [
                client.post(path, content=json_bytes(payload), headers=headers) for path, payload, _ in bad
            ]
            replies = await asyncio.gather(*sent)
            await answers_correctly(client, guard)
        return replies

    replies = run(body())
    good, refused = replies[: len(PROMPTS)], replies[len(PROMPTS) :]
    assert [r.status_code for r in good] == [200] * len(PROMPTS)
    got = [r.json()["results"][0]["category_scores"]["unsafe"] for r in good]
    assert got == pytest.approx(guard.score(PROMPTS), abs=1e-6)
    for reply, (_, _, field) in zip(refused, bad):
        assert reply.status_code == 422, reply.text
        error = reply.json()["error"]
        assert error["param"] == field and error["code"] == "invalid_text"
        assert error["message"].startswith(f"{field}: invalid Unicode: a lone surrogate U+D")


def test_a_one_row_request_is_answered_while_a_large_one_is_scored(guard: Guard) -> None:
    long_row = {"prompt": " ".join(PROMPTS * 20), "response": RESPONSE * 50}

    async def body() -> tuple[float, float]:
        async with served(guard, max_wait_ms=0, max_rows=64, max_queue_rows=256) as client:
            done: dict[str, float] = {}

            async def timed(name: str, payload: Any) -> None:
                reply = await client.post("/v1/classify", json=payload)
                assert reply.status_code == 200
                done[name] = asyncio.get_running_loop().time()

            large = asyncio.create_task(timed("large", {"rows": [long_row] * 64}))
            while client.app.state.batcher.queued_rows == 0 and not large.done():
                await asyncio.sleep(0.005)
            await timed("small", {"rows": [{"prompt": "hi"}]})
            await large
            return done["small"], done["large"]

    small, large = run(body())
    assert small < large  # it took its turn between the large request's calls of 2 rows


class RawClient:
    """One ASGI request whose body arrives as ``chunks``, then waits (``hang``) or disconnects when
    ``leave`` is set: what httpx cannot send (a stalled body, a client that goes away)."""

    def __init__(self, app: Any, path: str, chunks: list[bytes], hang: bool = False) -> None:
        self.app, self.path, self.chunks, self.hang = app, path, list(chunks), hang
        self.leave = asyncio.Event()
        self.sent: list[dict[str, Any]] = []

    async def receive(self) -> dict[str, Any]:
        if self.chunks:
            chunk = self.chunks.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(self.chunks) or self.hang}
        await self.leave.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    async def call(self) -> None:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        await self.app(scope, self.receive, self.send)

    @property
    def status(self) -> int:
        return next(m["status"] for m in self.sent if m["type"] == "http.response.start")

    def json(self) -> Any:
        return json.loads(
            b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")
        )


def test_rows_of_a_client_that_disconnected_leave_the_queue(guard: Guard) -> None:
    async def body() -> None:
        async with served(guard, max_batch_size=64, max_wait_ms=60_000) as client:
            app = client.app
            raw = RawClient(app, "/v1/moderations", [json.dumps({"input": PROMPTS}).encode()])
            call = asyncio.create_task(raw.call())
            while app.state.batcher.queued_rows < len(PROMPTS):
                await asyncio.sleep(0.01)
            raw.leave.set()  # the client goes away while its rows wait for a batch
            await asyncio.wait_for(call, 10)
            assert app.state.batcher.queued_rows == 0
            text = (await client.get("/metrics")).text
        assert metric(text, "harmaug_batch_rows_count") == 0  # never scored

    run(body())


def test_a_body_that_stops_short_is_408_after_the_read_timeout(guard: Guard) -> None:
    async def body() -> None:
        async with served(guard, read_timeout_s=0.3) as client:
            raw = RawClient(client.app, "/v1/moderations", [b'{"input": "h'], hang=True)
            await asyncio.wait_for(raw.call(), 10)
            assert raw.status == 408
            assert raw.json()["error"]["code"] == "body_timeout"
            await answers_correctly(client, guard)

    run(body())
