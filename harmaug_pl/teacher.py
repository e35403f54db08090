"""Teachers: anything that returns P(unsafe) for (prompt, optional response) rows.

A row without a response is judged on the prompt (prompt harmfulness), a row with one on the
response (response harmfulness), as in HarmAug. Teachers return raw probabilities: the trainer
applies any temperature. Every teacher is built from plain YAML values and loads nothing until it
first scores, so a pack can name one without paying for it at parse time.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from harmaug_pl.backends.base import Chat, ChatBackend, truncated_rows
from harmaug_pl.errors import ConfigError, DataError
from harmaug_pl.models import load_sequence_classifier, load_tokenizer, resolve_device

DEFAULT_JUDGE_PROMPT_TEMPLATE = (
    "You are a content safety classifier. Is the following user request safe or unsafe?\n\n"
    "User request: {prompt}\n\n"
    "Answer with exactly one word: safe or unsafe."
)
DEFAULT_JUDGE_RESPONSE_TEMPLATE = (
    "You are a content safety classifier. Is the assistant's response to the user request below "
    "safe or unsafe?\n\n"
    "User request: {prompt}\n\n"
    "Assistant response: {response}\n\n"
    "Answer with exactly one word: safe or unsafe."
)

_PLACEHOLDER = re.compile(r"\{(prompt|response)\}")


@runtime_checkable
class Teacher(Protocol):
    """Scores rows with P(unsafe); ``describe()`` is its identity in cache keys."""

    batch_size: int

    def score(self, prompts: Sequence[str], responses: Sequence[str | None]) -> list[float]:
        """P(unsafe) per row; ``responses[i] is None`` means a prompt-only row."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of everything that changes the scores."""
        ...

    def close(self) -> None:
        """Free the teacher's memory (called before the student trains)."""
        ...


def fill_template(template: str, prompt: str, response: str | None = None) -> str:
    """Replace ``{prompt}``/``{response}`` in one pass: braces in the texts or the template stay as is."""
    values = {"prompt": prompt, "response": response or ""}
    return _PLACEHOLDER.sub(lambda match: values[match.group(1)], template)


def _braces(names: Sequence[str]) -> str:
    return ", ".join("{" + name + "}" for name in names)


def _check_template(
    owner: str, field: str, template: str, required: Sequence[str], optional: Sequence[str] = ()
) -> None:
    found = set(_PLACEHOLDER.findall(template))
    missing = [name for name in required if name not in found]
    unexpected = sorted(found - set(required) - set(optional))
    if missing or unexpected:
        raise ConfigError(
            f"{owner}.{field} must contain the placeholders {_braces(required)}"
            + (f" (and may contain {_braces(optional)})" if optional else "")
            + (f"; missing: {_braces(missing)}" if missing else "")
            + (f"; not allowed here: {_braces(unexpected)}" if unexpected else "")
            + f" (got {template!r})"
        )


class _BatchedTeacher(ABC):
    """Validates the rows and feeds them to ``_score_batch`` in chunks of ``batch_size``.

    Rows are chunked in order of length so that a batch pads little (40 OpenAI-moderation prompts at
    batch 8: 9.6k instead of 15.3k padded tokens for 7.1k real ones); scores come back in row order,
    and so does :attr:`last_truncated` (rows whose input was cut to fit the model).
    """

    def __init__(self, batch_size: int) -> None:
        if batch_size < 1:
            raise ConfigError(f"{type(self).__name__}.batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.last_truncated: list[bool] = []

    def score(self, prompts: Sequence[str], responses: Sequence[str | None]) -> list[float]:
        """P(unsafe) per row (prompt-only rows: prompt harmfulness; others: response harmfulness)."""
        if len(prompts) != len(responses):
            raise DataError(
                f"{type(self).__name__}.score got {len(prompts)} prompts but {len(responses)} responses"
            )
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i] or ""))
        scores = [0.0] * len(prompts)
        truncated = [False] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            batch = self._score_batch([prompts[i] for i in chunk], [responses[i] for i in chunk])
            for i, value, cut in zip(chunk, batch, self._truncated(len(chunk))):
                scores[i] = value
                truncated[i] = cut
        self.last_truncated = truncated
        return scores

    def _truncated(self, count: int) -> list[bool]:
        """Which rows of the latest ``_score_batch`` had their input cut (none, unless overridden)."""
        return [False] * count

    @abstractmethod
    def _score_batch(self, prompts: list[str], responses: list[str | None]) -> list[float]:
        """P(unsafe) for one chunk of at most ``batch_size`` rows."""


