"""Shared fixtures: tiny models are built once per test session in a tmp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

# Tiny models run faster on one thread, and two threads fight any other job for 2 cores.
torch.set_num_threads(1)

from tests.tiny_models import (  # noqa: E402
    GUARD_TEMPLATE,
    LLAMA3_SPECIAL,
    LLAMA_GUARD_3_TEMPLATE,
    save_tiny_bert,
    save_tiny_deberta,
    save_tiny_llama,
)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer chat LLM (ChatML template): generator, responder or judge."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_guard(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer LLM whose chat template mimics Llama Guard's (whole conversation in one turn).

    Hidden size 64, not 32: on CPUs with AVX512-BF16, bitsandbytes' eval-mode 4-bit path repacks each
    weight by blocks of 64 input features and fails on narrower layers (any real model is wider), and
    the consumer_24gb pack loads this teacher in 4 bits.
    """
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_guard"),
        chat_template=GUARD_TEMPLATE,
        seed=1,
        hidden_size=64,
        intermediate_size=128,
    )


@pytest.fixture(scope="session")
def tiny_student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer DeBERTa-v2 sequence classifier."""
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny_student"))


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny DeBERTa-v2 without a classification head, as a base model from the hub is."""
    return save_tiny_deberta(tmp_path_factory.mktemp("tiny_encoder"), head=False)


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory: pytest.TempPathFactory, tiny_student: Path) -> Path:
    """The tiny student exported as a guard folder with model.onnx and model.int8.onnx beside it."""
    from harmaug_pl.deploy.export import export, from_model

    folder = tmp_path_factory.mktemp("tiny_export") / "guard"
    reference = from_model(str(tiny_student), folder, max_length=64, threshold=0.5, seed=0)
    export(folder, reference, sample_size=8)
    return folder


@pytest.fixture(scope="session")
def tiny_bert_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT guard (128 position embeddings, trained length 64), with ONNX and int8 beside it:
    an input longer than 128 tokens crashes every path that does not truncate."""
    from harmaug_pl.deploy.export import export, from_model

    student = save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))
    folder = tmp_path_factory.mktemp("tiny_bert_export") / "guard"
    reference = from_model(str(student), folder, max_length=64, threshold=0.5, seed=0)
    export(folder, reference, sample_size=8)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_guard_3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with the Llama-Guard-3 template and Llama-3 special tokens."""
    return save_tiny_llama(
        tmp_path_factory.mktemp("tiny_llama_guard_3"),
        chat_template=LLAMA_GUARD_3_TEMPLATE,
        seed=2,
        extra_special=tuple(LLAMA3_SPECIAL),
        max_position_embeddings=4096,
    )
