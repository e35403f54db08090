"""A Hugging Face hub cache and datasets cache holding the shipped packs' models and data sets by their
real ids, in the real on-disk layouts, with real-shaped configs, tiny tokenizers and FAKE weights.

The weight files are a few bytes of text: anything that tried to load them would fail, so a check
that passes on this cache has read configs, tokenizers and file listings only. The DeBERTa-v3
repos hold only ``pytorch_model.bin``, as on the hub.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from transformers import DebertaV2Config, GemmaConfig, LlamaConfig, Qwen2Config

from tests.tiny_models import GUARD_TEMPLATE, build_tokenizer

FAKE_WEIGHTS = b"NOT WEIGHTS: a preflight reads file names only\n"

# Public config.json values of the shipped packs' models (sizes only; what the estimates read).
LLAMA_GUARD_8B = LlamaConfig(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
)
LLAMA_GUARD_1B = LlamaConfig(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    max_position_embeddings=131072,
    tie_word_embeddings=True,
)
GEMMA_2B = GemmaConfig(
    vocab_size=256000,
    hidden_size=2048,
    intermediate_size=16384,
    num_hidden_layers=18,
    num_attention_heads=8,
    num_key_value_heads=1,
    head_dim=256,
    max_position_embeddings=8192,
)
QWEN_05B = Qwen2Config(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    tie_word_embeddings=True,
)


def deberta_v3(hidden: int, layers: int, heads: int) -> DebertaV2Config:
    return DebertaV2Config(
        vocab_size=128100,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
        relative_attention=True,
        position_buckets=256,
        norm_rel_ebd="layer_norm",
        share_att_key=True,
        pos_att_type=["p2c", "c2p"],
        position_biased_input=False,
        max_relative_positions=-1,
        type_vocab_size=0,
    )


def sharded(count: int) -> dict[str, bytes]:
    """A sharded safetensors checkpoint: the index and its (fake) shards."""
    names = [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    index = {"metadata": {}, "weight_map": {f"layer{i}.weight": name for i, name in enumerate(names)}}
    return {"model.safetensors.index.json": json.dumps(index).encode(), **dict.fromkeys(names, FAKE_WEIGHTS)}


def saved_files(obj: object, folder: Path) -> dict[str, bytes]:
    """What ``obj.save_pretrained`` writes, as {file name: bytes}."""
    folder.mkdir(parents=True, exist_ok=True)
    obj.save_pretrained(folder)  # type: ignore[attr-defined]
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def put_repo(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """One repo in huggingface_hub's cache layout: blobs, a snapshot of symlinks, ``refs/main``."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def put_dataset(cache: Path, folder: str, config: str, splits: list[str]) -> None:
    """A prepared data set as ``datasets`` leaves it: ``<ns>___<name>/<config>/<version>/<hash>``."""
    prepared = cache / folder / config / "0.0.0" / hashlib.sha1(f"{folder}{config}".encode()).hexdigest()[:16]
    prepared.mkdir(parents=True)
    info = {"config_name": config, "splits": {split: {"name": split, "num_examples": 1} for split in splits}}
    (prepared / "dataset_info.json").write_text(json.dumps(info))


def chat_tokenizer(template: str | None, folder: Path) -> dict[str, bytes]:
    tokenizer = build_tokenizer(template)
    tokenizer.add_tokens(["unsafe"])  # one token each, as "safe" and "unsafe" are for Llama-3
    return saved_files(tokenizer, folder)


def student_tokenizer(folder: Path) -> dict[str, bytes]:
    tokenizer = build_tokenizer(chat_template=None, encoder=True)
    tokenizer.sep_token, tokenizer.cls_token = "<|im_end|>", "<|im_start|>"
    return saved_files(tokenizer, folder)


def fill(root: Path) -> tuple[Path, Path]:
    """Fill ``root/hub`` and ``root/datasets`` with every hub model and data set of the shipped packs."""
    hub, datasets, work = root / "hub", root / "datasets", root / "build"
    chat = chat_tokenizer(build_tokenizer().chat_template, work / "chat")
    guard = chat_tokenizer(GUARD_TEMPLATE, work / "guard")
    encoder = student_tokenizer(work / "encoder")
    llms = {
        "google/gemma-1.1-2b-it": (GEMMA_2B, chat, sharded(2)),
        "Qwen/Qwen2.5-0.5B-Instruct": (QWEN_05B, chat, {"model.safetensors": FAKE_WEIGHTS}),
        "meta-llama/Llama-Guard-3-8B": (LLAMA_GUARD_8B, guard, sharded(4)),
        "meta-llama/Llama-Guard-3-1B": (LLAMA_GUARD_1B, guard, {"model.safetensors": FAKE_WEIGHTS}),
        "microsoft/deberta-v3-large": (
            deberta_v3(1024, 24, 16),
            encoder,
            {"pytorch_model.bin": FAKE_WEIGHTS},
        ),
        "microsoft/deberta-v3-base": (deberta_v3(768, 12, 12), encoder, {"pytorch_model.bin": FAKE_WEIGHTS}),
        "microsoft/deberta-v3-xsmall": (deberta_v3(384, 12, 6), encoder, {"pytorch_model.bin": FAKE_WEIGHTS}),
    }
    for repo_id, (config, tokenizer, weights) in llms.items():
        put_repo(hub, repo_id, saved_files(config, work / repo_id) | tokenizer | weights)
    put_dataset(datasets, "allenai___wildguardmix", "wildguardtrain", ["train"])
    put_dataset(datasets, "allenai___wildguardmix", "wildguardtest", ["test"])
    put_dataset(datasets, "lmsys___toxic-chat", "toxicchat0124", ["train", "test"])
    put_dataset(datasets, "walledai___xs_test", "default", ["test"])
    return hub, datasets