class _TwoWordTeacher(_BatchedTeacher):
    """An LLM whose next token is a verdict word: P(unsafe) = softmax over the two words' first tokens.

    Both log-probabilities are normalised over the full vocabulary first, so the result is
    exp(lu) / (exp(lu) + exp(ls)) whatever other tokens rank above them.
    """

    add_generation_prompt: bool
    suffix: str

    def __init__(self, backend: ChatBackend, unsafe_word: str, safe_word: str, batch_size: int) -> None:
        super().__init__(batch_size)
        self.backend = backend
        self.unsafe_word = unsafe_word
        self.safe_word = safe_word
        self._token_ids: list[int] | None = None

    @abstractmethod
    def _chats(self, prompts: list[str], responses: list[str | None]) -> list[Chat]:
        """The chat the model reads for each row."""

    def _verdict_ids(self) -> list[int]:
        if self._token_ids is None:
            unsafe, safe = (self.backend.first_token_id(w) for w in (self.unsafe_word, self.safe_word))
            if unsafe == safe:
                raise ConfigError(
                    f"{type(self).__name__}: unsafe_word {self.unsafe_word!r} and safe_word "
                    f"{self.safe_word!r} start with the same token (id {unsafe}) for model "
                    f"{self.backend.model_id!r}; "
                    "choose words whose first tokens differ"
                )
            self._token_ids = [unsafe, safe]
        return self._token_ids

    def _score_batch(self, prompts: list[str], responses: list[str | None]) -> list[float]:
        logprobs = self.backend.next_token_logprobs(
            self._chats(prompts, responses),
            self._verdict_ids(),
            add_generation_prompt=self.add_generation_prompt,
            suffix=self.suffix,
        )
        return torch.sigmoid(logprobs[:, 0] - logprobs[:, 1]).tolist()

    def _truncated(self, count: int) -> list[bool]:
        return truncated_rows(self.backend, count)

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": type(self).__name__,
            "backend": self.backend.describe(),
            "unsafe_word": self.unsafe_word,
            "safe_word": self.safe_word,
            "suffix": self.suffix,
        }

    def close(self) -> None:
        self.backend.close()


class LlamaGuardTeacher(_TwoWordTeacher):
    """A Llama-Guard-style guard: its own chat template, then ``suffix``; it writes safe/unsafe next.

    The chat is ``[user: prompt]`` or ``[user: prompt, assistant: response]``, rendered without a
    generation prompt and followed by ``"\\n\\n"``: what the HarmAug code does for Llama-Guard-3.
    """

    add_generation_prompt = False

    def __init__(
        self,
        backend: ChatBackend,
        unsafe_word: str = "unsafe",
        safe_word: str = "safe",
        suffix: str = "\n\n",
        batch_size: int = 8,
    ) -> None:
        super().__init__(backend, unsafe_word, safe_word, batch_size)
        self.suffix = suffix

    def _chats(self, prompts: list[str], responses: list[str | None]) -> list[Chat]:
        return [
            [{"role": "user", "content": prompt}]
            + ([] if response is None else [{"role": "assistant", "content": response}])
            for prompt, response in zip(prompts, responses)
        ]


class JudgeTeacher(_TwoWordTeacher):
    """A general instruction-tuned LLM as judge: one user message from a template, answer one word.

    ``prompt_template`` (prompt-only rows) holds ``{prompt}``; ``response_template`` holds
    ``{prompt}`` and ``{response}``. Small judges are weak; prefer a real guard model when you can.
    """

    add_generation_prompt = True
    suffix = ""

    def __init__(
        self,
        backend: ChatBackend,
        prompt_template: str = DEFAULT_JUDGE_PROMPT_TEMPLATE,
        response_template: str = DEFAULT_JUDGE_RESPONSE_TEMPLATE,
        unsafe_word: str = "unsafe",
        safe_word: str = "safe",
        batch_size: int = 8,
    ) -> None:
        _check_template("JudgeTeacher", "prompt_template", prompt_template, ["prompt"])
        _check_template("JudgeTeacher", "response_template", response_template, ["prompt", "response"])
        super().__init__(backend, unsafe_word, safe_word, batch_size)
        self.prompt_template = prompt_template
        self.response_template = response_template

    def _chats(self, prompts: list[str], responses: list[str | None]) -> list[Chat]:
        return [
            [
                {
                    "role": "user",
                    "content": fill_template(
                        self.prompt_template if response is None else self.response_template, prompt, response
                    ),
                }
            ]
            for prompt, response in zip(prompts, responses)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "prompt_template": self.prompt_template,
            "response_template": self.response_template,
        }


