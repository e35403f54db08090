"""A stand-in ``vllm`` module for CPU tests, shaped like vLLM's real offline API.

Mirrored from vLLM (vllm/entrypoints/llm.py, vllm/sampling_params.py, vllm/outputs.py, vllm/logprobs.py):
``LLM(model, *, dtype, gpu_memory_utilization, tensor_parallel_size, ...)``;
``LLM.generate(prompts, sampling_params, *, use_tqdm)`` with ``{"prompt_token_ids": [...]}`` prompts
and one ``SamplingParams`` or a list of them, one per prompt;
``SamplingParams`` is a msgspec Struct, so an unknown field is a ``TypeError``; results are
``RequestOutput.outputs[0]`` (a ``CompletionOutput``) whose ``logprobs`` holds one ``dict[int, Logprob]``
per generated token: the sampled token plus the ``logprob_token_ids`` asked for.

Scores are real: the fake runs the tiny model with transformers and returns full-vocabulary
log-softmax values (vLLM's default ``logprobs_mode="raw_logprobs"``). Generated text is a marker
that names the seed, the LOCAL_RANK it saw and the end of the prompt, so tests can see how requests
were built. ``LLM.generate`` scores when ``logprob_token_ids`` is set and generates otherwise.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass, field
from typing import Any

import torch

SAMPLING_FIELDS = (  # a subset of vllm.SamplingParams' fields (all this package may use)
    "n", "temperature", "top_p", "top_k", "seed", "stop", "max_tokens", "logprobs", "logprob_token_ids",
)  # fmt: skip


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class Recorder:
    """Every call the fake engine received, for tests to inspect."""

    llm_kwargs: list[dict[str, Any]] = field(default_factory=list)
    generate_calls: list[dict[str, Any]] = field(default_factory=list)


class Platform:
    """``vllm.platforms.current_platform``'s part the backend reads (``vllm/platforms/interface.py``)."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type

    def is_cpu(self) -> bool:
        return self.device_type == "cpu"


def make_module(
    *, with_logprob_token_ids: bool = True, drop_requested: bool = False, device_type: str = "cuda"
) -> types.ModuleType:
    """A fresh fake ``vllm``; ``with_logprob_token_ids=False`` mimics a vLLM from before that field.

    Its ``platforms`` submodule reports ``device_type``; put it in ``sys.modules["vllm.platforms"]``
    beside the module (:func:`install`)."""
    fields = [f for f in SAMPLING_FIELDS if with_logprob_token_ids or f != "logprob_token_ids"]
    recorder = Recorder()

    class SamplingParams:
        def __init__(self, **kwargs: Any) -> None:
            unknown = sorted(set(kwargs) - set(fields))
            if unknown:
                raise TypeError(f"Unexpected keyword argument {unknown[0]!r}")
            self.__dict__.update({"n": 1, "temperature": 1.0, "top_p": 1.0, "seed": None, "stop": None})
            self.__dict__.update({"max_tokens": 16, "logprobs": None, "logprob_token_ids": None})
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, model: str, **kwargs: Any) -> None:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            recorder.llm_kwargs.append({"model": model, **kwargs})
            self.tokenizer = AutoTokenizer.from_pretrained(model)
            self.model = AutoModelForCausalLM.from_pretrained(model).eval()

        def get_tokenizer(self) -> Any:
            return self.tokenizer

        def generate(
            self, prompts: list[dict[str, Any]], sampling_params: Any = None, *, use_tqdm: bool = True
        ):
            recorder.generate_calls.append({"prompts": prompts, "params": sampling_params})
            if isinstance(sampling_params, list):  # vLLM pairs a list with the prompts one by one
                if len(sampling_params) != len(prompts):
                    raise ValueError("The lengths of prompts and sampling_params must be the same.")
                params = sampling_params
            else:
                params = [sampling_params] * len(prompts)
            if any(p.logprob_token_ids is None for p in params):
                return [self._marker(n, prompt, p) for n, (prompt, p) in enumerate(zip(prompts, params))]
            outputs = []
            for n, prompt in enumerate(prompts):
                ids = torch.tensor([prompt["prompt_token_ids"]])
                with torch.inference_mode():
                    logprobs = self.model(ids).logits[0, -1].float().log_softmax(-1)
                sampled = int(logprobs.argmax())
                wanted = [] if drop_requested else list(sampling_params.logprob_token_ids or [])
                step = {token: Logprob(float(logprobs[token])) for token in [sampled, *wanted]}
                outputs.append(
                    RequestOutput(
                        str(n),
                        None,
                        prompt["prompt_token_ids"],
                        [CompletionOutput(0, "", [sampled], None, [step])],
                    )
                )
            return outputs

        def _marker(self, n: int, prompt: dict[str, Any], params: Any) -> RequestOutput:
            ids = prompt["prompt_token_ids"]
            rank = os.environ.get("LOCAL_RANK")  # what a DDP launcher would have told vLLM
            end = self.tokenizer.decode(ids[-12:])
            text = f"<seed={params.seed} local_rank={rank} end={end!r}>"
            return RequestOutput(str(n), None, ids, [CompletionOutput(0, text, [], None, None)])

    module = types.ModuleType("vllm")
    module.__version__ = "0.0.fake"
    module.LLM = LLM
    module.SamplingParams = SamplingParams
    module.recorder = recorder
    module.platforms = types.ModuleType("vllm.platforms")
    module.platforms.current_platform = Platform(device_type)
    return module


def install(monkeypatch: Any, module: types.ModuleType | None) -> None:
    """Make ``module`` (``None``: no vLLM at all) what ``import vllm`` and ``vllm.platforms`` give for one
    test; undone after it, so a real vLLM imported elsewhere is never mixed with the fake."""
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.platforms", None if module is None else module.platforms)
