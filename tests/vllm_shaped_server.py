"""A loopback HTTP server answering in the exact shapes of vLLM 0.33's OpenAI-compatible API, backed by
a tiny model's real logits (FastAPI + uvicorn, the project's web framework).

Shapes copied from the vllm 0.33.0 wheel (``pip download --no-deps vllm==0.33.0``):
``CompletionRequest``/``CompletionResponse``/``CompletionLogProbs`` (entrypoints/openai/completion/
protocol.py l.49-723), ``ChatCompletionRequest``/``ChatCompletionResponse`` (chat_completion/protocol.py
l.76-160, 235-480), ``ModelCard`` with ``owned_by="vllm"`` and ``root`` = the served path (serve/engine/
protocol.py l.105-118; openai/models/serving.py l.64-76), ``ErrorResponse`` (protocol.py l.79-87), the
401 body of ``--api-key`` for paths under /v1 only (serve/middleware/authenticate.py l.11, 60), and
``/tokenize`` at the server root (serve/tokenize/). Log-probabilities: with ``logprob_token_ids`` the
sampled token plus exactly those ids, all returned (generate/base/serving.py l.368-378), with ``logprobs=k``
the sampled token plus the top k; keys ``token_id:<id>`` under ``return_tokens_as_token_ids`` (l.322),
values the log-softmax of the raw logits floored at -9999.0 (completion/serving.py l.764). Unknown
request fields are ignored, as vLLM's ``OpenAIBaseModel`` (extra="allow") does; ``named_logprobs=False``
makes ``logprob_token_ids`` one of them (a vLLM older than 0.28).

It never imports harmaug_pl: a prompt given as token ids is run on the model exactly as received.
Faults for the next requests (``server.faults.push(...)``): ``("status", code[, retry_after])``,
``("slow", seconds)``, ``("malformed",)``, ``("drop",)`` (headers sent, then the connection is cut)
and ``("die",)`` (SIGKILL of the server process; only where it runs in its own process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")


class Faults:
    """Faults to apply to the next generation requests, first in first out (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[tuple[Any, ...]] = []

    def push(self, *faults: tuple[Any, ...]) -> None:
        with self._lock:
            self._queue.extend(faults)

    def pop(self) -> tuple[Any, ...] | None:
        with self._lock:
            return self._queue.pop(0) if self._queue else None


@dataclass
class ServerState:
    model_dir: str
    served_name: str
    root: str
    api_key: str | None = None
    named_logprobs: bool = True
    max_model_len: int = 512
    die_on_request: int | None = None  # SIGKILL itself when this generation request arrives (1-based)
    faults: Faults = field(default_factory=Faults)
    seen: list[dict[str, Any]] = field(default_factory=list)  # every generation request, as the model ran it
    requests: int = 0

    def __post_init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        self.lock = threading.Lock()  # one model call at a time, like a batch-of-one engine


def error(message: str, status: int, kind: str = "BadRequestError", param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    probs = (logits / temperature).softmax(-1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        keep = ordered.cumsum(-1) - ordered < top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], ordered[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def run_model(state: ServerState, ids: list[int], body: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """Sample up to ``max_tokens`` after exactly ``ids``; per step the log-probs the request asked for."""
    temperature = 1.0 if body.get("temperature") is None else float(body["temperature"])
    top_p = 1.0 if body.get("top_p") is None else float(body["top_p"])
    generator = torch.Generator().manual_seed(
        body["seed"] if body.get("seed") is not None else time.time_ns()
    )
    stops = body.get("stop") or []
    stops = [stops] if isinstance(stops, str) else list(stops)
    named = body.get("logprob_token_ids") if state.named_logprobs else None
    k = body.get("logprobs")  # completions: an int (chat's boolean form is not used here)
    k = k if isinstance(k, int) and not isinstance(k, bool) else None
    tokens: list[int] = []
    steps: list[dict[int, float]] = []
    finish, stop_reason, text = "length", None, ""
    with state.lock, torch.inference_mode():
        for _ in range(max_tokens):
            logits = state.model(torch.tensor([ids + tokens])).logits[0, -1].float()
            logprobs = logits.log_softmax(-1)
            token = _sample(logits, temperature, top_p, generator)
            step = {token: float(logprobs[token])}
            if named:
                step.update({int(t): float(logprobs[int(t)]) for t in named})
            elif k:
                step.update({int(t): float(logprobs[int(t)]) for t in logprobs.topk(k).indices})
            tokens.append(token)
            steps.append(step)
            if token == state.tokenizer.eos_token_id:
                finish = "stop"
                tokens.pop()
                break
            text = state.tokenizer.decode(tokens, skip_special_tokens=True)
            hits = [(text.find(s), s) for s in stops if s and s in text]
            if hits:
                at, stop_reason = min(hits)
                text, finish = text[:at], "stop"
                break
        else:
            text = state.tokenizer.decode(tokens, skip_special_tokens=True)
    return {"text": text, "tokens": tokens, "steps": steps, "finish": finish, "stop_reason": stop_reason}


def completion_logprobs(state: ServerState, result: dict[str, Any], as_ids: bool) -> dict[str, Any]:
    """``CompletionLogProbs`` of the generated tokens (vLLM's ``_create_completion_logprobs``)."""

    def name(token: int) -> str:
        return f"token_id:{token}" if as_ids else state.tokenizer.decode([token])

    offsets, token_logprobs, tokens, top = [], [], [], []
    for token, step in zip(result["tokens"], result["steps"]):
        offsets.append(0 if not offsets else offsets[-1] + len(tokens[-1]))
        tokens.append(name(token))
        token_logprobs.append(max(step[token], -9999.0))
        top.append({name(t): max(v, -9999.0) for t, v in step.items()})
    return {"text_offset": offsets, "token_logprobs": token_logprobs, "tokens": tokens, "top_logprobs": top}


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        if state.api_key and request.url.path.startswith(GUARDED_PREFIX):
            if request.headers.get("Authorization") != f"Bearer {state.api_key}":
                return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    async def fault() -> Response | None:
        state.requests += 1
        if state.die_on_request is not None and state.requests == state.die_on_request:
            os.kill(os.getpid(), signal.SIGKILL)
        kind = state.faults.pop()
        if kind is None:
            return None
        if kind[0] == "status":
            headers = {"Retry-After": str(kind[2])} if len(kind) > 2 else {}
            return JSONResponse({"error": {"message": "busy", "code": kind[1]}}, kind[1], headers=headers)
        if kind[0] == "slow":
            await asyncio.sleep(kind[1])
            return None
        if kind[0] == "malformed":
            return PlainTextResponse('{"id": "cmpl-1", "choices": [', media_type="application/json")
        if kind[0] == "drop":

            async def cut() -> Any:
                yield b'{"id": "cmpl-'
                raise ConnectionResetError("fault: connection dropped")

            return StreamingResponse(cut(), media_type="application/json")
        if kind[0] == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        raise ValueError(f"unknown fault {kind}")

    def check_model(body: dict[str, Any]) -> JSONResponse | None:
        if body.get("model") not in (None, state.served_name):
            return error(f"The model `{body['model']}` does not exist.", 404, "NotFoundError", "model")
        return None

    async def admit(request: Request) -> tuple[dict[str, Any], Response | None]:
        """A generation request's body, or the answer that ends it first (a fault, an unknown model)."""
        body = await request.json()
        return body, await fault() or check_model(body)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        permission = {
            "id": f"modelperm-{uuid.uuid4().hex}",
            "object": "model_permission",
            "created": created,
            "allow_create_engine": False,
            "allow_sampling": True,
            "allow_logprobs": True,
            "allow_search_indices": False,
            "allow_view": True,
            "allow_fine_tuning": False,
            "organization": "*",
            "group": None,
            "is_blocking": False,
        }
        card = {
            "id": state.served_name,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": state.root,
            "parent": None,
            "max_model_len": state.max_model_len,
            "permission": [permission],
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        body = await request.json()
        if (bad := check_model(body)) is not None:
            return bad
        if "messages" in body:
            text = render_chat(state, body)
            if isinstance(text, JSONResponse):
                return text
            ids = state.tokenizer(text, add_special_tokens=body.get("add_special_tokens", False))["input_ids"]
        else:
            ids = state.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))[
                "input_ids"
            ]
        return {"count": len(ids), "max_model_len": state.max_model_len, "tokens": ids, "token_strs": None}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body, refused = await admit(request)
        if refused is not None:
            return refused
        prompt = body.get("prompt")
        if prompt is None or prompt == "":
            return error(
                "Either prompt or prompt_embeds must be provided and non-empty.", 400, param="prompt"
            )
        if body.get("logprob_token_ids") and body.get("logprobs") is None and state.named_logprobs:
            return error(
                "when using `logprob_token_ids`, `logprobs` must be set.", 400, param="logprob_token_ids"
            )
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        add_special = body.get("add_special_tokens", True)
        prompts = [
            p if isinstance(p, list) else state.tokenizer(p, add_special_tokens=add_special)["input_ids"]
            for p in prompt
        ]
        max_tokens = 16 if body.get("max_tokens") is None else int(body["max_tokens"])
        too_long = [len(ids) for ids in prompts if len(ids) + max_tokens > state.max_model_len]
        if too_long:
            return error(
                f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                f"requested {too_long[0] + max_tokens} tokens",
                400,
            )
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for index, ids in enumerate(prompts):
            result = await run_in_threadpool(run_model, state, list(ids), body, max_tokens)
            state.seen.append({"endpoint": "completions", "prompt_ids": list(ids), "body": body})
            logprobs = None
            if body.get("logprobs") is not None:
                logprobs = completion_logprobs(state, result, bool(body.get("return_tokens_as_token_ids")))
            choices.append(
                {
                    "index": index,
                    "text": result["text"],
                    "logprobs": logprobs,
                    "finish_reason": result["finish"],
                    "stop_reason": result["stop_reason"],
                    "token_ids": None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": None,
                    "routed_experts": None,
                    "weight_versions": None,
                }
            )
            prompt_tokens += len(ids)
            completion_tokens += len(result["tokens"])
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": state.served_name,
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, completion_tokens),
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body, refused = await admit(request)
        if refused is not None:
            return refused
        text = render_chat(state, body)
        if isinstance(text, JSONResponse):
            return text
        ids = state.tokenizer(text, add_special_tokens=body.get("add_special_tokens", False))["input_ids"]
        max_tokens = (
            body.get("max_completion_tokens") or body.get("max_tokens") or state.max_model_len - len(ids)
        )
        result = await run_in_threadpool(run_model, state, list(ids), body, int(max_tokens))
        state.seen.append({"endpoint": "chat", "prompt_ids": list(ids), "prompt_text": text, "body": body})
        message = {
            "role": "assistant",
            "content": result["text"],
            "refusal": None,
            "annotations": None,
            "audio": None,
            "function_call": None,
            "reasoning": None,
        }
        choice = {
            "index": 0,
            "message": message,
            "logprobs": None,
            "finish_reason": result["finish"],
            "stop_reason": result["stop_reason"],
            "token_ids": None,
            "routed_experts": None,
            "weight_versions": None,
        }
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": state.served_name,
            "choices": [choice],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(len(ids), len(result["tokens"])),
            "prompt_logprobs": None,
            "prompt_token_ids": None,
            "prompt_text": text if body.get("return_prompt_text") else None,
            "kv_transfer_params": None,
            "ec_transfer_params": None,
            "metrics": None,
        }

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    return app


def render_chat(state: ServerState, body: dict[str, Any]) -> str | JSONResponse:
    """The chat template applied as vLLM's chat endpoint applies it (the server's own template)."""
    add_generation_prompt = body.get("add_generation_prompt", True)
    continue_final_message = body.get("continue_final_message", False)
    if add_generation_prompt and continue_final_message:
        return error(
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.", 400
        )  # chat_completion/protocol.py l.1063-1066
    return state.tokenizer.apply_chat_template(
        body["messages"],
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
    )


@contextlib.contextmanager
def serve_in_thread(state: ServerState) -> Iterator[str]:
    """Serve ``state`` on a free loopback port in this process; yields the base URL (``.../v1``)."""
    server = uvicorn.Server(uvicorn.Config(build_app(state), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the loopback server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def spawn(model_dir: Path, port: int, served_name: str, *extra: str) -> subprocess.Popen:
    """The server in its own process (so a test can kill it); returns once it answers /health."""
    repo = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "tests.vllm_shaped_server", str(model_dir), "--port", str(port)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([*command, "--served-name", served_name, *extra], cwd=repo, env=env)
    wait_until_up(process, port)
    return process


def wait_until_up(process: subprocess.Popen, port: int, limit_s: float = 120.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server process exited with {process.returncode} before answering")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the server on port {port} did not start within {limit_s}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--served-name", required=True)
    parser.add_argument("--root", default=None)
    parser.add_argument("--die-on-request", type=int, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    state = ServerState(
        args.model_dir, args.served_name, args.root or args.model_dir, die_on_request=args.die_on_request
    )
    uvicorn.run(build_app(state), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
