"""Any Hugging Face sequence classifier as a teacher."""

from __future__ import annotations

from typing import Any

import torch

from harmaug_pl.errors import ConfigError
from harmaug_pl.model_loading import load_sequence_classifier, load_tokenizer, resolve_device
from harmaug_pl.teachers.base import BatchedTeacher


class SequenceClassifierTeacher(BatchedTeacher):
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