class SequenceClassifierTeacher(_BatchedTeacher):
    """Any ``AutoModelForSequenceClassification``; rows are encoded as (prompt, response) text pairs.

    ``unsafe_label`` is a label name (matched case-insensitively against the model's ``id2label``) or a
    class index. A single-logit model is read with a sigmoid and ``unsafe_label`` is not used.
    """

    def __init__(
        self,
        model: str,
        unsafe_label: int | str = "unsafe",
        max_length: int = 512,
        batch_size: int = 32,
        dtype: str = "float32",
        device: str = "cpu",
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(batch_size)
        if max_length < 1:
            raise ConfigError(f"SequenceClassifierTeacher.max_length must be >= 1, got {max_length}")
        resolve_device(device)
        self.model = model
        self.unsafe_label = unsafe_label
        self.max_length = max_length
        self.dtype = dtype
        self.device = device
        self.trust_remote_code = trust_remote_code
        self._loaded: tuple[Any, Any, int] | None = None

    def _load(self) -> tuple[Any, Any, int]:
        if self._loaded is None:
            classifier = load_sequence_classifier(
                self.model, dtype=self.dtype, device=self.device, trust_remote_code=self.trust_remote_code
            )
            tokenizer = load_tokenizer(self.model, trust_remote_code=self.trust_remote_code)
            self._loaded = (classifier, tokenizer, self._unsafe_index(classifier.config))
        return self._loaded

    def _unsafe_index(self, config: Any) -> int:
        labels = {int(index): str(name) for index, name in config.id2label.items()}
        if config.num_labels == 1:
            return 0
        if isinstance(self.unsafe_label, int) and self.unsafe_label in labels:
            return self.unsafe_label
        if isinstance(self.unsafe_label, str):
            matches = [index for index, name in labels.items() if name.lower() == self.unsafe_label.lower()]
            if len(matches) == 1:
                return matches[0]
        raise ConfigError(
            f"SequenceClassifierTeacher: unsafe_label {self.unsafe_label!r} is not a label of model "
            f"{self.model!r}; its labels are {labels} (give a name or an index)"
        )

    def _score_batch(self, prompts: list[str], responses: list[str | None]) -> list[float]:
        classifier, tokenizer, unsafe = self._load()
        encoded = [
            tokenizer(prompt, response, truncation=True, max_length=self.max_length)
            if response is not None
            else tokenizer(prompt, truncation=True, max_length=self.max_length)
            for prompt, response in zip(prompts, responses)
        ]
        batch = tokenizer.pad(encoded, padding=True, return_tensors="pt").to(classifier.device)
        with torch.inference_mode():
            logits = classifier(**batch).logits.float()
        if logits.shape[-1] == 1:
            return torch.sigmoid(logits[:, 0]).tolist()
        return logits.softmax(-1)[:, unsafe].tolist()

    def describe(self) -> dict[str, Any]:
        return {
            "teacher": "SequenceClassifierTeacher",
            "model": self.model,
            "unsafe_label": self.unsafe_label,
            "max_length": self.max_length,
            "dtype": self.dtype,
        }

    def close(self) -> None:
        self._loaded = None


class CallableTeacher(_BatchedTeacher):
    """A Python function ``texts -> P(unsafe) per text`` named by import path (``module:attr``).

    Prompt-only rows pass the prompt; pairs pass ``pair_template`` (which must hold ``{response}``,
    the text judged, and may hold ``{prompt}``). The
    embedded default uses ``profanity_check:predict_prob`` (a TF-IDF linear model; weak but tiny).
    """

    def __init__(
        self, function: str, pair_template: str = "{prompt}\n{response}", batch_size: int = 256
    ) -> None:
        super().__init__(batch_size)
        # the response is what a prompt+response row is judged on; the prompt is optional context
        _check_template("CallableTeacher", "pair_template", pair_template, ["response"], ["prompt"])
        module, sep, attr = function.partition(":") if ":" in function else function.rpartition(".")
        if not module or not sep or not attr:
            raise ConfigError(
                f"CallableTeacher.function must be 'module:attr' or 'module.attr', got {function!r}"
            )
        self.function = function
        self.pair_template = pair_template
        self._path = (module, attr)
        self._callable: Any = None

    def _resolve(self) -> Any:
        if self._callable is None:
            module_name, attr = self._path
            try:
                module = importlib.import_module(module_name)
            except ImportError as err:
                raise ConfigError(
                    f"CallableTeacher.function {self.function!r}: cannot import {module_name!r}: {err}"
                ) from err
            target = getattr(module, attr, None)
            if not callable(target):
                raise ConfigError(
                    f"CallableTeacher.function {self.function!r}: module {module_name!r} has no "
                    f"callable {attr!r}"
                )
            self._callable = target
        return self._callable

    def _score_batch(self, prompts: list[str], responses: list[str | None]) -> list[float]:
        texts = [
            prompt if response is None else fill_template(self.pair_template, prompt, response)
            for prompt, response in zip(prompts, responses)
        ]
        output = self._resolve()(texts)
        try:
            scores = np.asarray(output, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"CallableTeacher.function {self.function!r} returned non-numbers: {err}"
            ) from err
        problem = None
        if scores.shape != (len(texts),):
            problem = f"shape {scores.shape} for {len(texts)} texts"
        elif not np.isfinite(scores).all():
            problem = "non-finite values"
        elif ((scores < 0) | (scores > 1)).any():
            problem = "values outside [0, 1]"
        if problem:
            raise ConfigError(
                f"CallableTeacher.function {self.function!r} must return one probability in [0, 1] per text; "
                f"got {problem}"
            )
        return scores.tolist()

    def describe(self) -> dict[str, Any]:
        top = self._path[0].split(".")[0]
        distributions = importlib.metadata.packages_distributions().get(top, [])
        versions = {name: importlib.metadata.version(name) for name in distributions}
        return {
            "teacher": "CallableTeacher",
            "function": self.function,
            "pair_template": self.pair_template,
            "versions": versions,  # a new release of the package may change its scores
        }

    def close(self) -> None:
        self._callable = None
