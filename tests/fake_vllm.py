"""A stand-in ``vllm`` module for CPU tests, shaped like vLLM's real offline API.

Mirrored from vLLM (vllm/entrypoints/llm.py, vllm/sampling_params.py, vllm/outputs.py, vllm/logprobs.py):
``LLM(model, *, dtype, gpu_memory_utilization, tensor_parallel_size, ...)``; ``LLM.chat(messages,
sampling_params, use_tqdm, chat_template, add_generation_prompt, continue_final_message)``;
``LLM.generate(prompts, sampling_params, *, use_tqdm)`` with ``{"prompt_token_ids": [...]}`` prompts;
``SamplingParams`` is a msgspec Struct, so an unknown field is a ``TypeError``; results are
``RequestOutput.outputs[0]`` (a ``CompletionOutput``) whose ``logprobs`` holds one ``dict[int, Logprob]``
per generated token: the sampled token plus the ``logprob_token_ids`` asked for.

Scores are real: the fake runs the tiny model with transformers and returns full-vocabulary
log-softmax values (vLLM's default ``logprobs_mode="raw_logprobs"``). Generated text is a marker
that names the flags, the seed and the LOCAL_RANK it saw, so tests can see how requests were built.
"""

from __future__ import annotations

import os
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
    chat_calls: list[dict[str, Any]] = field(default_factory=list)
    generate_calls: list[dict[str, Any]] = field(default_factory=list)


def make_module(*, with_logprob_token_ids: bool = True, drop_requested: bool = False) -> types.ModuleType:
    """A fresh fake ``vllm``; ``with_logprob_token_ids=False`` mimics a vLLM from before that field."""
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

        def chat(
            self,
            messages: list[list[dict[str, str]]],
            sampling_params: Any = None,
            use_tqdm: bool = True,
            chat_template: str | None = None,
            add_generation_prompt: bool = True,
            continue_final_message: bool = False,
        ) -> list[RequestOutput]:
            if add_generation_prompt and continue_final_message:
                raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt`")
            params = (
                sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(messages)
            )
            recorder.chat_calls.append(
                {
                    "messages": messages,
                    "params": params,
                    "chat_template": chat_template,
                    "add_generation_prompt": add_generation_prompt,
                    "continue_final_message": continue_final_message,
                }
            )
            outputs = []
            for n, (chat, p) in enumerate(zip(messages, params)):
                kind = "prefill" if continue_final_message else "reply"
                rank = os.environ.get("LOCAL_RANK")  # what a DDP launcher would have told vLLM
                text = f"<{kind} seed={p.seed} local_rank={rank} last={chat[-1]['content']}>"
                outputs.append(RequestOutput(str(n), None, [], [CompletionOutput(0, text, [], None, None)]))
            return outputs

        def generate(
            self, prompts: list[dict[str, Any]], sampling_params: Any = None, *, use_tqdm: bool = True
        ):
            recorder.generate_calls.append({"prompts": prompts, "params": sampling_params})
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

    module = types.ModuleType("vllm")
    module.__version__ = "0.0.fake"
    module.LLM = LLM
    module.SamplingParams = SamplingParams
    module.recorder = recorder
    return module
